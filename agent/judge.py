"""The statistical judge: decides from benchmark results whether a candidate beats the champion.

One candidate is judged sequentially. Its first run is a screen: failures and clear losers
stop there. A promising candidate gets confirmation replicates (fresh seeds) and, after
each one, `assess` answers "accept", "reject" or "more". Accepting needs both a
significant speed gain on the log of the primary metric (one-sided Welch t-test) and a
validation loss that is not worse than the champion's beyond `loss_margin` (one-sided
non-inferiority test). The repeated looks at the data share one boundary (Pocock's kind,
calibrated for Welch's test), so a candidate no better than the champion is accepted at
most with probability `alpha` however many replicates it gets. agent/simulate.py measures that
rate, the power and the runs per decision.

Per objective the primary metric is time_to_target (time-to-loss, lower is better),
tokens_per_sec (throughput, higher) or val_loss (loss-at-time, lower); the effect is always
a ratio > 1 for better, e.g. champion time / candidate time. The loss test is the same for
all three, on the result's final val_loss with an absolute margin in nats: for throughput
that is the loss at equal tokens; for time-to-loss runs stop at the target, so it is the
loss where the target was reached and it only guards against a harness that overshoots.
A candidate run that misses the target (time_to_target None) is rejected like a failure,
but for one whose paired champion run, with its seed, missed it too (that is the seed's).

Runs may come from several device slots (the GPUs of a node, or CPU core groups: a
result's "slot"; a result without one ran on slot "0"), whose devices differ by a few
percent. With the champion on several slots the speed test is blocked by slot
(`stats.blocked`: one offset per slot, fitted with the effect, so a run is compared with
the champion's runs on its own device) and its level is calibrated for that test and the
champion's runs per slot (`blocked_level`). The loss test is blocked only for
loss-at-time, where the loss is the timed metric and so moves with the device. With the
champion on one slot, nothing differs from a judge that knows no slots. Offsets that drift
need no rule of their own (all of the champion's runs count, however old): each slot walks
on its own, which widens the spread within a slot, which the test measures, and does not
bias the effect; in simulation offsets walking 0.3% per run, with champion runs up to 64
runs old, kept false accepts at 1.6% and cost 5 points of power (bench/RESULTS.md). Drift
common to all slots is the one-device case of today, which re-measuring the champion
follows.

Paired runs (`paired`, `--paired`): each candidate run is made back to back with a run of
the champion, on one slot and with one seed, in ABBA order (agent/recording.py), and the
judge tests the pairs' differences (`stats.paired`, a one-sample t, its level calibrated by
`paired_level`). What the two runs of a pair share cancels: the device, the load of that
minute, and the seed's data order and initialisation, which for a change that leaves the
model's arithmetic alone (a kernel, say) is most of a time-to-loss run's noise. A run that a
neighbour slowed skews one pair, not every decision after it. The cost is one champion run
per candidate run; the champion is not re-measured between candidates then.
A candidate's own spread, from 3 or 4 pairs, is a poor estimate: on real runs the pairs'
spread changes with the minute, and three pairs that agree closely made a t with 2 degrees
of freedom read a 3% shift as sure (4 false accepts in 27 A/A decisions, bench/RESULTS.md).
So the spread the test uses never goes below the session's pair noise (`PairNoise`: the
spread of the paired baseline's twin runs and of the other candidates' pairs, each about
its own mean; failing those, the spread of two fresh-seed runs, which only overstates it).
It is judged at the plain t's level: a larger standard error only makes p larger, so the
floored test accepts less often than the plain t whatever the candidate's noise. In a
replay of those real pairs (bench/RESULTS.md) it held false accepts to 0 where the plain t
made 7.7%, at a cost in power at small gains.

What the judge must never do: accept on one run, accept a candidate that has a failed or
unfinished run, look at anything but the result dicts (it trusts the fixed harness, not the
candidate), or quietly widen its own error rate (no extra looks past `max_replicates`, no
tuning of the test to the data).
"""

from __future__ import annotations

import functools
import math
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import special

from agent.stats import (
    OBJECTIVES,
    Diff,
    Run,
    blocked,
    blocked_cells,
    censored_metric,
    first_of_seed,
    number,
    paired,
    primary_metric,
    welch,
    welch_df,
)
from bench.curves import interpolate_target


