"""The statistics of speedloop, in one place: the primary metric of each objective with the
rule for a run that missed its target, Welch's t on two samples, the same comparison
blocked by device slot, the paired t of runs made back to back, the speedup as a ratio of
geometric means with its interval, and the one-sample loss test of a leaderboard. The judge
(agent/judge.py), the replay (agent/rungs.py) and the report (agent/report.py) all use these.

Student's t comes from scipy.special (stdtr, stdtrit): the functions behind scipy.stats.t
without its ~50 us of overhead per call, which would dominate the judge's simulations.

What this module must never do: invent a number from too few runs (an interval needs two
runs a side, a loss test two runs: with fewer the answer is None or "n/a"), or read
anything but the numbers and result dicts it is given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special

Run = Mapping[str, object]  # one train.py result dict

# objective -> (result field of the primary metric, +1 if higher is better else -1)
OBJECTIVES = {
    "time-to-loss": ("time_to_target", -1),
    "throughput": ("tokens_per_sec", +1),
    "loss-at-time": ("val_loss", -1),
}
CONFIDENCE = 0.95  # of the intervals the report and the replay show


def number(run: Run, key: str) -> float:
    """The run's `key` as a positive finite number; ValueError names the seed and value."""
    value = run.get(key)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"result of seed {run.get('seed')}: {key}={value!r} is not a "
                         "positive finite number")
    return float(value)


def primary_metric(run: Run, objective: str) -> float | None:
    """The run's primary number, or None for a time-to-loss run that missed the target."""
    key = OBJECTIVES[objective][0]
    if objective == "time-to-loss" and run.get(key) is None:
        return None
    return number(run, key)


def first_of_seed(runs: Iterable[Run]) -> list[Run]:
    """The runs, each seed's first only: a run made again with the seed of one before it (a
    paired baseline's twin) trains the same and is no fresh sample of the seed's noise."""
    seen: set = set()
    out = []
    for r in runs:
        seed = r.get("seed")
        if seed is None or seed not in seen:
            out.append(r)
        seen.add(seed)
    return out


def censored_metric(run: Run, objective: str) -> float:
    """The primary metric, where a time-to-loss run that missed the target counts with its
    training time: a lower bound on its time to the target. As the champion's (or the
    baseline's, or a replay's) evidence that flatters it, so it is conservative there; a
    candidate's missed target is a failure instead (the judge rejects it)."""
    value = primary_metric(run, objective)
    return number(run, "train_seconds") if value is None else value


# -- Welch's t ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Diff:
    """A difference of means with its standard error and degrees of freedom (Welch)."""

    estimate: float
    se: float
    df: float

    def p_above(self, threshold: float) -> float:
        """One-sided p-value of H0: true difference <= threshold."""
        if self.se == 0.0:  # identical runs (deterministic benchmark): no noise to test against
            return 0.0 if self.estimate > threshold else 1.0
        return float(special.stdtr(self.df, (threshold - self.estimate) / self.se))

    def p_below(self, threshold: float) -> float:
        """One-sided p-value of H0: true difference >= threshold."""
        return Diff(-self.estimate, self.se, self.df).p_above(-threshold)

    def bound(self, level: float) -> float:
        """One-sided confidence bound: upper if level > 0.5, lower if level < 0.5."""
        if self.se == 0.0:
            return self.estimate
        return self.estimate + float(special.stdtrit(self.df, level)) * self.se


def welch_df(vx, nx, vy, ny):
    """Welch-Satterthwaite degrees of freedom from the squared standard errors vx, vy."""
    return (vx + vy) ** 2 / (vx**2 / (nx - 1) + vy**2 / (ny - 1))


