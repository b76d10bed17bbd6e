"""The research surface: the only paths a candidate may change.

This is the one place in the code that lists them; the workspace, the proposers and the
integrity checks all read it from here. Everything else in the repository is the fixed
benchmark and must never be changed by a candidate.
"""

from pathlib import PurePosixPath

SURFACE_DIRS = ("model", "kernels")


def in_surface(path: str) -> bool:
    """Whether a repository-relative path lies inside the research surface."""
    parts = PurePosixPath(path).parts
    if not parts or ".." in parts or PurePosixPath(path).is_absolute():
        return False
    return parts[0] in SURFACE_DIRS and len(parts) > 1


def outside_surface(paths: list[str]) -> list[str]:
    """The paths of a change that the research surface does not cover, in order."""
    return [p for p in paths if not in_surface(p)]
