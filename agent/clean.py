"""`python -m agent clean [--repo R] [--dry-run]`: remove what finished and abandoned sessions
left in a repository: their worktrees, `speedloop/<id>/champion` branches and
`refs/speedloop/<id>/...` candidate refs.

A session is known by its refs and its worktrees; its run directory is the parent of its
worktree (D/worktree, D/propose), and its ledger there says how it stands
(agent/liveness.py). It goes when it stopped (the ledger says why) or when its run
directory is gone (abandoned); it stays while it is alive, or when it was killed and can
still be resumed (remove its run directory first to let it go).

What this module must never do: touch a live or resumable session, a run directory (the
ledger, logs and report are the user's record), or a branch, ref or worktree outside
speedloop's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.ledger import Ledger, LedgerError
from agent.liveness import STARTED, STOPPED, liveness
from agent.rundir import RunDir
from agent.workspace import git

BRANCHES, REFS = "refs/heads/speedloop/", "refs/speedloop/"


@dataclass
class Found:
    session: str
    run_dir: Path | None = None  # None: no worktree of it is left to say where it was
    worktrees: list[Path] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)
    state: str = "abandoned"  # or a liveness state: alive, stopped, killed, not started
    text: str = "its run directory is gone"

    @property
    def goes(self) -> bool:
        return self.state in ("abandoned", "stopped")


def _session_of(ref: str) -> str:
    return ref.removeprefix(BRANCHES).removeprefix(REFS).split("/")[0]


def _worktrees(repo: Path) -> list[Path]:
    """The repository's linked worktrees (not its main checkout), existing or not."""
    listing = git(repo, "worktree", "list", "--porcelain")
    paths = [Path(line.removeprefix("worktree ")) for line in listing.splitlines()
             if line.startswith("worktree ")]
    return paths[1:]


def find(repo: Path) -> list[Found]:
    """Every session that left refs or worktrees in `repo`, with how it stands."""
    found: dict[str, Found] = {}
    refs = git(repo, "for-each-ref", "--format=%(refname)", BRANCHES, REFS).split()
    for ref in refs:
        found.setdefault(_session_of(ref), Found(_session_of(ref))).refs.append(ref)
    for path in _worktrees(repo):
        run_dir = RunDir.of_worktree(path)
        if run_dir is None or not run_dir.ledger.is_file():
            continue  # not a session's, or its run directory is gone (`worktree prune`)
        try:
            with Ledger(run_dir.ledger, create=False) as ledger:
                session = ledger.session()
                started, stopped = ledger.last_event(STARTED), ledger.last_event(STOPPED)
                events = ledger.events(1)
        except LedgerError:
            continue
        if session is None:
            continue
        f = found.setdefault(session["id"], Found(session["id"]))
        f.run_dir = path.parent
        f.worktrees.append(path)
        seen = events[-1]["time"] if events else session["created"]
        life = liveness(path.parent, started, stopped, seen)
        f.state, f.text = life.state, life.text
    return sorted(found.values(), key=lambda f: f.session)


def clean(repo: Path, dry_run: bool = False) -> str:
    """Remove the worktrees and refs of stopped and abandoned sessions; one paragraph per
    session found, saying what went (or would go) and what stays, and why."""
    repo = Path(repo)
    lines = []
    for f in find(repo):
        where = f" in {f.run_dir}" if f.run_dir else ""
        if not f.goes:
            lines.append(f"kept session {f.session}{where}: {f.text}")
            continue
        verb = "would remove" if dry_run else "removed"
        lines.append(f"{verb} session {f.session}{where} ({f.text}):")
        for path in f.worktrees:
            lines.append(f"  worktree {path}")
            if not dry_run:
                git(repo, "worktree", "remove", "--force", str(path))
        for ref in f.refs:
            sha = git(repo, "rev-parse", "--short", ref).strip()
            lines.append(f"  {ref} (at {sha})")
            if not dry_run:
                git(repo, "update-ref", "-d", ref)
    if not dry_run:
        git(repo, "worktree", "prune")  # the worktrees of run directories that are gone
    return "\n".join(lines) or f"no speedloop session left anything in {repo}"
