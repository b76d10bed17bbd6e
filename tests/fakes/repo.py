"""Throwaway git repositories for tests: a copy of the research surface (a proposer's
worktree), or of the whole working tree (a session's repository)."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def surface_repo(tree: Path) -> Path:
    """model/, kernels/ and bench/ (what the quick checks import) plus a stand-in for the
    fixed harness, committed, at `tree`."""
    skip = shutil.ignore_patterns("__pycache__")
    for name in ("model", "kernels", "bench"):
        shutil.copytree(ROOT / name, tree / name, ignore=skip)
    (tree / "train.py").write_text("# the fixed harness\n")
    for args in (["init", "-q"], ["add", "-A"],
                 ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c"]):
        subprocess.run(["git", *args], cwd=tree, check=True)
    return tree


def git(cwd: Path, *args: str) -> str:
    """Run git with a fixed identity; its stdout."""
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


def working_tree_repo(dest: Path) -> Path:
    """This working tree (tracked and untracked, not ignored files) as a fresh repository
    at `dest`, committed on main, so a session under test never touches ours."""
    files = git(ROOT, "ls-files", "-co", "--exclude-standard", "-z").split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        git(dest, *cmd)
    return dest
