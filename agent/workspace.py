"""The engine's git layer: `git` (every git command of the engine runs through it), a
session's workspace, and unified diffs read one way (`parse_diff`).

The user's checkout is never touched: a session works in a worktree of its own, on a
champion branch made for it. A candidate is the proposer's edit of the worktree, taken
as one commit on top of the champion and kept under a ref of its own, accepted or not,
so nothing is lost. A change that touches anything outside the research surface is
refused before it can run, with the paths named.

What this module must never do: change the user's checkout or branches, or commit a
change outside the research surface.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
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


def git(cwd: Path, *args: str, input: str | None = None, env: dict | None = None) -> str:
    """`git ARGS` in `cwd`; its stdout, or GitError with its stderr. A step boundary of the
    fault injection (agent/faults.py), as every git command of the engine is."""
    faults.boundary(lambda: f"git {args[0]} in {faults.caller(('<lambda>', 'boundary', 'git'))}")
    proc = subprocess.run(["git", *IDENTITY, *args], cwd=cwd, capture_output=True, text=True,
                          input=input, env=None if env is None else {**os.environ, **env})
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
    def create(cls, repo: Path, path: Path, session: str, start: str = "HEAD") -> Workspace:
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

    def second(self, path: Path) -> Workspace:
        """Another worktree of the same session (for proposing while this one runs)."""
        other = Workspace(self.repo, path, self.session)
        if not (other.path / ".git").exists():
            _add_worktree(self.repo, other.path, self.champion)
        return other

    @classmethod
    def open(cls, repo: Path, path: Path, session: str) -> Workspace:
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

    def move_champion(self, commit: str) -> None:
        """Make `commit` the champion branch's head (agent/recording.py's `promote` records
        it in the ledger first)."""
        self.git("update-ref", f"refs/heads/{self.champion_branch}", commit)

    def apply(self, patch: str) -> None:
        apply_patch(self.path, patch)

    def file_at(self, commit: str, path: str) -> str | None:
        """The text of `path` at `commit`; None when it has none there (or is not text)."""
        try:
            return self.git("show", f"{commit}:{path}")
        except (GitError, UnicodeDecodeError):
            return None


def current_diff(worktree: Path) -> str:
    """The worktree's change against HEAD, as the workspace will capture it (`git add -A`),
    computed in a throwaway index so the worktree's own index is left alone."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        git(worktree, "read-tree", "HEAD", env=env)
        git(worktree, "add", "-A", env=env)
        return git(worktree, "diff", "--cached", "--no-color", "--no-ext-diff", env=env)


# -- unified diffs ---------------------------------------------------------------------------

_HUNK = re.compile(r"^@@ -\d+(?:,\d+)? \+(\d+)(?:,\d+)? @@")


@dataclass
class FileDiff:
    header: str  # "diff --git a/PATH b/PATH"
    path: str | None  # the file after the change; None when the change deletes it
    added: dict[int, str] = field(default_factory=dict)  # line number in the new file -> text
    changes: list[str] = field(default_factory=list)  # "+text" and "-text", in order


def parse_diff(diff: str) -> list[FileDiff]:
    """The files of a `git diff` (each starts with its `diff --git` line) and what it adds
    and removes in each."""
    files: list[FileDiff] = []
    line = 0
    for raw in diff.splitlines():
        if raw.startswith("diff --git "):
            files.append(FileDiff(raw, raw.split(" b/", 1)[-1]))
            line = 0
        elif not files:
            continue
        elif raw.startswith("+++ "):
            target = raw[4:].split("\t")[0].strip()
            files[-1].path = None if target == "/dev/null" else target.removeprefix("b/")
        elif raw.startswith("--- "):
            continue
        elif raw.startswith("@@"):
            m = _HUNK.match(raw)
            line = int(m.group(1)) if m else 0
        elif raw[:1] in "+-":
            files[-1].changes.append(raw)
            if raw.startswith("+") and line:
                files[-1].added[line] = raw[1:]
                line += 1
        elif raw.startswith(" ") and line:
            line += 1
        # "\ No newline at end of file" does not move the new file's line number
    return files


def changed_paths(diff: str) -> list[str]:
    """The paths a diff touches (a deleted file by its old path)."""
    return [f.header.split(" b/", 1)[-1] for f in parse_diff(diff)]


def normalized(diff: str) -> tuple[str, ...]:
    """A diff's files and changed lines with all whitespace removed: two edits that differ
    only in spacing, indentation or context compare equal."""
    out = []
    for f in parse_diff(diff):
        out.append(f.header)
        out += [c[0] + "".join(c[1:].split()) for c in f.changes if c[1:].split()]
    return tuple(out)
