"""A ladder's rungs as a replay session sees them: the settings a replay keeps in its
config, which rung a candidate is, and the results and statistics of a rung's step. Shared
by the replay (agent/replay.py) and its report (agent/replay_report.py), which import it
and never each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from agent.judge import comparable
from agent.replay_stats import RungStats, rung_stats

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
        return cls(**config.proposer_options)


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


def stats_of(ledger, config, candidate: dict, rung) -> RungStats:
    s = ReplaySettings.of(config)
    pred, mine = step_results(ledger, config, candidate)
    waived = s.waive_systems and rung.kind == "systems"
    return rung_stats(pred, mine, config.target_loss, s.p_value, waived)