def welch(x: np.ndarray, y: np.ndarray) -> Diff:
    """mean(x) - mean(y), Welch's unequal-variance t. A lone x (the screening run) borrows
    y's variance, since one run cannot measure its own spread."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    vy = y.var(ddof=1) / len(y)
    if len(x) == 1:
        vx = y.var(ddof=1)
        return Diff(float(x[0] - y.mean()), math.sqrt(vx + vy), len(y) - 1.0)
    vx = x.var(ddof=1) / len(x)
    if vx + vy == 0.0:
        return Diff(float(x.mean() - y.mean()), 0.0, math.inf)
    return Diff(float(x.mean() - y.mean()), math.sqrt(vx + vy), welch_df(vx, len(x), vy, len(y)))


# -- blocked by device slot ------------------------------------------------------------------


def blocked_cells(nx, sx, ssx, ny, sy, ssy):
    """Least-squares fit of value = slot offset + effect * [x side] + noise, from the cells'
    counts n, sums s and within-cell sums of squares ss (arrays, last axis the slots).

    The fit in closed form: a slot's offset absorbs its mean, so each slot holding both
    sides gives the difference d of its two cell means with weight w = nx ny / (nx + ny)
    (1 / the variance of d, in units of the noise variance); the effect is the w-weighted
    mean of the d, and the residual sum of squares is the cells' own spread plus the d's
    spread around the effect. A slot holding one side only adds its spread, not the effect.
    Returns arrays (effect, variance of the effect, residual df, total weight W); where W
    is 0 nothing measured the effect and where df <= 0 nothing measured the noise: the
    caller decides (these come back as nan, never as an error).
    """
    both = (nx > 0) & (ny > 0)
    w = np.where(both, nx * ny / np.maximum(nx + ny, 1), 0.0)
    d = np.where(both, sx / np.maximum(nx, 1) - sy / np.maximum(ny, 1), 0.0)
    total = w.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        effect = (w * d).sum(axis=-1) / total
        rss = (ssx + ssy).sum(axis=-1) + (w * (d - effect[..., None]) ** 2).sum(axis=-1)
        df = (nx + ny).sum(axis=-1) - ((nx + ny) > 0).sum(axis=-1) - 1.0
        var = rss / df / total
    return effect, np.where(df > 0, var, np.nan), df, total


def blocked(x, y, x_slots: Sequence[str], y_slots: Sequence[str]) -> Diff | None:
    """mean(x) - mean(y) within device slots: the effect of a linear model with one offset
    per slot fitted to both samples together, with its least-squares standard error and
    residual degrees of freedom (Student's t; one noise variance for both sides, so the
    judge calibrates its level for a noisier x, as it does for Welch).

    An x on a slot where y has no run carries no information about the effect (its slot's
    offset would absorb it) and is left out; None when no x is left. When y spans one slot
    this is exactly `welch` (there is no offset to remove, and Welch allows unequal
    variances). When no residual degree of freedom is left (one y per slot and one x: a
    screen), the noise is borrowed from y's spread across slots, as `welch` borrows y's for
    a lone x; that spread includes the offsets, so the borrowed error only overstates.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    slots = sorted(set(y_slots))
    index = {slot: i for i, slot in enumerate(slots)}
    matched = [i for i, slot in enumerate(x_slots) if slot in index]
    if not matched:
        return None
    x, x_at = x[matched], np.array([index[x_slots[i]] for i in matched])
    if len(slots) == 1:
        return welch(x, y)
    y_at = np.array([index[slot] for slot in y_slots])

    def cells(values, at):
        n = np.bincount(at, minlength=len(slots)).astype(float)
        s = np.bincount(at, values, minlength=len(slots))
        ss = np.bincount(at, (values - (s / np.maximum(n, 1))[at]) ** 2, minlength=len(slots))
        return n, s, ss

    effect, var, df, total = blocked_cells(*cells(x, x_at), *cells(y, y_at))
    if df <= 0:
        return Diff(float(effect), math.sqrt(y.var(ddof=1) / total), len(y) - 1.0)
    if var == 0.0:
        return Diff(float(effect), 0.0, math.inf)
    return Diff(float(effect), math.sqrt(var), float(df))


def paired(x, y, lone_se: float, lone_df: float) -> Diff | None:
    """mean(x - y) over pairs (x[i] and y[i] measured back to back on one device with one
    seed): the one-sample t on the differences, n - 1 degrees of freedom. Whatever the two
    runs of a pair share (the seed's data order and initialisation, the device, the
    machine's load of that minute) cancels in its difference. None with no pair; a lone pair
    (a screen) cannot measure its own spread and gets `lone_se` and `lone_df`."""
    d = np.asarray(x, float) - np.asarray(y, float)
    if len(d) == 0:
        return None
    if len(d) == 1:
        return Diff(float(d[0]), lone_se, lone_df)
    se = float(d.std(ddof=1)) / math.sqrt(len(d))
    return Diff(float(d.mean()), se, math.inf if se == 0.0 else len(d) - 1.0)


