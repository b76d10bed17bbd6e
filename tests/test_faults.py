"""A session killed at a step boundary resumes to the end it would have reached.

Fault injection (agent/faults.py) kills the session's process with SIGKILL just before its
Nth ledger write or git command. A first session counts the boundaries; then, for a
sample of N (every boundary with SPEEDLOOP_FAULT_ALL=1), a session is killed at N and
resumed (`run --resume D`, or started again when the kill came before its ledger existed),
and its ledger must be consistent and say what the uninterrupted session said: every
experiment once with the same verdict, no run left running, the champion branch at the
last accept, `status` and `report` working. The benchmark is the fast fake harness
(tests/fakes/harness.py), run by the real runner as real child processes.
"""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from fakes.harness import fake_harness_repo, patch_of

from agent.faults import FAULT_AT, FAULT_TRACE
from agent.ledger import Ledger
from agent.report import write_report
from agent.rundir import LEDGER_FILE
from agent.status import status_text

START = ["run", "--preset", "cpu-tiny", "--objective", "throughput", "--baseline-runs", "2",
         "--proposer", "patches", "--experiments", "5", "--wandb", "disabled"]  # fmt: skip
SAMPLE = 6  # kills in `make test` (its 20-minute budget); SPEEDLOOP_FAULT_ALL=1: every boundary


@pytest.fixture(scope="module")
def setup(data_cache, tmp_path_factory):
    """The fake-harness repository, a patch set that accepts, refuses (three ways) and
    rejects, and the environment of the sessions."""
    root = tmp_path_factory.mktemp("faults")
    repo = fake_harness_repo(root / "repo")
    patches = root / "patches"
    patches.mkdir()
    speed = lambda old, new: patch_of(repo, {"model/speed.txt": new}).replace(  # noqa: E731
        "-1.0", f"-{old}")
    (patches / "01-faster.patch").write_text(speed("1.0", "1.3\n"))
    (patches / "02-stale.patch").write_text(speed("0.7", "0.5\n"))  # does not apply
    train = (repo / "train.py").read_text()
    (patches / "03-harness.patch").write_text(patch_of(repo, {"train.py": "#\n" + train}))
    (patches / "04-clock.patch").write_text(patch_of(repo, {"model/timer.py": "import time\n"}))
    (patches / "05-slower.patch").write_text(speed("1.3", "1.2\n"))
    env = {**os.environ, "SPEEDLOOP_DATA": str(data_cache), "WANDB_MODE": "disabled",
           "SPEEDLOOP_LOCKS": str(root / "locks")}  # fmt: skip
    for name in (FAULT_AT, FAULT_TRACE):
        env.pop(name, None)
    return repo, [*START, "--proposer-arg", str(patches)], env


