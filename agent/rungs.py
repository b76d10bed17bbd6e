"""A ladder's rungs as a replay session sees them: the settings a replay keeps in its
config, which rung a candidate is, and the results and statistics of a rung's step. Shared
by the replay (agent/replay.py) and its report (agent/replay_report.py), which import it
and never each other.

Per rung: the times of its runs and of its predecessor's (interleaved with them, so drift
of the machine hits both), the speedup as a ratio of geometric means with a Welch interval
(agent/stats.py), and the leaderboard's loss test on the rung's final val losses.

What it must never do: reuse a run of another step for a rung's comparison, or read
anything but the ledger's results and the ladder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from agent.config import from_dict
from agent.judge import comparable
from agent.stats import LossTest, Speedup, censored_metric, geomean_interval, loss_test, speedup

PROPOSER = "replay"  # the session config's proposer name for a replay
PREFIX = "rung "  # candidate descriptions: "rung <id>: <title>"
OWN = ("screen", "confirm")  # a rung's runs in its own step ("champion": the next step's)


def load(ladder: str | Path):
    """A ladder by name (bench/leaderboards/<name>) or by its directory."""
    from bench.leaderboards import load_ladder

    return load_ladder(ladder)


@dataclass(frozen=True)
class ReplaySettings:
    """What a replay keeps in its session config (as the proposer's options)."""

    ladder: str  # the ladder's name
    runs: int  # timed runs per side and rung
    first: int  # index in ladder.rungs of the first rung replayed (0: the ladder's first)
    last: int  # index of the last one
    target_from: str  # "ladder" (the preset reaches its target), "baseline" or "given"
    ladder_target: float  # the ladder's (or the rules') target loss
    p_value: float  # of the loss test
    waive_systems: bool  # systems rungs skip the loss test (only under --rules)

    @classmethod
    def of(cls, config) -> ReplaySettings:
        return from_dict(cls, config.proposer_options, "replay settings")


def rung_of(candidate: dict) -> str | None:
    """The rung id of a replay candidate, from its description."""
    text = candidate.get("description") or ""
    return text.split(":")[0].removeprefix(PREFIX) if text.startswith(PREFIX) else None


def step_results(ledger, config, candidate: dict) -> tuple[list, list]:
    """A rung's step: its predecessor's runs of this step (its champion re-measurements:
    a predecessor is re-measured only in the step after its own) and the rung's runs."""
    settings = asdict(config)
    pred = ledger.results_of(candidate["parent_id"], roles=["champion"])
    mine = ledger.results_of(candidate["id"], roles=OWN)
    return comparable(pred, settings), comparable(mine, settings)


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

    def interval(self) -> tuple[float, float] | None:
        """The 95% t-interval of the geometric mean; None with one run."""
        return geomean_interval(self.values)


def times(results: Sequence[dict]) -> Times:
    """A run's time is its time to the target, or its training time when it has none (it
    missed the target, or ran without one): agent.stats.censored_metric."""
    values, missed, failed = [], 0, 0
    for r in results:
        if r.get("status") != "ok":
            failed += 1
            continue
        missed += r.get("time_to_target") is None
        try:
            values.append(censored_metric(r, "time-to-loss"))
        except ValueError:
            failed += 1  # an ok run without a usable time measured nothing
    return Times(tuple(values), missed, failed)


@dataclass(frozen=True)
class RungStats:
    pred: Times
    rung: Times
    speedup: Speedup | None  # the rung's times against its predecessor's
    loss: LossTest  # on the rung's ok runs, against the target at the leaderboard's p-value
    loss_delta: float | None  # the rung's mean final val loss minus its predecessor's


def rung_stats(pred_results: Sequence[dict], rung_results: Sequence[dict], target: float,
               p_value: float, waived: bool = False) -> RungStats:
    """Everything the replay's table says about one rung, from its runs and its
    predecessor's (the interleaved ones of the same step)."""
    pred, rung = times(pred_results), times(rung_results)
    losses, pred_losses = _losses(rung_results), _losses(pred_results)
    delta = float(np.mean(losses) - np.mean(pred_losses)) if losses and pred_losses else None
    test = loss_test(losses, target, p_value, waived=waived)
    return RungStats(pred, rung, speedup(pred.values, rung.values), test, delta)


def _losses(results: Sequence[dict]) -> list[float]:
    return [float(r["val_loss"]) for r in results
            if r.get("status") == "ok" and isinstance(r.get("val_loss"), (int, float))]


def stats_of(ledger, config, candidate: dict, rung) -> RungStats:
    s = ReplaySettings.of(config)
    pred, mine = step_results(ledger, config, candidate)
    waived = s.waive_systems and rung.kind == "systems"
    return rung_stats(pred, mine, config.target_loss, s.p_value, waived)
