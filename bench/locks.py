"""Device locks: one benchmark at a time per CPU or GPU of this machine.

Every process that times training holds the lock of its device for the whole run: a
session's runner, and `python train.py` started by hand, so that a run never shares its
CPU or GPU with another benchmark and distorts its clock. The lock is an flock, which the
kernel releases when its holder dies, even by kill -9. It must never be held while waiting
on another lock in a different order (multi-GPU runs take theirs in index order).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

LOCKS_ENV = "SPEEDLOOP_LOCKS"
# Set by a runner for the harness it starts while it holds the device's lock itself.
LOCK_HELD_ENV = "SPEEDLOOP_LOCK_HELD"


@dataclass
class DeviceLock:
    path: Path
    waited_s: float  # 0.0 when the lock was free
    holder: str  # what the lock file said about the previous holder, when we had to wait


def lock_path(device: str, gpu_index: int | None = None) -> Path:
    """The file of a device's lock (it says who holds it): a GPU's by its index; the CPU's,
    or with an index one core's (a slot of `--devices cpu:N` holds its own cores')."""
    if device == "cpu":
        name = "cpu.lock" if gpu_index is None else f"cpu-core{gpu_index}.lock"
    elif device == "cuda":
        name = f"gpu{0 if gpu_index is None else gpu_index}.lock"
    else:
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'")
    return locks_dir() / name


def locks_dir() -> Path:
    """This machine's folder of lock files: one per host under ~/.cache/speedloop/locks
    ($SPEEDLOOP_LOCKS overrides the root), because a home shared by the nodes of a cluster
    (NFS, Lustre) may make an flock cluster-wide: GPU 0 of one node must not wait for GPU
    0 of another."""
    root = Path(os.environ.get(LOCKS_ENV) or "~/.cache/speedloop/locks").expanduser()
    return root / socket.gethostname()


@contextlib.contextmanager
def device_lock(
    device: str, gpu_index: int | None = None, announce: Callable[[str], None] | None = None,
    shared: bool = False,
) -> Iterator[DeviceLock]:
    """Hold the machine-wide lock of one device (blocking until it is free; `announce` is
    told who holds it before the wait begins).

    An flock on a file under ~/.cache/speedloop/locks/HOST ($SPEEDLOOP_LOCKS overrides the
    root): the kernel releases it when its holder dies, even by kill -9, so a crashed
    session never leaves a device locked. Sessions of different users share it only through a common
    $SPEEDLOOP_LOCKS. A `shared` holder excludes only exclusive ones (see `slot_locks`).
    """
    path = lock_path(device, gpu_index)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        waited_s, holder = 0.0, ""
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "holder unknown"
            if announce is not None:
                announce(holder)
            t = time.monotonic()
            fcntl.flock(f, mode)
            waited_s = time.monotonic() - t
        try:
            if not shared:  # say who holds it, for the log line of whoever waits next
                f.truncate(0)
                f.write(f"held by pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                f.flush()
            yield DeviceLock(path, waited_s, holder)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def slot_locks(device: str, gpus: Sequence[int] = (), cores: Sequence[int] = ()
               ) -> Iterator[DeviceLock]:
    """Every lock one run needs, always taken in one order so that two runs can never each
    wait on the other: on CUDA each of its GPUs' in index order (all `gpus`, or GPU 0);
    on the CPU the whole CPU's, or, for a run pinned to `cores` (a slot of `--devices
    cpu:N`), the CPU's shared with other slots and then each core's: slots run side by
    side, and a run of the whole CPU (by hand, or a one-slot session) waits for all of
    them. Yields the lock that was waited for longest."""
    if device == "cuda":
        wanted = [("cuda", i, False) for i in (sorted(gpus) or [0])]
    else:
        wanted = [("cpu", None, bool(cores))] + [("cpu", c, False) for c in sorted(cores)]
    with contextlib.ExitStack() as stack:
        locks = [stack.enter_context(device_lock(d, i, shared=shared))
                 for d, i, shared in wanted]
        yield max(locks, key=lambda lock: lock.waited_s)