def agent(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def outcome(run_dir: Path) -> list[tuple[str, str]]:
    """(description, verdict) of every experiment, in order."""
    with Ledger(run_dir / LEDGER_FILE, create=False) as ledger:
        return [(c["description"], c["verdict"]) for c in ledger.candidates() if c["experiment"]]


def check_consistent(repo: Path, run_dir: Path) -> None:
    with Ledger(run_dir / LEDGER_FILE, create=False) as ledger:
        assert not ledger.running_runs()
        assert not ledger.candidates(["proposed", "running"])
        champion = ledger.champion()
        accepted = [c for c in ledger.candidates() if c["verdict"] == "accept"]
        assert champion["id"] == accepted[-1]["id"]
        branch = f"speedloop/{ledger.session()['id']}/champion"
        head = subprocess.run(["git", "rev-parse", branch], cwd=repo, capture_output=True,
                              text=True).stdout.strip()  # fmt: skip
        assert head == champion["commit_sha"]
        runs = [r for c in ledger.candidates() for r in ledger.runs_of(c["id"])]
        assert len({r["seed"] for r in runs}) == len(runs)  # each counted run its own seed
        assert all(Path(r["log_path"]).is_file() for r in runs)
    with sqlite3.connect(run_dir / LEDGER_FILE) as db:  # discarded runs too: a log each
        logs = [row[0] for row in db.execute("SELECT log_path FROM runs")]
    assert len(set(logs)) == len(logs)
    assert "stopped " in status_text(run_dir) and ": 5 experiments done" in status_text(run_dir)
    assert write_report(run_dir).report.is_file()


def boundaries_to_kill(trace: list[str]) -> list[int]:
    """Every boundary with SPEEDLOOP_FAULT_ALL=1, else a sample: the first boundary of each
    kind after each kind (the steps of one write or git sequence), thinned to SAMPLE."""
    if os.environ.get("SPEEDLOOP_FAULT_ALL"):
        return list(range(1, len(trace) + 1))
    firsts, seen, before = [], set(), ""
    for n, label in enumerate(trace, 1):
        if (before, label) not in seen:
            seen.add((before, label))
            firsts.append(n)
        before = label
    step = max(1, len(firsts) // SAMPLE)
    return sorted({1, len(trace), *firsts[::step]})


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory) -> tuple[list[str], list[tuple[str, str]]]:
    """The uninterrupted session: its boundaries' labels, in order, and its outcome."""
    repo, start, env = setup
    run_dir = tmp_path_factory.mktemp("reference") / "session"
    trace = run_dir.parent / "trace"
    proc = agent(repo, {**env, FAULT_TRACE: str(trace)}, *start, "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_consistent(repo, run_dir)
    labels = [line.split(" ", 1)[1] for line in trace.read_text().splitlines()]
    return labels, outcome(run_dir)


@pytest.mark.slow
def test_a_session_killed_at_any_boundary_resumes_to_the_same_end(setup, reference, tmp_path):
    repo, start, env = setup
    labels, expected = reference
    assert [v for _, v in expected] == ["accept", "refused", "refused", "refused", "reject"]
    killed = boundaries_to_kill(labels)
    for n in killed:
        run_dir = tmp_path / f"killed-at-{n}"
        proc = agent(repo, {**env, FAULT_AT: str(n)}, *start, "--run-dir", str(run_dir))
        assert proc.returncode == -9, f"not killed at {n} ({labels[n - 1]}): {proc.stderr}"
        if (run_dir / LEDGER_FILE).exists():
            proc = agent(repo, env, "run", "--resume", str(run_dir))
        else:  # killed before its ledger existed: the same command starts it afresh
            proc = agent(repo, env, *start, "--run-dir", str(run_dir))
        where = f"killed at boundary {n} of {len(labels)} ({labels[n - 1]})"
        assert proc.returncode == 0, f"{where}: {proc.stdout[-2000:]} {proc.stderr}"
        assert outcome(run_dir) == expected, where
        check_consistent(repo, run_dir)
    print(f"{len(labels)} boundaries; killed at {len(killed)} of them, all resumed: {killed}")


def test_a_discarded_run_and_its_rerun_keep_a_log_each(setup, reference, tmp_path):
    """Killed after its first run ended and before the ledger recorded it: on resume that
    run is discarded and re-run with the same seed, and each keeps its own log."""
    repo, start, env = setup
    labels, _ = reference
    run_dir = tmp_path / "session"
    n = labels.index("ledger finish_run") + 1
    assert agent(repo, {**env, FAULT_AT: str(n)}, *start, "--run-dir", str(run_dir)
                 ).returncode == -9  # fmt: skip
    assert agent(repo, env, "run", "--resume", str(run_dir)).returncode == 0
    with sqlite3.connect(run_dir / LEDGER_FILE) as db:
        rows = db.execute("SELECT id, seed, state, log_path FROM runs ORDER BY id").fetchall()
    (_, seed, state, log), rerun = rows[0], rows[1]
    assert state == "discarded" and rerun[1:3] == (seed, "finished") and rerun[3] != log
    for run_id, *_, path in (rows[0], rerun):
        assert f"r{run_id:04d}-" in Path(path).read_text()  # its own command line, own --out
