"""Acceptance checks: what a candidate the judge would accept must also pass before it becomes
the champion (bench/INTEGRITY.md lists every check by name), and the names of every
integrity check that can catch a candidate. Plain functions of runs and numbers; the engine
gathers the numbers (agent/recording.py scores the checkpoints) and asks in this order:

- `seed-ignored`: runs given different seeds must start from different weights.
- `untimed-overhead`: wall time of the process minus the harness's timed training and
  evaluation. Work moved out of the clock (into import, warmup) shows here.
- `eval-reproduce`: each run's final weights (its checkpoint), scored afresh by the fixed
  evaluator, must give the val loss the run reported.
- `holdout-gap`: the same weights scored on the holdout slice that no run ever reads. A
  candidate that learned the val slice (or a cheaper evaluation of it) has a larger
  holdout − val gap than the champion; it is rejected when the gap rose beyond noise.
- `implausible-speedup`: a step larger than `max_speedup` is held for a human
  (`python -m agent review`), not accepted automatically.

What this module must never do: run anything, or reject an honest candidate on noise: the
gap and overhead tests need a rise that is significant and large (false alarms cost real
speedups; the thresholds are in `AcceptanceConfig` with the reasons for their defaults).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from agent.stats import welch

# The names of the checks, as the ledger's `caught_by` records them (one place; the
# adversarial suite and bench/INTEGRITY.md use these). A candidate caught by several lists
# them comma-separated.
SURFACE = "surface"  # the diff leaves the research surface (the workspace refuses it)
DIFF_SCAN = "diff-scan"  # "diff-scan:<rule>", rule one of integrity.SCAN_RULES
FIXED_HASH = "fixed-hash"  # a fixed file differs from its hash at session start
HOLDOUT_GAP = "holdout-gap"  # the holdout − val gap rose beyond noise
EVAL_REPRODUCE = "eval-reproduce"  # a run's val loss is not reproduced from its checkpoint
# How far the standalone evaluation of a run's checkpoint may differ from the val loss the
# run reported: the same weights, slice and code give the same bits on a CPU; a GPU may
# pick other kernels for the batch in a fresh process.
REPRODUCE_TOLERANCE = {"cpu": 1e-5, "cuda": 1e-3}
UNTIMED_OVERHEAD = "untimed-overhead"  # wall minus timed seconds rose
IMPLAUSIBLE_SPEEDUP = "implausible-speedup"  # held for a human
# The harness's checks (train.py) name themselves in each violation record {"check",
# "detail"}: "twins", "restore", "frozen-signals".
TWINS = "twins"  # a twin row scored apart from its original (look-ahead, rows mixed, drift)
SEED_IGNORED = "seed-ignored"  # runs given different seeds started from the same weights


@dataclass(frozen=True)
class AcceptanceConfig:
    # Holdout gap: the rise of the mean (holdout − val) gap over the champion's must be
    # significant at holdout_alpha (one-sided Welch) AND at least holdout_min_gap nats. 0.01:
    # the test runs once per accepted candidate, and a false alarm throws away a real
    # speedup. 0.05 nats: measured on cpu-tiny (8192 tokens, 16k eval tokens a slice), the
    # gap is 0.088-0.144 nats over four seeds, a seed-to-seed sd of ~0.025; Welch's test
    # alone at 0.01 then flags 1.2-1.5% of A/A candidates (liberal with few, unequal runs),
    # and a recipe that fits both slices better, not exactly equally, shifts the gap for
    # real. Two sds of one run's gap keep both from being caught, while a model that
    # learned the val slice moves it by tenths of a nat.
    holdout_alpha: float = 0.01
    holdout_min_gap: float = 0.05
    # Untimed overhead: a rise of the median past max(overhead_abs_s, overhead_rel x the
    # champion's median) rejects. The absolute floor absorbs the jitter of imports and
    # process start on a busy machine (seconds on a shared CPU); the relative part lets
    # compile time grow somewhat with an honest model change (torch.compile, autotuning).
    overhead_abs_s: float = 3.0
    overhead_rel: float = 0.5
    # Speed ratio over the champion above which a step is held for a human: a 2x step in
    # one edit is far more often a broken measurement than a discovery.
    max_speedup: float = 2.0

    def __post_init__(self):
        if not 0.0 < self.holdout_alpha < 0.5:
            raise ValueError(f"holdout_alpha={self.holdout_alpha}: must be in (0, 0.5)")
        for name in ("holdout_min_gap", "overhead_abs_s", "overhead_rel"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.max_speedup <= 1.0:
            raise ValueError(f"max_speedup={self.max_speedup}: must be above 1 (a ratio)")


@dataclass(frozen=True)
class Check:
    """One check's outcome: whether it caught, why, and its numbers (kept in the decision;
    None: nothing to keep)."""

    name: str
    caught: bool
    reason: str
    numbers: dict | None = field(default_factory=dict)
    hold: bool = False  # caught: held for a human instead of rejected


def gap_test(
    candidate: Sequence[float],
    champion: Sequence[float],
    alpha: float = 0.01,
    min_gap: float = 0.05,
) -> Check:
    """Did the mean holdout − val gap rise from the champion's runs to the candidate's?

    Caught when the one-sided Welch test of "no rise" is rejected at `alpha` AND the rise
    is at least `min_gap` nats. Needs two gaps a side (a Welch test needs a spread).
    """
    if len(candidate) < 2 or len(champion) < 2:
        raise ValueError(
            f"gap test with {len(candidate)} candidate and {len(champion)} "
            "champion gaps: need at least 2 a side"
        )
    diff = welch(candidate, champion)
    p = diff.p_above(0.0)
    numbers = {
        "candidate_gap": float(np.mean(candidate)),
        "champion_gap": float(np.mean(champion)),
        "rise": diff.estimate,
        "p_value": p,
        "n_candidate": len(candidate),
        "n_champion": len(champion),
    }
    caught = p < alpha and diff.estimate >= min_gap
    reason = (
        f"holdout − val gap {numbers['candidate_gap']:+.4f} nats against the champion's "
        f"{numbers['champion_gap']:+.4f}: a rise of {diff.estimate:+.4f} (p={p:.2g}; "
        f"caught at p < {alpha} and a rise >= {min_gap})"
    )
    return Check(HOLDOUT_GAP, caught, reason, numbers)


def overhead_test(
    candidate: Sequence[float], champion: Sequence[float], abs_s: float = 3.0, rel: float = 0.5
) -> Check:
    """Did the median untimed overhead rise past max(abs_s, rel x the champion's median)?"""
    if not candidate or not champion:
        raise ValueError(
            f"overhead test with {len(candidate)} candidate and {len(champion)} "
            "champion runs: need one a side"
        )
    mine, theirs = statistics.median(candidate), statistics.median(champion)
    limit = max(abs_s, rel * theirs)
    numbers = {"candidate_s": mine, "champion_s": theirs, "rise_s": mine - theirs, "limit_s": limit}
    reason = (
        f"untimed overhead (wall − train − eval seconds) median {mine:.1f} s against "
        f"the champion's {theirs:.1f} s: a rise of {mine - theirs:+.1f} s (limit "
        f"{limit:.1f} s)"
    )
    return Check(UNTIMED_OVERHEAD, mine - theirs > limit, reason, numbers)


def seed_test(runs: Sequence[dict]) -> Check:
    """Did runs given different seeds start from different weights? The harness fingerprints
    the weights the trainer starts from; a candidate that ignores the seed (fixed or
    loaded weights) makes its replicates copies of one run, which the judge's statistics
    would take for independent evidence."""
    firsts: dict[str, int] = {}
    for run in runs:
        result = run.get("result") or {}
        fp = result.get("init_fingerprint")
        if fp is None:
            continue
        seed = result.get("seed", run.get("seed"))
        if fp in firsts and firsts[fp] != seed:
            reason = (f"runs with seeds {firsts[fp]} and {seed} started from the same weights "
                      f"(fingerprint {fp[:12]}): the candidate ignores the seed")
            return Check(SEED_IGNORED, True, reason, {"seeds": [firsts[fp], seed]})
        firsts.setdefault(fp, seed)
    return Check(SEED_IGNORED, False, "", {"distinct_starts": len(firsts)})


def untimed_overhead(run: dict) -> float | None:
    """A ledger run's untimed seconds: the runner's wall time minus the harness's timed
    training and evaluation (import, data, warmup, checks, checkpoint, exit)."""
    result = run.get("result") or {}
    parts = (run.get("wall_seconds"), result.get("train_seconds"), result.get("eval_seconds"))
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in parts):
        return None
    wall, train, evaluation = parts
    return wall - train - evaluation


