"""A leaderboard's rules (`--rules NAME`): the judge's accept in the leaderboard's own terms.

A record must reach the leaderboard's target loss, shown by its runs at the leaderboard's
p-value, unless the rules waive the test for a change that only makes the system faster.
`under_rules` applies that test after the judge's accept, in a session and in a replay.

What this module must never do: turn a judge's reject into an accept: the rules only add a
condition to an accept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from agent.judge import Decision
from agent.stats import Run, loss_test


@dataclass(frozen=True)
class LeaderboardRules:
    target_loss: float  # the validation loss a record must reach (nats)
    p_value: float  # a record's runs must show mean val loss <= target at this one-sided p
    # A change that only makes the system faster (kernels, communication, compilation) and
    # leaves the maths alone need not prove the loss again: the speedrun waives the test.
    waive_systems: bool


LEADERBOARDS = {
    # modded-nanogpt's speedrun: GPT-2 small to 3.28 val loss on FineWeb; a new record's
    # runs must reach it with p < 0.01, unless it is a pure systems change.
    "nanogpt-speedrun": LeaderboardRules(target_loss=3.28, p_value=0.01, waive_systems=True),
}


def leaderboard_rules(name: str) -> LeaderboardRules:
    if name not in LEADERBOARDS:
        raise ValueError(f"unknown rules {name!r}: choose one of {', '.join(LEADERBOARDS)}")
    return LEADERBOARDS[name]


def under_rules(
    decision: Decision,
    candidate_runs: Sequence[Run],
    rules: LeaderboardRules,
    target: float,
    systems: bool = False,
    max_runs: int | None = None,
) -> Decision:
    """An accept that must also pass the leaderboard's loss test on the candidate's runs.

    Other verdicts pass through. A failed test asks for another run while fewer than
    `max_runs` were made (the test gains power with runs, as a record's author adds runs
    until p clears the bar; this is the leaderboard's nominal test at each look, not a
    calibrated sequential one), and rejects at `max_runs`.
    """
    if decision.verdict != "accept":
        return decision
    losses = [float(r["val_loss"]) for r in candidate_runs if r.get("status") == "ok"]
    test = loss_test(losses, target, rules.p_value, waived=systems and rules.waive_systems)
    if test.verdict in ("pass", "waived"):
        why = "waived (a systems change)"
        if test.verdict == "pass":
            why = f"p={test.p_value:.2g} < {rules.p_value}"
        return replace(decision, reason=f"{decision.reason}; loss at target {target:.4f}: {why}")
    shown = "n/a" if test.p_value is None else f"p={test.p_value:.2g}"
    reason = (
        f"{decision.reason}, but mean val loss {test.mean:.4f} is not shown at or under "
        f"{target:.4f} ({shown}, needs < {rules.p_value})"
    )
    if max_runs is not None and len(candidate_runs) >= max_runs:
        return replace(decision, verdict="reject", reason=f"{reason} after the maximum runs")
    return replace(decision, verdict="more", reason=f"{reason}: one more run")