# -- speedups -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Speedup:
    ratio: float  # geometric mean of the new side over the old one's, > 1 is better
    ci_low: float | None  # Welch interval on the log scale; None with fewer than 2 runs a side
    ci_high: float | None
    p_value: float | None  # one-sided Welch, H0: the new side is no better
    n: int  # runs of the new side that measured it


def speedup(old: Sequence[float], new: Sequence[float], higher_is_better: bool = False,
            confidence: float = CONFIDENCE) -> Speedup | None:
    """How much better the values `new` are than `old` (times, or tokens per second with
    `higher_is_better`), as a ratio of geometric means; None when a side has no value."""
    if len(old) == 0 or len(new) == 0:
        return None
    sign = 1.0 if higher_is_better else -1.0
    x, y = sign * np.log(np.asarray(new, float)), sign * np.log(np.asarray(old, float))
    ratio = math.exp(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return Speedup(ratio, None, None, None, len(x))
    diff, tail = welch(x, y), (1.0 - confidence) / 2
    return Speedup(ratio, math.exp(diff.bound(tail)), math.exp(diff.bound(1.0 - tail)),
                   diff.p_above(0.0), len(x))


def speedup_vs_baseline(baseline: Sequence[dict], results: Sequence[dict],
                        objective: str) -> Speedup | None:
    """How much better `results` are than `baseline` (judge-input dicts, `results_of`).

    A baseline run that missed a time-to-loss target counts with its training time, as the
    judge counts the champion's (`censored_metric`); a candidate run that missed it
    measured no speed and is left out; a paired baseline's twins count once, with their
    replicate. None when either side has no usable run.
    """
    base = metric_values(first_of_seed(baseline), lambda r: censored_metric(r, objective))
    mine = metric_values(results, lambda r: primary_metric(r, objective))
    return speedup(base, mine, higher_is_better=OBJECTIVES[objective][1] > 0)


def metric_values(results: Sequence[dict], metric) -> list[float]:
    """`metric` of each ok run that measured one (a malformed number is left out: the
    runner should have said invalid-result)."""
    values = []
    for r in results:
        if r.get("status") != "ok":
            continue
        try:
            value = metric(r)
        except ValueError:
            continue
        if value is not None:
            values.append(value)
    return values


def geomean_interval(values: Sequence[float],
                     confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """A t-interval of the geometric mean (on the logs); None with fewer than two values."""
    if len(values) < 2:
        return None
    logs = np.log(np.asarray(values, float))
    t = float(special.stdtrit(len(logs) - 1, 0.5 + confidence / 2))
    half = t * logs.std(ddof=1) / math.sqrt(len(logs))
    return math.exp(logs.mean() - half), math.exp(logs.mean() + half)


# -- a leaderboard's loss test --------------------------------------------------------------


@dataclass(frozen=True)
class LossTest:
    verdict: str  # "pass", "fail", "waived", or "n/a" (too few runs to test)
    p_value: float | None  # one-sided, H0: mean val loss >= target; None unless tested
    mean: float | None  # mean final val loss of the runs (nats)
    n: int  # runs tested


def loss_test(
    losses: Sequence[float], target: float, p_value: float, waived: bool = False
) -> LossTest:
    """The leaderboard's loss test: a one-sided t-test that the mean final val loss is at or
    under `target` (H0: it is above), passed when p < `p_value`. `waived` (a systems change
    under rules that waive it) reports the numbers and skips the verdict; with fewer than
    two runs there is no variance to test against, so the verdict is "n/a", never a guess.
    """
    values = np.asarray(list(losses), dtype=float)
    mean = float(values.mean()) if len(values) else None
    if waived:
        return LossTest("waived", None, mean, len(values))
    if len(values) < 2:
        return LossTest("n/a", None, mean, len(values))
    if values.std() == 0.0:  # identical losses: t is infinite (or undefined at the target)
        p = 0.0 if mean < target else 1.0
    else:
        se = values.std(ddof=1) / math.sqrt(len(values))
        p = float(special.stdtr(len(values) - 1, (mean - target) / se))
    return LossTest("pass" if p < p_value else "fail", p, mean, len(values))