@dataclass(frozen=True)
class JudgeConfig:
    objective: str = "time-to-loss"  # one of OBJECTIVES; says which result field is the speed
    alpha: float = 0.05  # one-sided false-accept rate for speed, over all looks together
    loss_margin: float = 0.01  # nats: how much worse the mean val loss may be (absolute)
    alpha_loss: float = 0.05  # one-sided error rate of the loss non-inferiority test, all looks
    min_replicates: int = 3  # candidate runs before the first accept look (Welch needs >= 2)
    max_replicates: int = 8  # candidate runs at most; the last look rejects if not accepted
    screen_sigmas: float = 0.5  # a first run worse than the champion by this many noise sds
    # (of the log metric; of val loss past the margin) is rejected without replicates
    # Futility: reject early once the (1 - futility_alpha) upper bound on the speed ratio is
    # below min_speedup, or the lower bound on the loss delta is past the margin. Rejections
    # cannot raise the false-accept rate, so this trades only power for runs; 0.2 saved 0.4
    # runs per neutral candidate in simulation (against 0.05) at no measurable loss of power.
    futility_alpha: float = 0.2
    min_speedup: float = 1.0  # smallest speed ratio worth more runs (1.0: any real gain)
    # Paired runs: each candidate run is made back to back with a champion run on one slot
    # with one seed (agent/recording.py), and the judge compares within pairs (`stats.paired`)
    # instead of against the champion's whole sample.
    paired: bool = False

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r}: choose one of {list(OBJECTIVES)}")
        if not 2 <= self.min_replicates <= self.max_replicates:
            raise ValueError(
                f"replicates min={self.min_replicates} max={self.max_replicates}: need "
                "2 <= min_replicates <= max_replicates (a Welch test needs two runs a side)"
            )
        for name in ("alpha", "alpha_loss", "futility_alpha"):
            if not 0.0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name}={getattr(self, name)}: must be in (0, 0.5)")


@dataclass
class Decision:
    verdict: str  # "accept", "reject" or "more" (run another replicate with a fresh seed)
    reason: str  # one human sentence
    effect: float | None  # ratio of geometric means, > 1 is better (champion / candidate time)
    ci_low: float | None  # repeated confidence interval on the ratio, valid at every look
    ci_high: float | None
    p_value: float | None  # one-sided, H0: no speed gain
    p_value_loss: float | None  # one-sided, H0: val loss worse by loss_margin or more
    n_champion: int
    n_candidate: int
    loss_delta: float | None  # candidate minus champion mean val loss (nats)


@dataclass(frozen=True)
class PairNoise:
    """The spread of one pair's log difference (`stats.paired`) measured on a session's other
    pairs: the runs' clocks, and whatever a change adds to the seed's noise. The paired test
    uses it as a floor under a candidate's own spread."""

    sd: float
    df: int  # degrees of freedom of the estimate


@dataclass(frozen=True)
class Noise:
    log_metric_sd: float  # std of the log primary metric across replicates: a ratio's noise
    loss_sd: float  # std of the final val loss across replicates (nats)
    n: int  # replicates it was measured on


def slot_of(run: Run) -> str:
    """The device slot a run ran on; a run without one ran on the only slot, "0"."""
    slot = run.get("slot")
    return "0" if slot is None else str(slot)


def twins(runs: Sequence[Run]) -> tuple[list[Run], list[Run]]:
    """(each seed's first ok run, the ok runs made again with a seed before them): a
    paired baseline's pairs of identical code, the session's first measure of its pair
    noise (`pair_noise`)."""
    ok = [r for r in runs if r.get("status") == "ok"]
    first = first_of_seed(ok)
    chosen = {id(r) for r in first}
    return first, [r for r in ok if id(r) not in chosen]


