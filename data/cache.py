"""Where prepared datasets live, and how files are written there.

Every dataset is a directory `cache_dir()/NAME` holding shards, the tokenizer and
`meta.json`. Prepared data lives outside the worktrees so that all experiments share one
copy. This module must never build data: it only locates it, and it names the exact
`python -m data prepare ...` command whenever something is missing.
"""

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

ENV_VAR = "SPEEDLOOP_DATA"
META_FILE = "meta.json"
# A dataset name becomes a directory name: no separators, no leading dot.
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class DataMissingError(FileNotFoundError):
    """A dataset that has not been prepared (or not completely); the message says how to."""


def cache_dir() -> Path:
    """The root of all prepared datasets: $SPEEDLOOP_DATA if set, else ~/.cache/speedloop."""
    return Path(os.environ.get(ENV_VAR) or "~/.cache/speedloop").expanduser()


def dataset_dir(name: str) -> Path:
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"dataset name {name!r} is not a plain directory name: use letters, digits, "
            "'.', '_' and '-' only (e.g. 'embedded', 'fineweb', 'my-notes')"
        )
    return cache_dir() / name


def prepare_command(name: str) -> str:
    """The command that (re)builds the dataset `name`."""
    if name == "embedded":
        return "python -m data prepare embedded"
    if name == "fineweb":
        return "python -m data prepare fineweb --shards N"
    if name == "text":
        return "python -m data prepare text PATH..."
    return f"python -m data prepare text PATH... --name {name}"


def load_meta(name: str) -> dict:
    """The dataset's meta.json; DataMissingError naming the prepare command if absent."""
    path = dataset_dir(name) / META_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataMissingError(
            f"dataset {name!r} is not prepared: {path} does not exist. "
            f"Run `{prepare_command(name)}` (set ${ENV_VAR} to use another cache than "
            f"{cache_dir()})"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        # meta.json is written atomically and last, so a broken one was edited by hand.
        raise DataMissingError(
            f"{path} is not valid JSON ({e}); rebuild the dataset with "
            f"`{prepare_command(name)} --force`"
        ) from None


@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path`; it replaces `path` only if the block succeeds.

    A killed process leaves either the old file or the new one, never half of one.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
