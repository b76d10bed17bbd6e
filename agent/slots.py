"""Slots: where a session's benchmark runs go, one run at a time per slot, all slots at once.

`--devices` names them. Without it a session has one slot, the whole device (one GPU, or
the whole CPU unpinned). `all` is every visible GPU, `0,1,2,5` those GPUs; with `--gpus K`
a slot is K of them (one torchrun per run). On a CPU machine `cpu:N` cuts this process's
cores into N groups, a slot each: its runs are pinned to its cores (the trainer keeps its
one intra-op thread, the evaluator takes the slot's cores), so the slots of a 2-core
machine do not steal from each other the way two unpinned runs do. With `--cluster ray`
the slots are Ray actors on the nodes of a cluster instead (agent/cluster.py makes them;
their runs go to `Slot.remote`).

Every run, whatever takes it (a candidate's screen or confirmation, the champion's
re-measurement, the scorer of an acceptance check), holds its slot from start to end, and
the slot's device locks (bench/locks.py) while it runs. A slot's name ("0", "1", ...; a
Ray slot's "10.0.0.5/gpu0") goes with each run into the ledger, so the judge can compare
runs slot by slot and `status` can say what each slot does. A slot whose Ray worker died is
retired: the session goes on with the others, and stops when none is left.

What this module must never do: give one slot to two runs at once, hand out a device
the session was not given, or a slot it retired.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.config import SessionStop


@dataclass(frozen=True)
class Slot:
    name: str  # "0", "1", ...: how the ledger, the judge and `status` name it
    device: str  # "cpu" or "cuda"
    gpus: tuple[int, ...] = ()  # its physical GPUs (cuda); () on the CPU
    cores: tuple[int, ...] = ()  # its own cores (cpu:N); (): the whole CPU, unpinned
    # A Ray slot (agent/cluster.py RemoteSlot): its runs go to its node. `gpus` and `cores`
    # are then the head's (none: the whole device), for what the head runs on a slot's turn
    # (the acceptance scorer, the profile); the node's own are in its name.
    remote: Any = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        if self.remote is not None:
            return self.remote.describe()
        if self.device == "cuda":
            return f"GPU {','.join(map(str, self.gpus))}"
        return f"cores {','.join(map(str, self.cores))}" if self.cores else "the whole CPU"


def parse_devices(spec: str | None, device: str, gpus_per_slot: int = 1) -> list[Slot]:
    """The slots `--devices spec` names (see the module docstring); ValueError says what is
    wrong with the spec and what would do."""
    if spec is None or spec == "":
        return [Slot("0", device, tuple(range(gpus_per_slot)) if device == "cuda" else ())]
    if spec.startswith("cpu:"):
        if device != "cpu":
            raise ValueError(f"--devices {spec} is for a CPU session; this one runs on "
                             f"{device}: use --devices all or a list of GPUs")
        try:
            n = int(spec[4:])
        except ValueError:
            raise ValueError(f"--devices {spec}: cpu:N needs a number of slots, e.g. "
                             "cpu:2") from None
        cores = sorted(os.sched_getaffinity(0))
        if not 1 <= n <= len(cores):
            raise ValueError(f"--devices {spec}: this machine gives the session "
                             f"{len(cores)} cores, so 1 to {len(cores)} CPU slots")
        size = len(cores) // n  # cores left over stay idle: every slot gets the same
        return [Slot(str(i), "cpu", (), tuple(cores[i * size:(i + 1) * size])) for i in range(n)]
    if device != "cuda":
        raise ValueError(f"--devices {spec} names GPUs, but this session runs on {device}: "
                         "use --devices cpu:N on a CPU")
    visible = visible_gpus()
    if spec == "all":
        gpus = visible
    else:
        try:
            gpus = [int(part) for part in spec.split(",")]
        except ValueError:
            raise ValueError(f"--devices {spec}: use all, a list of GPU indices such as "
                             "0,1,2,5, or cpu:N") from None
        unknown = sorted(set(gpus) - set(visible))
        if unknown or len(set(gpus)) != len(gpus):
            raise ValueError(f"--devices {spec}: GPUs {unknown or 'repeated'} are not among "
                             f"the visible ones {visible}")
    if not gpus or len(gpus) % gpus_per_slot:
        raise ValueError(f"--devices {spec} gives {len(gpus)} GPUs, not a multiple of "
                         f"--gpus {gpus_per_slot} (and at least one slot)")
    return [Slot(str(i), "cuda", tuple(gpus[i * gpus_per_slot:(i + 1) * gpus_per_slot]))
            for i in range(len(gpus) // gpus_per_slot)]


def visible_gpus() -> list[int]:
    """The GPU indices this process may use: CUDA_VISIBLE_DEVICES's count, else what
    nvidia-smi lists (none without a driver)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return list(range(len([v for v in visible.split(",") if v.strip()])))
    if shutil.which("nvidia-smi") is None:
        return []
    done = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                          capture_output=True, text=True)
    return [int(line) for line in done.stdout.split() if line.strip().isdigit()]


class SlotPool:
    """The session's slots, each lent to one run at a time (threads of the engine wait for
    one to be free). What each slot ran, and for how long, is in the ledger's runs."""

    def __init__(self, slots: Sequence[Slot]):
        if not slots:
            raise ValueError("a session needs at least one slot")
        self.slots = list(slots)
        self.retired: list[Slot] = []  # taken out for good (their Ray worker died)
        self._free = list(self.slots)
        self._changed = threading.Condition()

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    @contextlib.contextmanager
    def take(self, name: str | None = None) -> Iterator[Slot]:
        """Hold a free slot (the one named `name`, while the pool has it) until the block
        ends; SessionStop when every slot is retired."""
        def fits(slot: Slot) -> bool:
            return name in (None, slot.name) or name not in self.names

        with self._changed:
            self._changed.wait_for(lambda: not self.slots or any(map(fits, self._free)))
            if not self.slots:
                raise SessionStop(f"every slot of the session is lost ("
                                  f"{', '.join(s.name for s in self.retired)}): their workers "
                                  "died; `python -m agent run --resume D` goes on with new ones")
            slot = next(filter(fits, self._free))
            self._free.remove(slot)
        try:
            yield slot
        finally:
            with self._changed:
                if slot in self.slots:  # at the back: sequential use turns the slots round
                    self._free.append(slot)
                self._changed.notify_all()

    def retire(self, name: str) -> None:
        """Take the slot `name` out of the session for good (its Ray worker died): runs
        wait for the others, or stop the session when none is left."""
        with self._changed:
            self.retired += [s for s in self.slots if s.name == name]
            self.slots = [s for s in self.slots if s.name != name]
            self._free = [s for s in self._free if s.name != name]
            self._changed.notify_all()
