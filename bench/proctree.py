"""A sandbox's processes as the kernel shows them to the trusted harness: the tree under a
worker's root process, the CPU seconds of each process and thread, and the signals that
freeze the tree (SIGSTOP) while the harness evaluates, thaw it, and end it.

Every number and every pid here comes from /proc: the harness asks the candidate nothing
about its own processes. Freezing is checked, not assumed: `freeze` returns only once no
new process appears and each one is stopped, and `thaw` reports the signals found
pending that nobody in the harness sent (a signal from outside the sandbox).

What this module must never do: signal a process outside the tree it was given, or take a
worker's word for its CPU time, its processes or its state.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

FREEZE_WAIT_S = 5.0
# Pending signals a frozen process may legitimately have: a child of its own stopped or
# continued (SIGCHLD), and our own SIGCONT racing the check.
ALLOWED_PENDING = {signal.SIGCHLD, signal.SIGCONT}


class StillRunning(RuntimeError):
    """The tree could not be frozen in FREEZE_WAIT_S: `pids` still run."""

    def __init__(self, pids: list[int]):
        super().__init__(f"processes {pids} still run")
        self.pids = pids


def tree(root: int) -> list[int]:
    """The process `root` and all its descendants (for a worker: bwrap and what it runs)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children")
                         .read_text().split()]
            except OSError:
                pass
    return out


def cpu_times(pids: list[int]) -> dict:
    """CPU seconds of the processes, as the kernel counts them: {pid: (process total with
    its reaped children, {tid: thread})}; a process gone meanwhile is left out."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            fields = _stat_fields(Path(f"/proc/{pid}/stat"))
            threads = {}
            for tid in os.listdir(f"/proc/{pid}/task"):
                task = _stat_fields(Path(f"/proc/{pid}/task/{tid}/stat"))
                threads[int(tid)] = (int(task[11]) + int(task[12])) / tick
        except (OSError, IndexError):
            continue  # gone meanwhile
        out[pid] = (sum(int(f) for f in fields[11:15]) / tick, threads)
    return out


def extra_cpu(before: dict, after: dict, threads: int) -> tuple[float, float]:
    """(all CPU seconds, CPU seconds beyond each process's `threads` busiest threads)
    between two `cpu_times` readings. Judged by threads, not by CPU against wall time: on a
    busy machine an extra thread gets less than a core, but it still shows as a thread."""
    total = extra = 0.0
    for pid, (process, tasks) in after.items():
        was_process, was_tasks = before.get(pid, (0.0, {}))
        used = process - was_process
        per_thread = sorted((t - was_tasks.get(tid, 0.0) for tid, t in tasks.items()),
                            reverse=True)
        total += used
        extra += max(0.0, used - sum(per_thread[:threads]))
    return total, extra


def freeze(root: int, wait_s: float = FREEZE_WAIT_S) -> list[int]:
    """SIGSTOP every process of the tree, until no new one appears and each is stopped;
    returns the pids stopped. StillRunning when that takes longer than `wait_s`."""
    deadline = time.monotonic() + wait_s
    stopped: set[int] = set()
    while True:
        pids = tree(root)
        for pid in set(pids) - stopped:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            stopped.add(pid)
        if set(tree(root)) <= stopped and all(map(_is_stopped, pids)):
            return sorted(stopped)
        if time.monotonic() > deadline:
            raise StillRunning([p for p in pids if not _is_stopped(p)])
        time.sleep(0.001)


def thaw(pids: list[int]) -> list[str]:
    """SIGCONT the frozen processes; returns what was found pending for them while frozen
    beyond ALLOWED_PENDING (a signal nobody in the harness sent), one line a process."""
    found = []
    for pid in pids:
        extra = _pending(pid) - ALLOWED_PENDING
        if extra:
            found.append(f"pid {pid}: {sorted(getattr(s, 'name', str(s)) for s in extra)}")
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    return found


def kill(root: int) -> None:
    """SIGKILL every process of the tree (unconfined, --no-sandbox, a worker's children too)."""
    for pid in tree(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _stat_fields(path: Path) -> list[str]:
    """The fields of a /proc stat file after the command name (which may hold spaces)."""
    return path.read_text().rsplit(")", 1)[1].split()


def _is_stopped(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # gone
    return state in ("T", "t", "Z", "X")


def _pending(pid: int) -> set[signal.Signals]:
    """Signals pending for the process (its own and its thread group's)."""
    found: set[signal.Signals] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            lines = Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith(("SigPnd:", "ShdPnd:")):
                mask = int(line.split()[1], 16)
                for n in range(1, 65):
                    if mask >> (n - 1) & 1:
                        try:
                            found.add(signal.Signals(n))
                        except ValueError:
                            found.add(n)  # a real-time signal without a name
    return found
