"""Candidates that change nothing: an A/A test of the judge on this machine.

Each proposal adds one comment line to model/recipe.py, so the candidate trains exactly as
its champion does. A session of them (`--proposer null --experiments 20`) measures what the
judge does with no effect at all: how often it accepts anyway (its false accepts, which
should stay near the judge's alpha), how many runs a decision takes, and the noise of this
machine's runs (bench/RESULTS.md has the figures of the project's machines).
"""

from pathlib import Path

from agent.proposers.base import Proposal

RECIPE = Path("model") / "recipe.py"


class NullProposer:
    name = "null"

    def __init__(self):
        self.made = 0  # drafted by this process: a draft made ahead is not in the history yet

    def propose(self, worktree: Path, history: list[dict], context: dict) -> Proposal | None:
        ledger = sum(1 for row in history if row.get("proposer") == self.name)
        n = self.made = max(self.made, ledger) + 1
        path = Path(worktree) / RECIPE
        with path.open("a") as f:
            f.write(f"# A/A check {n}: this line changes nothing the recipe does.\n")
        return Proposal(description=f"no-op {n} (A/A)", category="other",
                        hypothesis="none: the same code as the champion, for the judge's A/A")
