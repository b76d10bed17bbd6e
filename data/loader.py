"""Token windows for training, and whole splits for the evaluator.

The training loader samples random windows of the concatenated shards with a generator
seeded from (seed, rank): the same seed gives the same batches, and each rank of a
multi-GPU run reads its own windows. Shards stay memory-mapped; only the batch is copied.
This module must never let the caller choose which tokens it sees beyond the seed and the
split: the harness owns the data.
"""

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from data.cache import DataMissingError, dataset_dir, load_meta, prepare_command
from data.shards import read_shard


class Loader:
    """Random (x, y) windows of the shards in `files`; y is x shifted left by one token."""

    def __init__(
        self,
        files: list[Path],
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not files:
            raise ValueError("Loader needs at least one shard file, got none")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.files = [Path(f) for f in files]
        self.shards = [read_shard(f) for f in self.files]
        # ends[i] is the global offset one past shard i: windows may span two shards.
        self.ends = np.cumsum([len(shard) for shard in self.shards])
        self.num_tokens = int(self.ends[-1])
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        self.rng = np.random.default_rng([seed, rank])

    def next_arrays(self, batch_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """x, y: int32 numpy arrays (batch_size, seq_len), C-contiguous (numpy only: a
        strided copy in torch costs ten times more on a busy machine)."""
        if self.num_tokens < seq_len + 1:
            raise ValueError(
                f"a window of seq_len + 1 = {seq_len + 1} tokens does not fit in the "
                f"{self.num_tokens} tokens of {[str(f) for f in self.files]}; ask for a "
                "shorter seq_len or prepare a larger corpus"
            )
        starts = self.rng.integers(0, self.num_tokens - seq_len, size=batch_size)
        rows = np.empty((batch_size, seq_len + 1), dtype=np.int32)
        for row, start in zip(rows, starts, strict=True):
            self._read(int(start), row)
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    def next_batch(self, batch_size: int, seq_len: int) -> tuple[Tensor, Tensor]:
        """x, y: int64 (batch_size, seq_len) on the loader's device."""
        x, y = self.next_arrays(batch_size, seq_len)
        cuda = self.device.type == "cuda"
        out = []
        for a in (x, y):
            t = torch.from_numpy(a).to(torch.int64)
            # Pinned memory lets the copy to the GPU run asynchronously.
            out.append(t.pin_memory().to(self.device, non_blocking=True) if cuda else t)
        return out[0], out[1]

    def _read(self, start: int, out: np.ndarray) -> None:
        """Fill `out` with the tokens at global offsets start .. start + len(out)."""
        filled = 0
        shard = int(np.searchsorted(self.ends, start, side="right"))
        while filled < len(out):
            offset = start + filled - (int(self.ends[shard - 1]) if shard else 0)
            piece = self.shards[shard][offset : offset + len(out) - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            shard += 1


def split_files(name: str, split: str) -> list[Path]:
    """The shard paths of one split of a prepared dataset."""
    meta = load_meta(name)
    if split not in meta["splits"]:
        raise ValueError(f"dataset {name!r} has splits {sorted(meta['splits'])}, not {split!r}")
    files = [dataset_dir(name) / f for f in meta["splits"][split]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataMissingError(
            f"dataset {name!r} lists {missing} but they are gone; rebuild it with "
            f"`{prepare_command(name)} --force`"
        )
    return files


def open_split(
    name: str,
    split: str,
    seed: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> Loader:
    """A training Loader over one split of a prepared dataset."""
    return Loader(split_files(name, split), seed, device, rank, world_size)


def read_split_tokens(name: str, split: str) -> np.ndarray:
    """All tokens of one split, concatenated (a memory map when the split is one shard)."""
    shards = [read_shard(f) for f in split_files(name, split)]
    return shards[0] if len(shards) == 1 else np.concatenate(shards)
