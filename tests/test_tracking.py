"""W&B tracking: offline runs written where they should be, nothing when disabled, and no
crash of the session when wandb is missing or fails."""

import sys

import pytest

from agent.ledger import Ledger
from agent.rundir import LEDGER_FILE
from agent.tracking import Tracker, resolve_mode

CONFIG = {"preset": "cpu-tiny", "objective": "time-to-loss", "proposer": "sweep"}


def result(seed: int, time_to_target: float) -> dict:
    return {"status": "ok", "seed": seed, "time_to_target": time_to_target,
            "train_seconds": time_to_target, "tokens_per_sec": 9000.0, "val_loss": 3.3,
            "val_bpb": 1.1, "mfu": None, "peak_memory_bytes": 2**30,
            "curve": [{"tokens": 1000 * i, "seconds": 2.0 * i, "val_loss": 5.0 - i / 2,
                       "val_bpb": 1.5} for i in range(4)]}


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B offline-capable and silent, every file of it under tmp_path, no network."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR",
                 "WANDB_ARTIFACT_DIR"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path / "WANDB_DIR"


def session_ledger(run_dir) -> tuple[Ledger, list[int], int]:
    """A session with two baseline runs and a screened candidate; returns runs, candidate."""
    ledger = Ledger(run_dir / LEDGER_FILE)
    ledger.set_session(CONFIG)
    base = ledger.add_candidate("baseline", parent_id=None)
    runs = []
    for seed, t in [(1, 20.0), (2, 21.0)]:
        runs.append(ledger.start_run(base, "baseline", seed))
        ledger.finish_run(runs[-1], "ok", result(seed, t), None, 25.0)
    ledger.record_decision(base, "accept", {"reason": "baseline"}, speedup=1.0)
    cand = ledger.add_candidate("lr 0.02", parent_id=base, commit_sha="b" * 40,
                                diff="--- a/model/recipe.py\n+++ b/model/recipe.py\n+lr = 0.02\n")
    runs.append(ledger.start_run(cand, "screen", 3))
    ledger.finish_run(runs[-1], "crash", None, "Traceback: boom", 2.0)
    ledger.record_decision(cand, "reject", {"reason": "run with seed 3 failed", "effect": None})
    return ledger, runs, cand


def track_session(tracker: Tracker, ledger: Ledger, runs: list[int], cand: int) -> None:
    tracker.start_session()
    for run_id in runs:
        run = ledger.run(run_id)
        tracker.finish_run(run, ledger.candidate(run["candidate_id"]))
    tracker.log_decision(ledger.candidate(cand))
    tracker.finish()


def test_mode_resolution(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode() == "disabled"
    assert resolve_mode("offline") == "offline"  # the flag wins
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode() == "offline"
    with pytest.raises(ValueError, match="W&B mode 'sometimes'"):
        resolve_mode("sometimes")


def test_offline_runs_hold_the_session(tmp_path, wandb_env):
    ledger, runs, cand = session_ledger(tmp_path / "run")
    tracker = Tracker(ledger)
    assert tracker.mode == "offline"
    track_session(tracker, ledger, runs, cand)
    assert tracker.mode == "offline", ledger.events()  # no error turned it off
    import wandb

    wandb.teardown()  # W&B's writer runs in its service: wait until it has written all

    session_id = ledger.session()["id"]
    run_dirs = sorted((wandb_env / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 4  # three benchmark runs and the session run
    records = {}
    for run_dir in run_dirs:
        [data] = run_dir.glob("run-*.wandb")
        records[run_dir.name.rsplit("-", 1)[-1]] = data.read_bytes()
    by_id = records
    assert set(by_id) >= {f"run{r}" for r in runs} | {"session"}
    base_run = by_id[f"run{runs[0]}"]
    for needle in (session_id, "baseline", "curve/val_loss", "tokens_per_sec", "cpu-tiny"):
        assert needle.encode() in base_run, needle
    crash_run = by_id[f"run{runs[2]}"]
    for needle in ("candidate", "lr 0.02", "Traceback: boom", f"diff-{session_id}-c{cand}",
                   "candidate.diff"):
        assert needle.encode() in crash_run, needle
    session = by_id["session"]
    assert b"decision/experiment" in session and b"progress" in session
    session_dir = next(d for d in run_dirs if d.name.endswith("-session"))
    assert list(session_dir.glob("files/media/images/progress_*.png"))
    [table] = session_dir.glob("files/media/table/candidates_*.table.json")
    assert "lr 0.02" in table.read_text() and "time_to_target" in table.read_text()
    assert (tmp_path / "run" / "progress.png").exists()  # finish() wrote the report first
    assert any("W&B offline in" in e["text"] for e in ledger.events())
    ledger.close()


def test_disabled_writes_nothing(tmp_path, wandb_env, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    ledger, runs, cand = session_ledger(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "wandb", None)  # disabled never even imports wandb
    tracker = Tracker(ledger)
    assert tracker.mode == "disabled"
    track_session(tracker, ledger, runs, cand)
    assert not any(wandb_env.iterdir()) and not (tmp_path / "run" / "wandb").exists()
    assert capsys.readouterr().err == ""
    ledger.close()


def test_without_wandb_installed_it_says_so_once_and_does_nothing(tmp_path, wandb_env,
                                                                   monkeypatch, capsys):
    ledger, runs, cand = session_ledger(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    tracker = Tracker(ledger)
    assert tracker.mode == "disabled"
    track_session(tracker, ledger, runs, cand)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wandb is not installed" in err
    assert "wandb is not installed" in ledger.events()[-1]["text"]
    assert not any(wandb_env.iterdir())
    ledger.close()


def test_wandb_errors_become_events_not_crashes(tmp_path, wandb_env, monkeypatch, capsys):
    ledger, runs, cand = session_ledger(tmp_path / "run")
    tracker = Tracker(ledger, mode="offline")
    tracker.start_session()

    def broken(*args, **kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(tracker._wandb, "init", broken)
    for run_id in runs:  # three failures in a row turn tracking off
        tracker.finish_run(ledger.run(run_id), ledger.candidate(ledger.run(run_id)
                                                             ["candidate_id"]))
    texts = [e["text"] for e in ledger.events()]
    failures = [t for t in texts if "could not log a benchmark run" in t]
    assert len(failures) == 3 and "ConnectionError: api.wandb.ai unreachable" in failures[0]
    assert "tracking is off for the rest of this session" in failures[-1]
    assert tracker.mode == "disabled"
    assert "could not log a benchmark run" in capsys.readouterr().err
    assert tracker._session_run is None  # giving up closed the session run
    tracker.finish()  # off now: a no-op
    ledger.close()
