"""A throwaway git repository holding a copy of the research surface, as a worktree."""

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