def caught_by_runs(runs: Sequence[dict]) -> str | None:
    """caught_by for a candidate whose runs the harness or the loop failed as integrity
    violations: the checks their results name, in order (None when none did)."""
    ids: list[str] = []
    for run in runs:
        if run["outcome"] != "integrity-violation":
            continue
        found = ((run.get("result") or {}).get("integrity") or {}).get("violations") or []
        for v in found:
            if isinstance(v, dict) and isinstance(v.get("check"), str) and v["check"] not in ids:
                ids.append(v["check"])
    return ",".join(ids) or None


# -- the checks in order, and the verdict ----------------------------------------------------


def checks_on_runs(mine: Sequence[dict], theirs: Sequence[dict],
                   cfg: AcceptanceConfig) -> list[Check]:
    """The checks on the candidate's ok ledger runs (and the champion's) alone: the seeds,
    and the untimed overhead when both sides have runs that measured it."""
    checks = [seed_test(mine)]
    overheads = [o for o in map(untimed_overhead, mine) if o is not None]
    champion = [o for o in map(untimed_overhead, theirs) if o is not None]
    if overheads and champion:
        checks.append(overhead_test(overheads, champion, cfg.overhead_abs_s, cfg.overhead_rel))
    else:
        checks.append(Check(UNTIMED_OVERHEAD, False, "",
                            {"skipped": "no run with wall, train and eval seconds"}))
    return checks


