"""W&B tracking: offline runs written where they should be and read back with W&B's own
reader (live rows before a run ends, the verdict's tags, the target, a table and a chart
at every decision, even in a session killed with SIGKILL), nothing when disabled, and no
crash of the session when wandb is missing or fails."""

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import wandb_files

from agent import runner
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
        if run["role"] == "baseline" and run_id == runs[1]:
            tracker.log_decision(ledger.candidate(run["candidate_id"]))
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
    tracker.update_session({**CONFIG, "target_loss": 3.25})  # closed: a no-op, no error
    assert tracker.mode == "offline", ledger.events()  # no error turned it off
    import wandb

    wandb.teardown()  # W&B's writer runs in its service: wait until it has written all

    session_id = ledger.session()["id"]
    by_id = wandb_files.runs(wandb_env / "wandb")
    assert set(by_id) == {f"run{r}" for r in runs} | {"session"}
    base = wandb_files.state(by_id[f"run{runs[0]}"])
    assert base["config"]["preset"] == "cpu-tiny" and base["config"]["role"] == "baseline"
    assert base["summary"]["tokens_per_sec"] == 9000.0 and base["state"] == "finished"
    curve = [r for r in wandb_files.history(by_id[f"run{runs[0]}"]) if "by_tokens/val_loss" in r]
    assert [r["tokens"] for r in curve] == [0, 1000, 2000, 3000]  # no lines: the curve
    crash_dir = by_id[f"run{runs[2]}"]
    crash = wandb_files.state(crash_dir)
    assert crash["config"]["description"] == "lr 0.02" and crash["config"]["candidate"] == cand
    assert crash["summary"]["error"] == "Traceback: boom"
    assert set(crash["tags"]) >= {"role:screen", "verdict:reject"}
    [artifact] = [r["artifact"] for r in wandb_files.records(crash_dir) if r["type"] == "artifact"]
    assert artifact["name"] == f"diff-{session_id}-c{cand}"
    session_dir = by_id["session"]
    points = [r for r in wandb_files.history(session_dir) if "decision/experiment" in r]
    assert [(p["decision/experiment"], p["decision/verdict"]) for p in points] == [(1, "reject")]
    tables = list(session_dir.glob("files/media/table/candidates_*.table.json"))
    assert len(tables) == 3  # at the baseline's decision, the candidate's, and at the end
    assert all("lr 0.02" in t.read_text() for t in tables)
    assert len(list(session_dir.glob("files/media/images/progress_*.png"))) == 3
    assert (tmp_path / "run" / "progress.png").exists()  # the report was written first
    assert any("W&B offline in" in e["text"] for e in ledger.events())
    ledger.close()


def test_the_session_run_takes_the_target_when_the_baseline_sets_it(tmp_path, wandb_env):
    ledger, _, _ = session_ledger(tmp_path / "run")
    tracker = Tracker(ledger)
    tracker.start_session()
    tracker.update_session({**CONFIG, "target_loss": 3.25, "fixed_hashes": {"train.py": "x"}})
    tracker.finish()
    import wandb

    wandb.teardown()
    config = wandb_files.state(wandb_files.runs(wandb_env / "wandb")["session"])["config"]
    assert config["target_loss"] == 3.25 and "fixed_hashes" not in config
    ledger.close()


def test_a_session_killed_mid_way_keeps_every_decision_with_its_table_and_chart(
        killed_session):
    """kill -9 right after the fourth decision: the session run never finished, yet its
    file has each decision, each with the candidates table and the chart as they were."""
    by_id = wandb_files.runs(killed_session / "wandb")
    session_dir = by_id["session"]
    assert wandb_files.state(session_dir)["state"] == "running"  # killed, never finished
    points = [r for r in wandb_files.history(session_dir) if "decision/experiment" in r]
    assert [(p["decision/experiment"], p["decision/verdict"]) for p in points] == [
        (1, "accept"), (2, "refused"), (3, "reject"), (4, "held")]
    for n, point in enumerate(points, 1):
        table = json.loads((session_dir / "files" / point["candidates.path"]).read_text())
        assert len(table["data"]) == n + 1  # the baseline and the experiments decided so far
        assert (session_dir / "files" / point["progress.path"]).stat().st_size > 1000
    assert points[0]["decision/accepted"] == 1 and points[0]["decision/speedup"] > 1.1


def test_each_run_is_filterable_by_settings_role_verdict_and_check(killed_session):
    by_id = wandb_files.runs(killed_session / "wandb")
    screen = wandb_files.state(by_id["run3"])  # the accepted candidate's screening run
    assert screen["state"] == "finished"
    assert set(screen["tags"]) == {"role:screen", "verdict:accept"}
    config = screen["config"]
    assert (config["preset"], config["objective"], config["experiments"]) == (
        "cpu-tiny", "throughput", 6)
    assert config["description"] == "patch 01-faster.patch: 01-faster"
    assert config["proposer"] == "patches" and config["verdict"] == "accept"
    assert list(by_id["run3"].glob("files/r0003-*.log"))  # the run's log, as a file
    held = wandb_files.state(by_id["run7"])
    assert "caught_by:implausible-speedup" in held["tags"] and "verdict:held" in held["tags"]
    rows = wandb_files.history(by_id["run3"])
    train = [r for r in rows if "by_seconds/train_loss" in r]
    evals = [r for r in rows if "by_seconds/val_loss" in r]
    assert [r["tokens"] for r in train] == [2048, 4096] and len(evals) == 1
    runtimes = [r["_runtime"] for r in rows]
    assert runtimes == sorted(runtimes) and runtimes[0] > 0
    metrics = {r["metric"]["glob_name"]: r["metric"]["step_metric"]
               for r in wandb_files.records(by_id["run3"]) if r["type"] == "metric"}
    assert metrics == {"by_seconds/*": "train_seconds", "by_tokens/*": "tokens"}