def _champion_samples(runs: Sequence[Run], objective: str
                      ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Signed log metric (higher is better), val loss and slot of the champion's ok runs."""
    ok = first_of_seed(r for r in runs if r.get("status") == "ok")  # a crash says nothing
    if len(ok) < 2:
        raise ValueError(f"champion has {len(ok)} ok runs: need at least 2 to measure noise; "
                         "replicate the baseline before judging candidates")
    sign = OBJECTIVES[objective][1]
    values = [censored_metric(r, objective) for r in ok]
    return (sign * np.log(values), np.array([number(r, "val_loss") for r in ok]),
            [slot_of(r) for r in ok])


def comparable(results: Sequence[dict], config: dict) -> list[dict]:
    """The results the judge compares, under the session's config (a SessionConfig dict).

    Failed runs always count. For time-to-loss, an ok run made without a target (the
    baseline replicates that fixed it) gets its crossing read off its curve, exactly as the
    harness reads it (bench/curves.py; both evaluate on the same schedule); a run made
    with another target does not count. For loss-at-time, only runs with the session's
    time budget count (not the calibration run that fixed it).
    """
    objective = config.get("objective", "time-to-loss")
    if objective == "throughput":
        return list(results)
    if objective == "loss-at-time":
        seconds = config.get("seconds")
        return [r for r in results if r.get("status") != "ok" or r.get("budget_seconds") == seconds]
    target = config.get("target_loss")
    target = None if target is None else round(float(target), 4)
    out = []
    for r in results:
        if r.get("status") != "ok" or r.get("target_loss") == target:
            out.append(r)
        elif r.get("target_loss") is None and target is not None and r.get("curve"):
            # Read the run as if it had stopped where a run with this target stops: at the
            # first evaluation at or under the target, with that evaluation's loss.
            curve = r["curve"]
            reached = [i for i, point in enumerate(curve) if point["val_loss"] <= target]
            stop = reached[0] + 1 if reached else len(curve)
            out.append({
                **r,
                "target_loss": target,
                "time_to_target": interpolate_target(curve, target),
                "val_loss": curve[stop - 1]["val_loss"],
                "curve": curve[:stop],
            })  # fmt: skip
    return out


def measure_noise(runs: Sequence[Run], objective: str = "time-to-loss") -> Noise:
    """Noise of the benchmark from replicates of one recipe (baseline, then the champion).

    Champion re-measurements made during the session are simply appended to `runs`, so the
    estimate sharpens and follows drift of the machine.
    """
    log_metric, loss, _ = _champion_samples(runs, objective)
    return Noise(float(log_metric.std(ddof=1)), float(loss.std(ddof=1)), len(log_metric))


# Candidate noise / champion noise that the sequential level is calibrated for. A candidate
# may well be noisier than the champion (a less stable recipe), and Welch's test is then
# liberal with few runs; 2 covers that at a cost of a few points of power.
NOISE_RATIOS = (1.0, 2.0)


@functools.lru_cache(maxsize=256)
def sequential_level(n_champion: int, looks: tuple[int, ...], alpha: float) -> float:
    """Nominal one-sided level of each look, so that all looks together err with `alpha`.

    This is Pocock's boundary (the same nominal p-value threshold at every look), calibrated
    for the Welch test actually used: with no true difference, the smallest Welch p-value
    over the looks falls below the level in a fraction `alpha` (or less) of 2**16 simulated
    sequences, for each candidate/champion noise ratio in NOISE_RATIOS (fixed seed:
    deterministic; Monte Carlo error on the rate about 2%).
    Why not the textbook normal-theory constant: with three candidate runs Welch's df is
    small and liberal at small levels; with a re-measured champion of 30 runs the textbook
    constant let 6% of A/A candidates through. Why not Bonferroni (alpha / number of looks):
    the looks share most of their runs, so it is far too strict (in simulation 1.9% false
    accepts and 72% power at a gain of twice the noise, against 3.6% and 84% here).
    Screening and futility only ever reject, so they can only lower the false-accept rate.
    """
    rng = np.random.default_rng(12345)
    champ = rng.standard_normal((2**16, n_champion))
    vy = champ.var(axis=1, ddof=1) / n_champion
    unit = rng.standard_normal((2**16, max(looks)))
    levels = []
    for ratio in NOISE_RATIOS:
        p_min = np.ones(len(champ))
        for n in looks:
            cand = ratio * unit[:, :n]
            vx = cand.var(axis=1, ddof=1) / n
            t = (cand.mean(axis=1) - champ.mean(axis=1)) / np.sqrt(vx + vy)
            p_min = np.minimum(p_min, special.stdtr(welch_df(vx, n, vy, n_champion), -t))
        levels.append(np.quantile(p_min, alpha))
    return float(min(levels))


@functools.lru_cache(maxsize=256)
def blocked_level(per_slot: tuple[int, ...], looks: tuple[int, ...], alpha: float) -> float:
    """`sequential_level` for the test blocked by slot (`stats.blocked`), with the champion's
    runs per slot `per_slot` and each candidate run on a uniformly random one of those
    slots, as the scheduler places them: the same Pocock boundary, calibrated the same way
    (2**16 simulated sequences, fixed seed, each noise ratio in NOISE_RATIOS). The blocked
    test pools one noise variance for both sides, so a noisier candidate makes it liberal,
    more so than Welch; the calibration absorbs that.
    """
    trials, slots = 2**16, len(per_slot)
    rng = np.random.default_rng(12345)
    y_on = np.repeat(np.arange(slots), per_slot)[:, None] == np.arange(slots)  # (m, slots)
    champ = rng.standard_normal((trials, len(y_on)))
    ny = np.array(per_slot, float)
    sy = champ @ y_on
    ssy = (champ - (sy / ny) @ y_on.T) ** 2 @ y_on
    unit = rng.standard_normal((trials, max(looks)))
    x_on = rng.integers(slots, size=unit.shape)[..., None] == np.arange(slots)  # (T, n, slots)
    nx = np.cumsum(x_on, axis=1, dtype=float)  # the cells after each run
    levels = []
    for ratio in NOISE_RATIOS:
        cand = ratio * unit[..., None] * x_on
        sx, sqx = np.cumsum(cand, axis=1), np.cumsum(cand**2, axis=1)
        p_min = np.ones(trials)
        for n in looks:
            ssx = sqx[:, n - 1] - sx[:, n - 1] ** 2 / np.maximum(nx[:, n - 1], 1)
            effect, var, df, _ = blocked_cells(nx[:, n - 1], sx[:, n - 1], ssx, ny, sy, ssy)
            p_min = np.minimum(p_min, special.stdtr(df, -effect / np.sqrt(var)))
        levels.append(np.quantile(p_min, alpha))
    return float(min(levels))


def floored(diff: Diff, n: int, floor: PairNoise) -> Diff:
    """The paired difference of `n` pairs with its standard error never below the floor's,
    `floor.sd / sqrt(n)`, on the pairs' own n - 1 degrees of freedom. Judged at the plain
    t's level (`paired_level`), it can only accept less often than the plain t, whatever
    the candidate's noise. A floor of 0 degrees of freedom floors nothing (the plain t, as
    agent/simulate.py's replay compares)."""
    se = floor.sd / math.sqrt(n)
    if floor.df == 0 or diff.se >= se:
        return diff
    return Diff(diff.estimate, se, n - 1.0)


@functools.lru_cache(maxsize=64)
def paired_level(looks: tuple[int, ...], alpha: float) -> float:
    """`sequential_level` for the paired test (`stats.paired`): the same Pocock boundary for
    a one-sample t on the pairs' differences, calibrated the same way (2**16 simulated
    sequences, fixed seed). The differences of independent pairs are alike whatever the
    two sides' noises, and t does not depend on their scale, so one calibration covers
    every noise ratio. The floor (`floored`) only makes p larger, so the same level holds
    for the floored test at any ratio of the candidate's noise to the floor's."""
    rng = np.random.default_rng(12345)
    d = rng.standard_normal((2**16, max(looks)))
    p_min = np.ones(len(d))
    for n in looks:
        t = d[:, :n].mean(axis=1) / (d[:, :n].std(axis=1, ddof=1) / math.sqrt(n))
        p_min = np.minimum(p_min, special.stdtr(n - 1, -t))
    return float(np.quantile(p_min, alpha))


def pair_differences(champion_runs: Sequence[Run], candidate_runs: Sequence[Run],
                     objective: str = "time-to-loss") -> np.ndarray:
    """The log differences (candidate better: positive) of a candidate's ok runs with the
    champion's ok run of the same seed, where both have the metric (a run that missed the
    target has none: its training time would read as a huge difference)."""
    sign = OBJECTIVES[objective][1]
    partner = {r.get("seed"): r for r in champion_runs if r.get("status") == "ok"}
    out = []
    for r in candidate_runs:
        mate = partner.get(r.get("seed"))
        if mate is None or r.get("status") != "ok" or slot_of(mate) != slot_of(r):
            continue  # a pair made on two slots (a lost run made again) has their gap in it
        x, y = primary_metric(r, objective), primary_metric(mate, objective)
        if x is not None and y is not None and x > 0 and y > 0:
            out.append(sign * (math.log(x) - math.log(y)))
    return np.asarray(out, float)


def fresh_seed_floor(champion_runs: Sequence[Run], objective: str = "time-to-loss"
                     ) -> PairNoise:
    """The floor without any pairs measured yet: the spread of a difference of two of the
    champion's fresh-seed runs. Sharing a seed only takes noise away, so it overstates a
    pair's (several times, for a change that leaves the arithmetic alone)."""
    noise = measure_noise(champion_runs, objective)
    return PairNoise(math.sqrt(2) * noise.log_metric_sd, noise.n - 1)


def pair_noise(judged: Iterable[tuple[Sequence[Run], Sequence[Run]]],
               objective: str = "time-to-loss") -> PairNoise | None:
    """The session's pair noise from other candidates' runs, each (its champion's runs, its
    own runs): the spread of each candidate's pair differences about its own mean, pooled.
    None before any candidate has two pairs."""
    squares, df = 0.0, 0
    for champion_runs, candidate_runs in judged:
        d = pair_differences(champion_runs, candidate_runs, objective)
        if len(d) > 1:
            squares += float(((d - d.mean()) ** 2).sum())
            df += len(d) - 1
    return PairNoise(math.sqrt(squares / df), df) if df else None


_calibrating = threading.Lock()


def _level(champion_slots: Sequence[str], test: str, looks: tuple[int, ...],
           alpha: float) -> float:
    """The nominal level of each look for the test in use: Welch's (champion's sample size
    alone), the blocked test's (the champion's runs per slot) or the paired test's. One
    calibration at a time: candidates judged in parallel threads often ask for the same
    one at once."""
    with _calibrating:
        if test == "paired":
            return paired_level(looks, alpha)
        if test == "welch":
            return sequential_level(len(champion_slots), looks, alpha)
        return blocked_level(tuple(sorted(Counter(champion_slots).values())), looks, alpha)


def _paired(champion_runs: Sequence[Run], candidate_runs: Sequence[Run],
            metric: np.ndarray, losses: Sequence[float], objective: str,
            floor: PairNoise | None):
    """The paired tests of speed and loss: each candidate run against the champion's ok run
    of the same seed (its partner, made beside it), how many candidate runs have none (a
    partner that crashed, or was never made: a killed session), how many are pairs that both
    missed the target, and the speed's floor. Without the session's pair noise, the noise
    of a difference of two fresh-seed runs (from the champion's spread) is the floor. A lone
    pair (a screen) borrows that noise too, for speed and loss."""
    sign = OBJECTIVES[objective][1]
    partner = {r.get("seed"): r for r in champion_runs if r.get("status") == "ok"}
    at = [i for i, r in enumerate(candidate_runs) if r.get("seed") in partner]
    timed = [i for i in at if not math.isnan(metric[i])]  # not a pair that both missed
    mates = [partner[candidate_runs[i]["seed"]] for i in at]
    noise = measure_noise(champion_runs, objective)
    lone_df = noise.n - 1.0
    floor = floor or fresh_seed_floor(champion_runs, objective)
    y = sign * np.log([censored_metric(partner[candidate_runs[i]["seed"]], objective)
                       for i in timed])
    y_loss = [number(r, "val_loss") for r in mates]  # checked by _champion_samples
    lone = math.sqrt(2) * noise.log_metric_sd  # a screen's: it only rejects a clear loser
    speed = paired(metric[timed], y, lone, lone_df)
    if speed is not None and len(timed) > 1:
        speed = floored(speed, len(timed), floor)
    loss = paired(np.asarray(losses)[at], y_loss, math.sqrt(2) * noise.loss_sd, lone_df)
    return speed, loss, len(candidate_runs) - len(at), len(at) - len(timed), floor


def _reject(reason: str, n_champion: int, n_candidate: int) -> Decision:
    return Decision("reject", reason, None, None, None, None, None, n_champion, n_candidate, None)


def assess(champion_runs: Sequence[Run], candidate_runs: Sequence[Run],
           config: JudgeConfig | None = None, pairs: PairNoise | None = None) -> Decision:
    """Judge a candidate from all its runs so far against the champion's sample.

    Call it after every candidate run; on "more", run one more replicate with a fresh seed
    and call again with all runs. Champion re-measurements may be appended to
    `champion_runs` between calls: the noise estimate and the level follow its size.
    With paired runs, `pairs` is the session's pair noise (`pair_noise` of the other
    candidates), the floor under this candidate's spread.
    """
    cfg = config or JudgeConfig()
    champ_metric, champ_loss, champ_slots = _champion_samples(champion_runs, cfg.objective)
    m, n = len(champ_metric), len(candidate_runs)
    if n == 0:
        return Decision("more", "no candidate run yet: run the screen", None, None, None, None,
                        None, m, 0, None)
    seeds = [r["seed"] for r in candidate_runs if r.get("seed") is not None]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"candidate seeds {seeds} repeat: each replicate needs a fresh seed")

    sign, values, losses = OBJECTIVES[cfg.objective][1], [], []
    partner = ({r.get("seed"): r for r in champion_runs if r.get("status") == "ok"}
               if cfg.paired else {})
    for r in candidate_runs:
        if r.get("status") == "early-stopped":
            return _reject(f"run with seed {r.get('seed')} fell behind the champion and was "
                           "stopped early", m, n)
        if r.get("status") != "ok":
            return _reject(f"run with seed {r.get('seed')} failed: {r.get('status')}", m, n)
        try:
            value = primary_metric(r, cfg.objective)
            losses.append(number(r, "val_loss"))
        except ValueError as err:
            return _reject(f"invalid result: {err}", m, n)
        if value is None and cfg.paired:
            mate = partner.get(r.get("seed"))
            if mate is None or primary_metric(mate, cfg.objective) is None:
                # Its partner, the champion with the same seed, missed the target too: the
                # seed's, not the candidate's, so no failure, and no time to compare either.
                # (No partner yet, after a stop: it is made next, and then this is decided.)
                values.append(math.nan)
                continue
        if value is None:
            # Treated as a failure: a run that cannot reach the target within the harness's
            # time cap is no speedup, whatever its other runs say.
            return _reject(f"run with seed {r.get('seed')} did not reach the target loss", m, n)
        values.append(value)
    looks = tuple(range(cfg.min_replicates, cfg.max_replicates + 1))
    if cfg.paired:
        speed, loss, unmatched, untimed, floor = _paired(
            champion_runs, candidate_runs, sign * np.log(values), losses, cfg.objective, pairs)
        level = _level(champ_slots, "paired", looks, cfg.alpha)
        # The loss test has no floor: with one seed a pair's two losses are often equal.
        level_loss = _level(champ_slots, "paired", looks, cfg.alpha_loss)
        m = n - unmatched - untimed  # the champion's runs that measure the effect
        missing = "measures a time beside a champion run of its seed"
        left_out = "runs without a champion partner left out"
        source = "the session's pairs" if pairs else "two fresh-seed champion runs"
        floor_note = (f", a pair's noise at least {floor.sd:.2%} ({source}, {floor.df} df)"
                      if floor.df else "")
    else:
        untimed = 0
        slots = [slot_of(r) for r in candidate_runs]
        speed = blocked(sign * np.log(values), champ_metric, slots, champ_slots)
        # A device's offset is a speed: it moves the loss only where the loss is the timed
        # metric (loss-at-time). At a time-to-loss target, or at equal tokens, the loss is
        # the same computation on any device, so Welch's test keeps its degrees of freedom
        # there.
        loss_blocked = cfg.objective == "loss-at-time"
        loss = (blocked(losses, champ_loss, slots, champ_slots) if loss_blocked
                else welch(np.array(losses), champ_loss))
        several = len(set(champ_slots)) > 1
        level = _level(champ_slots, "blocked" if several else "welch", looks, cfg.alpha)
        level_loss = _level(champ_slots, "blocked" if several and loss_blocked else "welch",
                            looks, cfg.alpha_loss)
        # The scheduler measures the champion on every slot first, so this is a safeguard.
        unmatched = sum(slot not in champ_slots for slot in slots)
        missing = "is on a slot where the champion has a run"
        left_out = "runs on slots without a champion run left out"
        floor_note = ""
    if speed is None or loss is None:
        word = "reject" if n >= cfg.max_replicates else "more"
        return Decision(word, f"none of the {n} candidate runs {missing}, so none measures "
                        "the effect", None, None, None, None, None, m, n, None)
    # The two-sided (1 - 2 level) interval is Jennison-Turnbull's repeated confidence
    # interval: its lower end clears 1 exactly when the speed test passes at this look.
    template = Decision(
        "more", "", math.exp(speed.estimate), math.exp(speed.bound(level)),
        math.exp(speed.bound(1.0 - level)), speed.p_above(0.0), loss.p_below(cfg.loss_margin),
        m, n, float(loss.estimate))
    p, p_loss = template.p_value, template.p_value_loss
    ratio = f"speed ratio {template.effect:.3f}"
    ci = (f"{100 * (1 - 2 * level):.0f}% CI {template.ci_low:.3f}-{template.ci_high:.3f}"
          f"{floor_note}")
    dloss = f"val loss {loss.estimate:+.4f} nats (margin {cfg.loss_margin})"

    note = f" ({unmatched} of the {n} {left_out}: they measure no effect)" if unmatched else ""
    if untimed:
        note += (f" ({untimed} of the {n} runs missed the target beside a champion run that "
                 "missed it too: no speed measured)")

    def verdict(word: str, reason: str) -> Decision:
        return replace(template, verdict=word, reason=reason + note)

    if n == 1:  # screen: it only rejects, so it costs no false accepts
        # The noise of what is compared: one run against the champion's mean (a run's own
        # spread), or one pair's difference (borrowed: two runs' spread).
        noise = measure_noise(champion_runs, cfg.objective)
        sd, sd_loss = ((speed.se, loss.se) if cfg.paired
                       else (noise.log_metric_sd, noise.loss_sd))
        if speed.estimate < -cfg.screen_sigmas * sd:
            return verdict("reject", f"screen: {ratio} is worse than the champion by more than "
                           f"{cfg.screen_sigmas} x noise ({sd:.2%})")
        if loss.estimate > cfg.loss_margin + cfg.screen_sigmas * sd_loss:
            return verdict("reject", f"screen: {dloss} is past the margin beyond noise")
        return verdict("more", f"screen passed ({ratio}, {dloss}): confirm with replicates")
    measured = n - unmatched - untimed  # runs that measure the effect: "never accept on one run"
    if measured >= cfg.min_replicates and p < level and p_loss < level_loss:
        return verdict("accept", f"{ratio} ({ci}), p={p:.2g} < {level:.3g}, and {dloss} "
                       f"non-inferior (p={p_loss:.2g}) after {n} runs")
    # Futility is decided on its own one-sided bounds, so the reason quotes those, not the
    # repeated interval above (wider: it may hold the very value futility rules out).
    futile = f"{100 * (1 - cfg.futility_alpha):.0f}%"
    if loss.bound(cfg.futility_alpha) > cfg.loss_margin:
        return verdict("reject", f"{dloss}: its {futile} lower bound "
                       f"{loss.bound(cfg.futility_alpha):+.4f} > {cfg.loss_margin} after {n} runs")
    upper = math.exp(speed.bound(1.0 - cfg.futility_alpha))
    if upper <= cfg.min_speedup:
        return verdict("reject", f"{ratio}: its {futile} upper bound {upper:.3f} <= "
                       f"{cfg.min_speedup:g}, no gain is left plausible after {n} runs")
    if n >= cfg.max_replicates:
        if p < level and p_loss < level_loss:
            return verdict("reject", f"{ratio} ({ci}), p={p:.2g} < {level:.3g}, but only "
                           f"{measured} of the maximum {n} runs measured it")
        if p < level:
            return verdict("reject", f"{ratio} ({ci}), p={p:.2g} < {level:.3g}, but {dloss} "
                           f"not shown non-inferior (p={p_loss:.2g} >= {level_loss:.3g}) after "
                           f"the maximum {n} runs")
        return verdict("reject", f"{ratio} ({ci}), p={p:.2g} >= {level:.3g}: no significant "
                       f"gain after the maximum {n} runs")
    return verdict("more", f"{ratio} ({ci}), p={p:.2g}: not yet conclusive")
