"""`python -m agent clean`: the worktrees, branches and refs of stopped and abandoned
sessions go; a live session, a killed one that can be resumed, and the user's own
branches and worktrees stay."""

import shutil
import subprocess
import sys
from pathlib import Path

from fakes.repo import git

from agent.ledger import Ledger
from agent.liveness import STARTED, STOPPED, session_lock
from agent.rundir import LEDGER_FILE
from agent.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent


def make_session(repo: Path, run_dir: Path, *events: str) -> str:
    """A session's ledger, worktree, second worktree and one candidate ref; its id."""
    with Ledger.create(run_dir / LEDGER_FILE, {"repo": str(repo)}) as ledger:
        for text in events:
            ledger.log_event(text)
        session = ledger.session()["id"]
    ws = Workspace.create(repo, run_dir / "worktree", session)
    ws.second(run_dir / "propose")
    (ws.path / "model/recipe.py").write_text("lr = 0.2\n")
    ws.capture(1, "a candidate")
    return session


def refs(repo: Path) -> str:
    return git(repo, "for-each-ref", "--format=%(refname)")


def test_clean_removes_only_what_finished_or_was_abandoned(tmp_path):
    repo = tmp_path / "repo"
    (repo / "model").mkdir(parents=True)
    (repo / "model" / "recipe.py").write_text("lr = 0.1\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "start")
    git(repo, "branch", "feature")
    git(repo, "worktree", "add", "-q", str(tmp_path / "mine"), "feature")  # the user's own
    started = f"{STARTED} (pid 1)"
    live = make_session(repo, tmp_path / "live", started)
    done = make_session(repo, tmp_path / "done", started, f"{STOPPED}5 experiments done")
    killed = make_session(repo, tmp_path / "killed", started)
    gone = make_session(repo, tmp_path / "gone", started)
    shutil.rmtree(tmp_path / "gone")

    def agent_clean(*flags):
        proc = subprocess.run([sys.executable, "-m", "agent", "clean", "--repo", str(repo),
                               *flags], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return " ".join(proc.stdout.split())

    with session_lock(tmp_path / "live"):
        before = refs(repo)
        listing = agent_clean("--dry-run")
        assert refs(repo) == before and (tmp_path / "done" / "worktree").is_dir()
        assert f"would remove session {done} in {tmp_path / 'done'}" in listing
        assert f"worktree {tmp_path / 'done' / 'propose'}" in listing
        assert f"refs/heads/speedloop/{done}/champion (at " in listing
        assert f"would remove session {gone}" in listing
        assert f"kept session {live} in {tmp_path / 'live'}: alive" in listing
        assert f"kept session {killed} in {tmp_path / 'killed'}: not running" in listing

        agent_clean()
    left = refs(repo)
    for session in (done, gone):
        assert session not in left
    for name, session in (("live", live), ("killed", killed)):
        assert f"refs/heads/speedloop/{session}/champion" in left
        assert f"refs/speedloop/{session}/candidates/1" in left
        assert (tmp_path / name / "worktree").is_dir()
    assert "refs/heads/feature" in left and (tmp_path / "mine").is_dir()
    worktrees = git(repo, "worktree", "list")
    assert "done" not in worktrees and "gone" not in worktrees and "mine" in worktrees
    assert (tmp_path / "done" / LEDGER_FILE).is_file()  # the user's record stays