LIVE_TRAIN = """\
import json, sys, time
from pathlib import Path
from bench.protocol import SCHEMA_VERSION, eval_line, train_line
print(train_line(10, 1000, 4.5, 1.0), flush=True)
go = Path(sys.argv[sys.argv.index("--out") + 1]).with_name("go")
deadline = time.time() + 60
while not go.exists() and time.time() < deadline:
    time.sleep(0.05)
print(eval_line(20, 2000, 4.0, 2.0), flush=True)
result = {"schema_version": SCHEMA_VERSION, "status": "ok", "sandbox": True,
          "tokens_per_sec": 1000.0, "train_seconds": 2.0, "val_loss": 4.0,
          "curve": [{"tokens": 2000, "seconds": 2.0, "val_loss": 4.0}]}
Path(sys.argv[sys.argv.index("--out") + 1]).write_text(json.dumps(result))
print(json.dumps(result), flush=True)
"""


def test_a_run_in_flight_is_in_its_file_before_it_ends(tmp_path, wandb_env, monkeypatch):
    """train.py waits for a go file after its first train line: the test writes it only
    once W&B's own reader finds that line's row in the run's file."""
    monkeypatch.setenv("SPEEDLOOP_LOCKS", str(tmp_path / "locks"))
    worktree = tmp_path / "worktree"
    shutil.copytree(Path(__file__).parent.parent / "bench", worktree / "bench",
                    ignore=shutil.ignore_patterns("__pycache__", "leaderboards"))
    (worktree / "train.py").write_text(LIVE_TRAIN)
    ledger = Ledger(tmp_path / "run" / LEDGER_FILE)
    ledger.set_session(CONFIG)
    base = ledger.add_candidate("baseline", parent_id=None)
    run_id = ledger.start_run(base, "baseline", 1)
    tracker = Tracker(ledger)
    tracker.start_run(ledger.run(run_id), ledger.candidate(base))
    seen = {}

    def watch():
        deadline = time.time() + 60
        while time.time() < deadline and not seen:
            found = wandb_files.runs(wandb_env / "wandb")
            if f"run{run_id}" in found:
                rows = wandb_files.history(found[f"run{run_id}"])
                if rows:
                    seen.update(rows[0])
                    break
            time.sleep(0.2)
        (tmp_path / "out" / "go").touch()

    watcher = threading.Thread(target=watch)
    watcher.start()
    outcome = runner.run(runner.RunSpec(
        worktree=worktree, preset="cpu-tiny", seed=1, out_path=tmp_path / "out" / "r.json",
        log_path=tmp_path / "r.log", timeout_s=120,
        on_line=lambda line: tracker.run_line(run_id, line)))
    watcher.join()
    assert outcome.status == "ok", outcome.error
    assert seen["by_seconds/train_loss"] == 4.5 and seen["tokens"] == 1000
    ledger.finish_run(run_id, outcome.status, outcome.result, None, outcome.wall_seconds)
    tracker.finish_run(ledger.run(run_id), ledger.candidate(base))
    tracker.finish()
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
    failures = [t for t in texts if "could not finish a benchmark run" in t]
    assert len(failures) == 3 and "ConnectionError: api.wandb.ai unreachable" in failures[0]
    assert "tracking is off for the rest of this session" in failures[-1]
    assert tracker.mode == "disabled"
    assert "could not finish a benchmark run" in capsys.readouterr().err
    assert tracker._session_run is None  # giving up closed the session run
    tracker.finish()  # off now: a no-op
    ledger.close()


def test_the_dashboard_workspace_has_its_panels_without_a_server(killed_session, monkeypatch,
                                                                  capsys):
    from agent.cli import main
    from agent.dashboard import workspace_spec

    session_id = wandb_files.state(wandb_files.runs(killed_session / "wandb")["session"])[
        "run_id"].removesuffix("-session")
    workspace = workspace_spec(session_id, entity="someone")
    panels = {s.name: [(type(p).__name__, getattr(p, "x", None),
                        getattr(p, "y", None) or getattr(p, "metrics", None)
                        or getattr(p, "table_name", None)) for p in s.panels]
              for s in workspace.sections}
    assert ("LinePlot", "decision/experiment", ["decision/speedup", "decision/best_speedup"]) \
        in panels["progress"]
    assert ("WeavePanelSummaryTable", None, "candidates") in panels["progress"]
    assert ("LinePlot", "train_seconds", ["by_seconds/val_loss"]) in panels["loss curves"]
    assert ("BarPlot", None, ["tokens_per_sec"]) in panels["per run"]
    assert ("BarPlot", None, ["time_to_target"]) in panels["per run"]
    assert workspace.runset_settings.filters == f"Group = '{session_id}'"
    workspace._to_model()  # what save() would send: it builds without a server
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["dashboard", str(killed_session)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: no W&B server for {killed_session}")


def test_no_weave_suggestion_offline_and_a_users_setting_wins(monkeypatch):
    from wandb.integration.weave.weave import _is_weave_disabled

    from agent.tracking import quiet_weave

    monkeypatch.delenv("WANDB_DISABLE_WEAVE", raising=False)
    quiet_weave("offline")
    assert _is_weave_disabled()  # W&B's own reading of the switch: no "install Weave"
    monkeypatch.setenv("WANDB_DISABLE_WEAVE", "false")
    quiet_weave("offline")
    assert not _is_weave_disabled()
