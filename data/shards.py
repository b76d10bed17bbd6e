"""The token shard format of llm.c and modded-nanogpt.

A shard is a header of 256 little-endian int32 (magic, version, token count, then zeros)
followed by the tokens as uint16 little-endian. The public GPT-2 FineWeb shards use this
format, so they load unchanged. This module must never hold a whole shard in RAM to read
it (shards are memory-mapped) and must never accept a shard whose header and size disagree.
"""

from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from data.cache import DataMissingError, atomic_write, dataset_dir, load_meta, prepare_command

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKEN = np.iinfo(np.uint16).max


class ShardError(ValueError):
    """A shard file that is not in the expected format, or tokens that cannot be stored."""


def _rebuild_hint(path: Path) -> str:
    # Shards live in cache_dir()/NAME, so the parent directory names the dataset.
    return f"re-run `{prepare_command(path.parent.name)} --force`"


def write_shard(path: Path, tokens: ArrayLike) -> None:
    """Write `tokens` (1-D integers in [0, 65535]) as a shard, atomically."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ShardError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ShardError(f"{path}: tokens must be integers, got dtype {tokens.dtype}")
    if tokens.size and tokens.dtype != np.uint16:
        bad = np.flatnonzero((tokens < 0) | (tokens > MAX_TOKEN))
        if bad.size:
            i = int(bad[0])
            raise ShardError(
                f"{path}: token {int(tokens[i])} at index {i} does not fit in uint16 "
                f"[0, {MAX_TOKEN}]; a vocabulary above 65536 needs another shard format"
            )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    with atomic_write(path) as f:
        f.write(header.tobytes())
        f.write(np.ascontiguousarray(tokens, dtype="<u2").data)


def read_header(path: Path) -> int:
    """The token count of the shard at `path`, after checking magic, version and file size."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(
            f"{path}: the file holds {size} bytes, less than the {HEADER_BYTES}-byte header; "
            f"it is truncated or not a shard: {_rebuild_hint(path)}"
        )
    header = np.fromfile(path, dtype="<i4", count=3)
    magic, version, count = (int(v) for v in header)
    if magic != MAGIC:
        raise ShardError(
            f"{path}: magic number {magic}, expected {MAGIC}; this is not an llm.c token "
            f"shard: {_rebuild_hint(path)}"
        )
    if version != VERSION:
        raise ShardError(
            f"{path}: shard version {version}, only version {VERSION} (uint16 tokens) is "
            f"supported: {_rebuild_hint(path)}"
        )
    held = (size - HEADER_BYTES) / 2
    if held != count:
        raise ShardError(
            f"{path}: header says {count} tokens but the file holds {held:g}; the file is "
            f"truncated or corrupt: {_rebuild_hint(path)}"
        )
    return count


def read_shard(path: Path) -> np.ndarray:
    """The tokens of the shard at `path` as a read-only uint16 memory map (costs no RAM)."""
    count = read_header(path)
    if count == 0:
        # mmap cannot map zero bytes.
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


def check_whole(name: str) -> None:
    """Every file of the prepared dataset `name` is there, readable and whole (the shards'
    headers against their sizes): DataMissingError, ShardError or ValueError say what is
    not, and the command that rebuilds it."""
    import os

    meta = load_meta(name)
    root = dataset_dir(name)
    files = [root / f for split in meta["splits"].values() for f in split]
    files += [root / meta[key] for key in ("tokenizer", "token_bytes") if meta.get(key)]
    for path in files:
        if not path.is_file() or not os.access(path, os.R_OK):
            raise DataMissingError(f"{path} is missing or unreadable; rebuild the dataset "
                                   f"with `{prepare_command(name)} --force`")
        if path.suffix == ".bin":
            read_header(path)
