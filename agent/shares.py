"""Where a session's time went: how busy each slot was, and how much of it was timed training.

Both are read from the ledger's finished runs: the runner's wall time of each run, its lock
wait, and the harness's own account of the seconds inside the run (train.py's
`train_seconds` and `untimed`: start-up, evaluation, other). The rest of the run's wall
time is the harness's `other` (checkpoint, probes, teardown) and what it did not count (the
interpreter's start and exit, the runner).

What this module must never do: count a number that a run did not measure, or divide by a
span or a count of zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def slot_busy(runs: Sequence[dict], since: float,
              until: float) -> dict[str, tuple[float, float]]:
    """Per slot: the fractions of the session's time in which a benchmark ran on it, and in
    which one waited for its lock (another process's benchmark had the device: not idle
    time). The rest it idled: waiting on the proposer, the judge, the session's overhead."""
    span, out = until - since, {}
    if span <= 0:
        return {}
    for name in sorted({r.get("slot") or "0" for r in runs}):
        mine = [r for r in runs if (r.get("slot") or "0") == name]
        busy = min(1.0, sum(r["wall_seconds"] or 0.0 for r in mine) / span)
        waited = min(1.0 - busy, sum(r.get("lock_wait_s") or 0.0 for r in mine) / span)
        out[name] = (busy, waited)
    return out


@dataclass(frozen=True)
class TimedShare:
    """Seconds summed over the runs that reported them, and the session's slot time."""

    runs: int
    wall: float  # the runner's wall time of those runs
    train: float  # the harness's clock: timed training
    startup: float  # processes, imports, model build, warm-up
    evaluation: float  # the evaluations, trainer frozen
    slot_seconds: float  # the session's span times its slots

    @property
    def rest(self) -> float:
        """The harness's `other` (checkpoint, probes, teardown), and what it did not count:
        the interpreter's start and exit, the runner."""
        return max(0.0, self.wall - self.train - self.startup - self.evaluation)

    @property
    def share(self) -> float:
        return min(1.0, self.train / self.slot_seconds)

    def text(self) -> str:
        """`timed training was 38% of the slots' time (of a run's 16.1 s on average: training
        7.2 s, start-up 2.8 s, evaluations 2.9 s, the rest 3.2 s)`."""
        def mean(x: float) -> str:
            return f"{x / self.runs:.1f} s"
        return (f"timed training was {self.share:.0%} of the slots' time "
                f"(of a run's {mean(self.wall)} on average: training {mean(self.train)}, "
                f"start-up {mean(self.startup)}, evaluations {mean(self.evaluation)}, "
                f"the rest {mean(self.rest)})")


def timed_share(runs: Sequence[dict], since: float, until: float,
                n_slots: int) -> TimedShare | None:
    """The timed training of `runs` against the session's slot time; None before a run
    reported its seconds (or when the span is empty)."""
    span = (until - since) * max(1, n_slots)
    counted = [r for r in runs if r.get("wall_seconds") and _seconds(r) is not None]
    if span <= 0 or not counted:
        return None
    parts = [_seconds(r) for r in counted]
    return TimedShare(len(counted), sum(r["wall_seconds"] for r in counted),
                      *(sum(p[i] for p in parts) for i in range(3)), span)


def _seconds(run: dict) -> tuple[float, float, float] | None:
    """(train, start-up, evaluation) seconds as the run's result has them, or None."""
    result = run.get("result") or {}
    untimed = result.get("untimed") or {}
    values = (result.get("train_seconds"), untimed.get("startup"), untimed.get("evaluation"))
    if not all(isinstance(v, (int, float)) for v in values):
        return None
    return tuple(float(v) for v in values)
