"""`status` is honest: whether the session is alive, stopped (and why) or killed; a run
waiting for the device lock is shown waiting, for its holder; lock waits are not the
device idling; a finished session's shares are computed to its end."""

import sqlite3
import time

import pytest

from agent.ledger import Ledger
from agent.liveness import STARTED, STOPPED, session_lock
from agent.report import write_report
from agent.rundir import LEDGER_FILE
from agent.status import status_text
from bench.locks import device_lock, lock_path


@pytest.fixture(autouse=True)
def locks(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDLOOP_LOCKS", str(tmp_path / "locks"))


def ledger_with_baseline(run_dir) -> tuple[Ledger, int]:
    ledger = Ledger(run_dir / LEDGER_FILE)
    ledger.set_session({"preset": "cpu-tiny", "objective": "throughput", "experiments": 5})
    base = ledger.add_candidate("baseline", parent_id=None, commit_sha="a" * 40)
    return ledger, base


def test_a_run_waiting_for_the_device_lock_says_so_and_for_whom(tmp_path):
    ledger, base = ledger_with_baseline(tmp_path)
    ledger.log_event(f"{STARTED} (pid 1)")
    run = ledger.start_run(base, "baseline", 1, "logs/r1.log", lock_path("cpu"))
    with session_lock(tmp_path), device_lock("cpu"):  # another benchmark has the CPU
        text = status_text(tmp_path, width=200)
        assert "alive: the session runs (pid " in text
        assert f"waiting now: candidate {base} (baseline), baseline run {run}, seed 1, for the " \
            "lock held by pid " in text
        assert "running now" not in text
        ledger.lock_taken(run, 12.0)
        assert f"running now: candidate {base} (baseline), baseline run {run}" in \
            status_text(tmp_path, width=200)


def test_a_stopped_session_is_shown_stopped_with_its_shares_to_its_end(tmp_path):
    """Two runs of 300 s, each after 100 s waiting for the lock, in a session that stopped
    1000 s after it began, 5000 s ago: 60% ran, 20% waited (not idle), 20% idled; the
    shares stay so however long after the end status is asked."""
    ledger, base = ledger_with_baseline(tmp_path)
    ledger.log_event(f"{STARTED} (pid 1)")
    for seed in (1, 2):
        run = ledger.start_run(base, "baseline", seed, f"logs/r{seed}.log")
        ledger.lock_taken(run, 100.0)
        ledger.finish_run(run, "ok", {"status": "ok", "tokens_per_sec": 1.0, "val_loss": 3.0},
                          wall_seconds=300.0)
    ledger.log_event(f"{STOPPED}5 experiments done")
    ledger.close()
    began = time.time() - 5000
    with sqlite3.connect(tmp_path / LEDGER_FILE) as db:
        db.execute("UPDATE session SET created = ?", (began,))
        db.execute("UPDATE events SET time = ? WHERE text LIKE 'session stopped%'",
                   (began + 1000,))
    text = status_text(tmp_path, width=200)
    assert f"stopped {time.strftime('%Y-%m-%d %H:%M', time.localtime(began + 1000))}" in text
    assert ": 5 experiments done" in text
    shares = ("benchmarks ran 60% of the session's 16m 40s; they waited 20% for the device "
              "lock (other processes' runs); the device idled 20%")
    assert shares in text
    assert shares.capitalize() in write_report(tmp_path).report.read_text()


def test_a_killed_session_is_not_shown_running(tmp_path):
    ledger, base = ledger_with_baseline(tmp_path)
    ledger.log_event(f"{STARTED} (pid 1)")
    run = ledger.start_run(base, "baseline", 1, "logs/r1.log")
    text = " ".join(status_text(tmp_path, width=200).split())
    assert "not running: its process ended without stopping (killed or crashed)" in text
    assert f"--resume {tmp_path}" in text
    assert f"left running by the ended process: candidate {base} (baseline), baseline run " \
        f"{run}" in text
    assert "running now" not in text
