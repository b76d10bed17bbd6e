"""Was a run disturbed while its clock ran? What the kernel says about the trainer's wait
for a CPU, the hypervisor's steal, and the GPU's throttling, read by the trusted harness.

A CPU run at one thread per trainer is steady on a shared machine until a neighbour
takes its core: then the trainer is ready to run but waits (the kernel's schedstat run
delay), or the hypervisor runs another guest on it (steal). train.py records both over
the timed region in the result's `cpu_usage`; `disturbed(result)` says why a run's time
is not the code's own, or None. The engine re-runs a disturbed run rather than count it
(agent/measure.py), so one slow minute of a neighbour cannot skew every decision after it.

What this module must never do: ask the candidate anything. Every number here comes from
/proc, about processes and CPUs the harness can see.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from bench.telemetry import flagged

# A run is disturbed when, over its timed seconds, its trainer waited for a CPU more than
# this share of the time, or the hypervisor stole more than this share of one CPU.
# Measured on the 2-core VM with other jobs running (bench/RESULTS.md): cpu-tiny runs
# waited 1.4-2.1% of their timed seconds, one 13%, and one beside two more spinning
# processes 35%: its timed seconds rose 1.5 s over a quiet run's, 1.45 s of it the wait.
RUN_DELAY_SHARE = 0.10
STEAL_SHARE = 0.10


def run_delay_seconds(pids: Iterable[int]) -> float:
    """Seconds the threads of `pids` were ready to run but waited for a CPU, summed (the
    second field of /proc/PID/task/TID/schedstat, in nanoseconds). A process or thread
    gone meanwhile counts as zero; without schedstat (a kernel built without it) zero."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return total / 1e9


def steal_seconds() -> float:
    """CPU seconds the hypervisor gave other guests, over all CPUs since boot (the eighth
    number of /proc/stat's `cpu` line, in clock ticks); 0 where there is no such count."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def disturbed(result: dict | None) -> str | None:
    """Why `result`'s timed seconds are not the code's own (its trainer waited for a CPU,
    the VM's CPUs were stolen, its GPU throttled), or None for an undisturbed run or one
    that recorded none of it (an older harness)."""
    if not result:
        return None
    usage, seconds = result.get("cpu_usage") or {}, result.get("train_seconds") or 0.0
    reasons = []
    if seconds > 0:
        delay, steal = usage.get("run_delay_seconds"), usage.get("steal_seconds")
        if isinstance(delay, (int, float)) and delay > RUN_DELAY_SHARE * seconds:
            reasons.append(f"the trainer waited for a CPU {delay:.1f} s of its "
                           f"{seconds:.1f} timed s (a neighbour took its core)")
        if isinstance(steal, (int, float)) and steal > STEAL_SHARE * seconds:
            reasons.append(f"the hypervisor stole {steal:.1f} CPU s in {seconds:.1f} timed s")
    throttled = flagged(result)
    if throttled:
        reasons.append(f"the GPU throttled ({', '.join(throttled)})")
    return "; ".join(reasons) or None
