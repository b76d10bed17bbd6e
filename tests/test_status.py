"""`status` is honest: whether the session is alive, stopped (and why) or killed; a run
waiting for the device lock is shown waiting, for its holder; lock waits are not the
device idling; a finished session's shares are computed to its end. `status --json` keeps
its schema, `--watch` renders, `show` tells any candidate in full."""

import io
import json
import sqlite3
import time

import pytest
from rich.console import Console

from agent.cli import main
from agent.ledger import Ledger
from agent.liveness import STARTED, STOPPED, session_lock
from agent.report import write_report
from agent.rundir import LEDGER_FILE
from agent.status import status_text
from agent.status_data import status_data, watch_view
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


# `status --json`'s schema: key -> type (a dict: that object's own schema; a list of one
# dict: a list of such objects). None in a tuple: the value may be null.
SPEEDUP = {"ratio": float, "ci_low": (float, None), "ci_high": (float, None), "n": int}
STATUS_SCHEMA = {
    "session": str, "created": float, "state": str, "life": str, "untrusted": (str, None),
    "preset": str, "objective": str, "proposer": str, "experiments": int,
    "budget_experiments": (int, None), "busy": (str, None),
    "timed": ({"share": float, "runs": int, "text": str,
               "seconds": {k: float for k in ("wall", "train", "startup", "evaluation", "rest")}},
              None),
    "spend": {"requests": int, "cost_usd": float, "input_tokens": int, "output_tokens": int,
              "cache_creation_input_tokens": int, "cache_read_input_tokens": int,
              "text": (str, None)},
    "champion": {"id": int, "description": str, "speedup": float, "since": float},
    "decisions": [{"experiment": int, "id": int, "description": str, "proposer": str,
                   "outcome": str, "verdict": (str, None), "caught_by": (str, None),
                   "speedup": (SPEEDUP, None), "runs": int}],
    "held": [int],
    "running": [{"run": int, "candidate": int, "description": str, "role": str, "seed": int,
                 "state": str, "lock_holder": (str, None), "since": float,
                 "log": (str, None)}],
    "events": [{"time": float, "text": str}],
}


def conforms(value, schema, where="status") -> list[str]:
    """What in `value` breaks `schema`, as 'where: why' lines."""
    options = schema if isinstance(schema, tuple) else (schema,)
    if value is None:
        return [] if None in options else [f"{where}: null"]
    problems = []
    for option in (o for o in options if o is not None):
        if isinstance(option, dict):
            if not isinstance(value, dict):
                problems.append(f"{where}: not an object")
                continue
            found = [f"{where}: keys {sorted(set(value) ^ set(option))} differ"] \
                if set(value) != set(option) else []
            found += [p for k in option if k in value
                      for p in conforms(value[k], option[k], f"{where}.{k}")]
        elif isinstance(option, list):
            found = [f"{where}: not a list"] if not isinstance(value, list) else \
                [p for i, item in enumerate(value) for p in conforms(item, option[0],
                                                                      f"{where}[{i}]")]
        else:
            ok = isinstance(value, option) and not (option is int and isinstance(value, bool))
            found = [] if ok or (option is float and type(value) is int) else \
                [f"{where}: {value!r} is not {option.__name__}"]
        if not found:
            return []
        problems += found
    return problems


def test_status_json_holds_everything_status_shows(killed_session, capsys):
    assert main(["status", str(killed_session), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert conforms(data, STATUS_SCHEMA) == []
    assert conforms({**data, "experiments": "4"}, STATUS_SCHEMA) == [
        "status.experiments: '4' is not int"]  # the check can fail
    assert data["state"] == "killed" and data["experiments"] == 4 and data["held"] == [5]
    assert [(d["id"], d["verdict"]) for d in data["decisions"]] == [
        (2, "accept"), (3, "refused"), (4, "reject"), (5, "held")]
    assert data["champion"]["id"] == 2 and data["decisions"][0]["speedup"]["ratio"] > 1.1
    # Every finished run's seconds as the harness counted them (the fake's: 0.01 s timed).
    timed = data["timed"]
    assert timed["runs"] == sum(d["runs"] for d in data["decisions"]) + 2  # the baseline's 2
    assert timed["seconds"]["train"] == pytest.approx(0.01 * timed["runs"])
    assert 0 < timed["share"] < 0.5 and timed["text"].startswith("timed training was ")


def test_the_watch_view_shows_champion_decisions_and_what_runs(killed_session):
    data = status_data(killed_session)
    console = Console(record=True, width=140, file=io.StringIO())
    console.print(watch_view(data))
    text = console.export_text()
    assert "champion: candidate 2 (patch 01-faster.patch: 01-faster), speedup ×" in text
    assert "running now: nothing" in text and "implausible-speedup" in text
    assert "experiments 4 of 6" in text


@pytest.mark.parametrize("cid, expected", [
    (2, ["verdict: accept", "the judge: effect 1.", "holdout-gap: passed", "run 3 screen",
         "4,096", "+1.3"]),
    (3, ["verdict: refused", "does not apply to the champion", "runs:\n  none (nothing ran)"]),
    (4, ["verdict: reject", "speed ratio 0.9", "checks: none ran", "run 6 screen"]),
    (5, ["verdict: held (caught by implausible-speedup)", "implausible-speedup: FAILED",
         "seed-ignored: passed", "+4.0"]),
])
def test_show_tells_any_candidate_in_full(killed_session, capsys, cid, expected):
    assert main(["show", str(killed_session), str(cid)]) == 0
    text = capsys.readouterr().out
    for needle in expected:
        assert needle in text, needle


def test_show_and_status_name_bad_input_in_one_line(killed_session, tmp_path, capsys):
    assert main(["show", str(killed_session), "99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: candidate 99: no such candidate")
    assert main(["status", str(tmp_path / "nowhere"), "--json"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nowhere'} holds no session (ledger.sqlite missing)\n"
