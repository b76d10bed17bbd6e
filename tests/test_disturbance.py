"""A run disturbed by a neighbour is discarded and run again, not counted: the kernel's word
on the trainer's wait for a CPU (bench/disturbance.py), and the engine's re-run
(agent/measure.py) on real sessions of the fast fake harness."""

import os
import sqlite3
import subprocess
import sys
import time

import pytest

from agent.config import SessionConfig
from agent.loop import Session
from agent.measure import MAX_DISTURBED
from agent.proposers import make_proposer
from bench import disturbance

BUSY = "import time\nend = time.perf_counter() + {s}\nwhile time.perf_counter() < end: pass\n"


def busy_on_cpu0(seconds: float) -> subprocess.Popen:
    """A process that spins for `seconds` of wall time, on CPU 0 only."""
    return subprocess.Popen([sys.executable, "-c", BUSY.format(s=seconds)],
                            preexec_fn=lambda: os.sched_setaffinity(0, {0}))


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/schedstat"),
                    reason="this kernel keeps no schedstat")
def test_two_spinners_on_one_cpu_wait_for_it_a_lone_sleeper_does_not():
    """Two processes spinning on one CPU share it: each waits for it about half the time.
    A process that sleeps is never ready to run, so it never waits."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    a, b = busy_on_cpu0(1.5), busy_on_cpu0(1.5)
    time.sleep(1.2)  # both still spinning: read them before they exit
    waited = disturbance.run_delay_seconds([a.pid, b.pid])
    slept = disturbance.run_delay_seconds([sleeper.pid])
    for p in (a, b, sleeper):
        p.wait()
    # ~1.1 s of spinning each (after start-up), half of it waiting: ~1.1 s in all; at
    # least 0.3 s whatever else this machine runs (a neighbour only adds to the wait).
    assert waited > 0.3, waited
    assert slept < 0.1, slept
    assert disturbance.run_delay_seconds([2**22 + 7]) == 0.0  # no such process: nothing


def test_the_rule_names_what_disturbed_a_run():
    def result(delay=0.0, steal=0.0, seconds=10.0, throttled=()):
        out = {"train_seconds": seconds,
               "cpu_usage": {"run_delay_seconds": delay, "steal_seconds": steal}}
        if throttled:
            out["telemetry"] = {"unavailable": None, "start": [], "end": [],
                                "throttled": list(throttled)}
        return out

    assert disturbance.disturbed(result(delay=0.5)) is None  # 5%: a quiet machine's share
    assert "waited for a CPU 2.0 s" in disturbance.disturbed(result(delay=2.0))
    assert "stole 1.5 CPU s" in disturbance.disturbed(result(steal=1.5))
    assert "GPU throttled (hw_thermal)" in disturbance.disturbed(result(throttled=["hw_thermal"]))
    both = disturbance.disturbed(result(delay=3.0, steal=3.0))
    assert "waited" in both and "stole" in both
    # A result without the numbers (an older harness, a crash) is not called disturbed.
    assert disturbance.disturbed({"train_seconds": 5.0}) is None
    assert disturbance.disturbed(None) is None
    assert disturbance.disturbed(result(delay=1.0, seconds=0.0)) is None


def session(fake_repo, tmp_path, monkeypatch) -> tuple[Session, int]:
    """A session on the fake harness, and its baseline candidate's id; write a count N to
    tmp_path/disturb to disturb its next N runs (tests/fakes/harness.py)."""
    monkeypatch.setenv("SPEEDLOOP_LOCKS", str(tmp_path / "locks"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    (tmp_path / "disturb").write_text("0")
    monkeypatch.setenv("FAKE_DISTURBED", str(tmp_path / "disturb"))
    config = SessionConfig(repo=str(fake_repo), objective="throughput", baseline_runs=2,
                           wandb="disabled", experiments=1)
    s = Session.create(tmp_path / "s", config, make_proposer("sweep", None, {}),
                       say=lambda text: None)
    return s, s.ledger.add_candidate("baseline", parent_id=None,
                                     commit_sha=s.workspace.champion)


def discarded(s: Session) -> list[sqlite3.Row]:
    with sqlite3.connect(s.run_dir.ledger) as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM runs WHERE state = 'discarded'").fetchall()


def test_a_disturbed_run_is_discarded_and_run_again(fake_repo, tmp_path, monkeypatch):
    s, base = session(fake_repo, tmp_path, monkeypatch)
    s.measurer.benchmark(s.ledger.candidate(base), "baseline")
    (tmp_path / "disturb").write_text("1")
    again = s.measurer.benchmark(s.ledger.candidate(base), "baseline")
    assert again["status"] == "ok" and "cpu_usage" not in again  # the undisturbed re-run
    assert [r["id"] for r in s.ledger.runs_of(base)] == [1, 3]  # run 2 does not count
    (gone,) = discarded(s)
    assert gone["id"] == 2 and gone["seed"] == again["seed"]  # re-run with the same work
    assert gone["error"].startswith("disturbed: the trainer waited for a CPU")
    assert s.ledger.last_event("run 2 discarded, to be run again: disturbed")
    assert not any((s.run_dir.root / "checkpoints").glob("r0002-*"))  # nothing scores it


def test_a_machine_that_stays_busy_slows_the_session_but_never_stops_it(
        fake_repo, tmp_path, monkeypatch):
    s, base = session(fake_repo, tmp_path, monkeypatch)
    (tmp_path / "disturb").write_text(str(MAX_DISTURBED + 5))
    result = s.measurer.benchmark(s.ledger.candidate(base), "baseline")
    assert result["status"] == "ok" and "cpu_usage" in result  # disturbed, counted anyway
    assert len(discarded(s)) == MAX_DISTURBED
    (counted,) = s.ledger.runs_of(base)
    assert s.ledger.last_event(f"run {counted['id']} counted although disturbed")
