"""A session's git workspace: its own worktree, a champion branch, one commit per candidate.

The user's checkout is never touched: a session works in a worktree of its own, on a
champion branch made for it. A candidate is the proposer's edit of the worktree, taken
as one commit on top of the champion and kept under a ref of its own, accepted or not,
so nothing is lost. A change that touches anything outside the research surface is
refused before it can run, with the paths named.
"""

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent import faults
from bench.surface import outside_surface

# Commits are made by the engine, so they must not depend on the user's git identity.
IDENTITY = ["-c", "user.name=speedloop", "-c", "user.email=speedloop@localhost"]


class GitError(RuntimeError):
    pass


class RefusedChange(Exception):
    """A change outside the research surface; nothing was committed."""

    def __init__(self, paths: list[str], diff: str):
        self.paths, self.diff = paths, diff
        super().__init__(
            f"the change touches {', '.join(paths)}, outside the research surface "
            "(model/, kernels/); only the surface may change"
        )


class EmptyChange(Exception):
    """The proposer changed nothing."""


class PatchError(Exception):
    """A patch that does not apply to the champion; git's own message says where."""


@dataclass
class Candidate:
    commit: str
    ref: str
    diff: str
    paths: list[str]


def git(cwd: Path, *args: str, input: str | None = None) -> str:
    faults.boundary(lambda: f"git {args[0]} in {faults.caller(('<lambda>', 'boundary', 'git'))}")
    proc = subprocess.run(
        ["git", *IDENTITY, *args], cwd=cwd, capture_output=True, text=True, input=input
    )
    if proc.returncode != 0:
        raise GitError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip()}")
    return proc.stdout


def apply_patch(worktree: Path, patch: str) -> None:
    """Apply a unified diff to a worktree (not committed); PatchError if it does not fit."""
    try:
        git(worktree, "apply", "--whitespace=nowarn", "-", input=patch)
    except GitError as e:
        raise PatchError(str(e)) from None


def _add_worktree(repo: Path, path: Path, commit: str) -> None:
    """A worktree of `repo` at `path`, detached at `commit` (so the champion branch can move
    while the worktree holds any commit). What a killed `worktree add` left is cleared
    first: a folder without its .git, a registration without its folder."""
    if (path / ".git").exists():
        return
    if path.exists():
        shutil.rmtree(path)
    git(repo, "worktree", "prune")
    git(repo, "worktree", "add", "--detach", str(path), commit)


class Workspace:
    """The worktree at `path` of the repository `repo`, for session `session`."""

    def __init__(self, repo: Path, path: Path, session: str):
        self.repo, self.path, self.session = Path(repo), Path(path), session
        self.champion_branch = f"speedloop/{session}/champion"
        self.ref_prefix = f"refs/speedloop/{session}/candidates"

    @classmethod
    def create(cls, repo: Path, path: Path, session: str, start: str = "HEAD") -> "Workspace":
        """The session's champion branch (at `start`) and its worktree. Idempotent: a
        creation killed between its steps is finished, from the branch it made."""
        ws = cls(repo, path, session)
        try:
            commit = git(ws.repo, "rev-parse", "--verify", f"{ws.champion_branch}^{{commit}}")
        except GitError:
            commit = git(ws.repo, "rev-parse", "--verify", f"{start}^{{commit}}")
            git(ws.repo, "branch", ws.champion_branch, commit.strip())
        _add_worktree(ws.repo, ws.path, commit.strip())
        return ws

    def second(self, path: Path) -> "Workspace":
        """Another worktree of the same session (for proposing while this one runs)."""
        other = Workspace(self.repo, path, self.session)
        if not (other.path / ".git").exists():
            _add_worktree(self.repo, other.path, self.champion)
        return other

    @classmethod
    def open(cls, repo: Path, path: Path, session: str) -> "Workspace":
        ws = cls(repo, path, session)
        if not (ws.path / ".git").exists():
            raise FileNotFoundError(
                f"{ws.path} is not this session's worktree any more; it cannot be resumed"
            )
        ws.git("rev-parse", "--verify", ws.champion_branch)  # the branch must still exist
        return ws

    def git(self, *args: str, input: str | None = None) -> str:
        return git(self.path, *args, input=input)

    @property
    def champion(self) -> str:
        return self.git("rev-parse", "--verify", self.champion_branch).strip()

    def checkout(self, commit: str) -> None:
        """Put the worktree at `commit` exactly: edits and untracked files are dropped."""
        self.git("checkout", "-q", "--force", "--detach", commit)
        # -x: ignored files too (a planted .pyc must not outlive its candidate).
        self.git("clean", "-q", "-ffdx")

    def reset(self) -> None:
        self.checkout(self.champion)

    def pending_paths(self) -> list[str]:
        self.git("add", "-A")
        # --no-renames: a moved fixed file must show as deleted, not hide behind its new path.
        listing = self.git("diff", "--cached", "--no-renames", "--name-only", "-z")
        return [p for p in listing.split("\0") if p]

    def capture(self, number: int, message: str) -> Candidate:
        """Commit the worktree's edits as candidate `number` on top of the champion.

        Raises EmptyChange when nothing changed and RefusedChange when a path lies outside
        the surface; either way the worktree goes back to the champion.
        """
        try:
            paths = self.pending_paths()
            if not paths:
                raise EmptyChange("the proposal changed no file")
            diff = self.git("diff", "--cached", "--no-renames", "--no-color", "--no-ext-diff")
            outside = outside_surface(paths)
            if outside:
                raise RefusedChange(outside, diff)
            self.git("commit", "-q", "--no-verify", "-m", message)
            commit = self.git("rev-parse", "HEAD").strip()
            ref = f"{self.ref_prefix}/{number}"
            self.git("update-ref", ref, commit)
            return Candidate(commit=commit, ref=ref, diff=diff, paths=paths)
        finally:
            self.reset()

    def promote(self, commit: str) -> None:
        """Make `commit` the champion."""
        self.git("update-ref", f"refs/heads/{self.champion_branch}", commit)

    def file(self, relative: str) -> Path:
        return self.path / relative
