"""Statistics of a leaderboard replay, from lists of run results (the judge's result dicts).

Per rung: the times of its runs and of its predecessor's (interleaved with them, so drift
of the machine hits both), the measured speedup as a ratio of geometric means with a
Welch confidence interval on the log times, and the leaderboard's loss test on the rung's
final val losses (agent.judge.loss_test). Pure functions, so the tests check coverage and
the verdicts on simulated replays.

What it must never do: invent a number from too few runs (an interval needs two runs a
side, a loss test two runs; with fewer the answer is None or "n/a"), or read anything but
the result dicts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agent.judge import LossTest, loss_test

CONFIDENCE = 0.95  # of the speedup's and the time's intervals


@dataclass(frozen=True)
class Times:
    """The measured times (seconds) of one side's ok runs."""

    values: tuple[float, ...]
    missed: int  # ok runs that stopped short of the target: their train_seconds count
    failed: int  # runs that did not finish ok (crash, timeout, ...)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def sd(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if self.n >= 2 else None

    @property
    def geomean(self) -> float | None:
        return math.exp(np.mean(np.log(self.values))) if self.values else None

    def interval(self, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
        """A t-interval of the geometric mean (on the log times); None with one run."""
        from scipy import stats

        if self.n < 2:
            return None
        logs = np.log(self.values)
        half = stats.t.ppf(0.5 + confidence / 2, self.n - 1) * logs.std(ddof=1) / math.sqrt(self.n)
        return math.exp(logs.mean() - half), math.exp(logs.mean() + half)


def times(results: Sequence[dict]) -> Times:
    """A run's time is its time to the target, or its training time when it has none (it
    missed the target, or ran without one): a lower bound on its time to the target."""
    values, missed, failed = [], 0, 0
    for r in results:
        if r.get("status") != "ok":
            failed += 1
            continue
        value = r.get("time_to_target")
        if value is None:
            missed += 1
            value = r.get("train_seconds")
        if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
            values.append(float(value))
        else:
            failed += 1  # an ok run without a usable time measured nothing
    return Times(tuple(values), missed, failed)


@dataclass(frozen=True)
class Speedup:
    ratio: float  # geometric mean of the predecessor's times / the rung's: > 1 is faster
    ci_low: float | None  # Welch interval on the log times; None with fewer than 2 runs a side
    ci_high: float | None
    p_value: float | None  # one-sided Welch, H0: the rung is no faster


def speedup(pred: Times, rung: Times, confidence: float = CONFIDENCE) -> Speedup | None:
    """How much faster the rung ran than its predecessor; None when a side has no time."""
    from scipy import stats

    if not pred.values or not rung.values:
        return None
    a, b = np.log(pred.values), np.log(rung.values)
    ratio = math.exp(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Speedup(ratio, None, None, None)
    if a.std() == 0.0 and b.std() == 0.0:  # a deterministic benchmark: no spread to test
        return Speedup(ratio, ratio, ratio, 0.0 if ratio > 1.0 else 1.0)
    test = stats.ttest_ind(a, b, equal_var=False, alternative="greater")
    low, high = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence)
    return Speedup(ratio, math.exp(low), math.exp(high), float(test.pvalue))


@dataclass(frozen=True)
class RungStats:
    pred: Times
    rung: Times
    speedup: Speedup | None
    loss: LossTest  # on the rung's ok runs, against the target at the leaderboard's p-value
    loss_delta: float | None  # the rung's mean final val loss minus its predecessor's


def rung_stats(
    pred_results: Sequence[dict],
    rung_results: Sequence[dict],
    target: float,
    p_value: float,
    waived: bool = False,
) -> RungStats:
    """Everything the replay's table says about one rung, from its runs and its
    predecessor's (the interleaved ones of the same step)."""
    pred, rung = times(pred_results), times(rung_results)
    losses = _losses(rung_results)
    pred_losses = _losses(pred_results)
    delta = None
    if losses and pred_losses:
        delta = float(np.mean(losses) - np.mean(pred_losses))
    test = loss_test(losses, target, p_value, waived=waived)
    return RungStats(pred, rung, speedup(pred, rung), test, delta)


def _losses(results: Sequence[dict]) -> list[float]:
    return [
        float(r["val_loss"])
        for r in results
        if r.get("status") == "ok" and isinstance(r.get("val_loss"), (int, float))
    ]
