"""Leaderboard ladders: published speedups, replayed as a series of patches to the surface.

A ladder is a folder `bench/leaderboards/<name>/` holding `manifest.toml` and one patch
per rung. The first patch applies to the research surface whose fingerprint the manifest
records (`base_surface`); each later patch applies to the result of the one before. The
replay command (agent/replay.py) measures every rung against the previous one and sets the
result beside the published claim.

    [[rung]]
    id = "01-logit-softcap-30"
    title = "Soft-cap the logits at 30"
    patch = "01-logit-softcap-30.patch"     # relative to the ladder's folder
    kind = "ml"                             # or "systems": waived from the loss test
    reference = "modded-nanogpt record #9 (11/06/24), ..."
    published = "10.8 -> 8.2 min on 8xH100 (the whole record)"
    published_speedup = 1.317               # optional: only when the step's own ratio is known

This module only reads and checks ladders; it never applies a patch or runs anything.
"""

import hashlib
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no tomllib; tomli is the same parser, published separately
    import tomli as tomllib

from bench.surface import SURFACE_DIRS

LEADERBOARDS = Path(__file__).resolve().parent
MANIFEST = "manifest.toml"
KINDS = ("ml", "systems")


class LadderError(Exception):
    """A ladder that cannot be used; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class Rung:
    id: str  # e.g. "01-value-embeddings"
    title: str
    patch: Path  # absolute path of the patch file (against the previous rung)
    kind: str  # "ml" or "systems" (systems changes are waived from the loss test)
    reference: str  # where the published figure comes from (record number/date/URL)
    published: str  # the published claim as text, e.g. "22.3 -> 15.2 min on 8xH100"
    published_speedup: float | None  # the claimed speedup of this step as a ratio, when known


@dataclass(frozen=True)
class Ladder:
    name: str
    title: str
    reference: str
    target_loss: float  # the leaderboard's target validation loss
    p_value: float  # the significance a record must reach for its loss to count
    base_surface: str  # fingerprint of model/ + kernels/ that the first patch applies to
    root: Path  # the ladder's folder
    rungs: tuple[Rung, ...]


# Field name -> (required, the types it may have, what it must be in words).
LADDER_FIELDS = {
    "name": (True, (str,), "a string"),
    "title": (True, (str,), "a string"),
    "reference": (True, (str,), "a string"),
    "target_loss": (True, (int, float), "a positive number"),
    "p_value": (True, (int, float), "a number between 0 and 1"),
    "base_surface": (True, (str,), "a sha256 hex digest (64 characters)"),
    "rung": (True, (list,), "a list of [[rung]] tables"),
}
RUNG_FIELDS = {
    "id": (True, (str,), "a non-empty string"),
    "title": (True, (str,), "a string"),
    "patch": (True, (str,), "a patch file name in the ladder's folder"),
    "kind": (True, (str,), f"one of {', '.join(KINDS)}"),
    "reference": (True, (str,), "a string"),
    "published": (True, (str,), "a string (say 'not found' when there is no figure)"),
    "published_speedup": (False, (int, float), "a positive number, or left out"),
}


def ladder_names() -> list[str]:
    """The ladders shipped in bench/leaderboards/, sorted."""
    return sorted(p.parent.name for p in LEADERBOARDS.glob(f"*/{MANIFEST}"))


def load_ladder(name_or_path: str | Path) -> Ladder:
    """A ladder by name (a folder of bench/leaderboards/), or by the path of its folder or
    manifest. LadderError if it is missing or anything in it is invalid."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / MANIFEST
    elif not path.is_file():
        if str(name_or_path) not in ladder_names():
            raise LadderError(
                f"no ladder '{name_or_path}': give a path to a ladder folder or its "
                f"{MANIFEST}, or one of: {', '.join(ladder_names()) or '(none)'}"
            )
        path = LEADERBOARDS / str(name_or_path) / MANIFEST
    path = path.resolve()
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise LadderError(f"{path}: cannot read the manifest: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise LadderError(f"{path}: not valid TOML: {e}; fix the syntax") from None
    return _parse(path, data)


def _check_fields(where: str, table: dict, fields: dict) -> None:
    for key in table:
        if key not in fields:
            raise LadderError(
                f"{where}: unknown field '{key}': the fields are {', '.join(fields)}; "
                "fix its spelling or remove it"
            )
    for key, (required, types, what) in fields.items():
        if key not in table:
            if required:
                raise LadderError(f"{where}: missing field '{key}': add it ({what})")
            continue
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise LadderError(f"{where}: field '{key}' is {value!r}: it must be {what}")


def _parse(path: Path, data: dict) -> Ladder:
    _check_fields(str(path), data, LADDER_FIELDS)
    if not data["target_loss"] > 0 or not math.isfinite(data["target_loss"]):
        raise LadderError(
            f"{path}: field 'target_loss' is {data['target_loss']!r}: use a positive number"
        )
    if not 0 < data["p_value"] < 1:
        raise LadderError(f"{path}: field 'p_value' is {data['p_value']!r}: use a number in (0, 1)")
    if not re.fullmatch(r"[0-9a-f]{64}", data["base_surface"]):
        raise LadderError(
            f"{path}: field 'base_surface' is {data['base_surface']!r}: use the sha256 hex "
            "digest that bench.leaderboards.surface_fingerprint gives for the base repository"
        )
    if not data["rung"]:
        raise LadderError(f"{path}: no [[rung]] tables: add at least one")
    rungs: list[Rung] = []
    seen: set[str] = set()
    for i, table in enumerate(data["rung"], start=1):
        rung_id = table.get("id") if isinstance(table, dict) else None
        where = f"{path}: rung {rung_id!r}" if isinstance(rung_id, str) else f"{path}: rung #{i}"
        if not isinstance(table, dict):
            raise LadderError(f"{where}: not a table: write each rung as [[rung]]")
        _check_fields(where, table, RUNG_FIELDS)
        if not table["id"].strip():
            raise LadderError(f"{where}: field 'id' is empty: give the rung a name")
        if table["id"] in seen:
            raise LadderError(f"{where}: duplicate id {table['id']!r}: every rung needs its own id")
        seen.add(table["id"])
        if table["kind"] not in KINDS:
            raise LadderError(
                f"{where}: field 'kind' is {table['kind']!r}: use one of {', '.join(KINDS)}"
            )
        patch = (path.parent / table["patch"]).resolve()
        if patch.parent != path.parent or not patch.is_file():
            raise LadderError(
                f"{where}: field 'patch' is {table['patch']!r}, but {patch} is not a file in "
                f"{path.parent}: add the patch there or fix the name"
            )
        speedup = table.get("published_speedup")
        if speedup is not None and not (speedup > 0 and math.isfinite(speedup)):
            raise LadderError(
                f"{where}: field 'published_speedup' is {speedup!r}: use a positive ratio "
                "(previous time / new time), or leave it out when no figure was published"
            )
        rungs.append(
            Rung(
                id=table["id"],
                title=table["title"],
                patch=patch,
                kind=table["kind"],
                reference=table["reference"],
                published=table["published"],
                published_speedup=None if speedup is None else float(speedup),
            )
        )
    return Ladder(
        name=data["name"],
        title=data["title"],
        reference=data["reference"],
        target_loss=float(data["target_loss"]),
        p_value=float(data["p_value"]),
        base_surface=data["base_surface"],
        root=path.parent,
        rungs=tuple(rungs),
    )


def surface_fingerprint(repo: Path) -> str:
    """sha256 over the Python files of the research surface (model/, kernels/) in `repo`:
    every *.py file there that git tracks or that is present, sorted by path, each hashed as
    its path and its content (a tracked file that is missing counts as such)."""
    repo = Path(repo)
    paths = {
        p.relative_to(repo).as_posix()
        for d in SURFACE_DIRS
        for p in (repo / d).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    proc = subprocess.run(
        ["git", "ls-files", "-z", "--", *SURFACE_DIRS],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    if proc.returncode == 0:  # not a git repository: the files present are all there is
        paths |= {p for p in proc.stdout.split("\0") if p.endswith(".py")}
    digest = hashlib.sha256()
    for rel in sorted(paths):
        file = repo / rel
        content = file.read_bytes() if file.is_file() else b"<missing>"
        digest.update(rel.encode() + b"\0" + hashlib.sha256(content).digest())
    return digest.hexdigest()