def reproduce_checks(mine: Sequence[dict], scored: dict[int, dict],
                     tolerance: float) -> list[Check]:
    """Every run has its checkpoint's scores (`scored`: run id -> the ledger's holdout row),
    and each reported the val loss its weights score afresh (`eval-reproduce`): a surface
    that behaves differently inside the run's evaluator process is caught here."""
    missing = [r["id"] for r in mine if r["id"] not in scored]
    if missing:
        return [Check(HOLDOUT_GAP, True, f"run(s) {missing} have no checkpoint to evaluate on "
                      "the holdout slice", None)]
    for run in mine:
        reported = (run.get("result") or {}).get("val_loss")
        again = scored[run["id"]]["val_loss"]
        if not isinstance(reported, (int, float)) or abs(reported - again) > tolerance:
            return [Check(EVAL_REPRODUCE, True,
                          f"run {run['id']} reported val loss {reported} but its checkpoint "
                          f"scores {again:.6f} in the standalone evaluator (tolerance "
                          f"{tolerance:g})", {"run": run["id"], "reported": reported,
                                              "again": again})]  # fmt: skip
    return []


def gap_check(gaps: Sequence[float], champion_gaps: Sequence[float],
              cfg: AcceptanceConfig) -> Check:
    """The holdout-gap test, or a skip when the champion has fewer than two gaps."""
    if len(champion_gaps) < 2:
        return Check(HOLDOUT_GAP, False, "", {"skipped": f"the champion has "
                     f"{len(champion_gaps)} evaluated run(s); the gap test needs 2"})
    return gap_test(gaps, champion_gaps, cfg.holdout_alpha, cfg.holdout_min_gap)


def step_check(effect: float, cfg: AcceptanceConfig, review: str) -> Check:
    """A step above `max_speedup` is held; `review` is the command that decides it."""
    if effect <= cfg.max_speedup:
        return Check(IMPLAUSIBLE_SPEEDUP, False, "", None)
    return Check(IMPLAUSIBLE_SPEEDUP, True, f"speed ratio {effect:.3f} over the champion is "
                 f"above the {cfg.max_speedup:g} limit: held for a human (`{review}`)", None,
                 hold=True)


@dataclass
class Acceptance:
    verdict: str  # accept, reject or hold
    caught_by: str | None  # the check that rejected or held it
    reason: str  # why (the check's sentence), empty on accept
    checks: dict  # check name -> its numbers, or {'skipped': why}


def caught(checks: Sequence[Check]) -> bool:
    return any(c.caught for c in checks)


def verdict(checks: Sequence[Check]) -> Acceptance:
    """The first check that caught decides (reject, or hold); the numbers of the checks up to
    it are kept."""
    numbers: dict = {}
    for check in checks:
        if check.numbers is not None:
            numbers[check.name] = check.numbers
        if check.caught:
            return Acceptance("hold" if check.hold else "reject", check.name, check.reason,
                              numbers)
    return Acceptance("accept", None, "", numbers)

