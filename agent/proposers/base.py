"""The proposer interface that every proposer, LLM or not, implements."""

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

CATEGORIES = (
    "kernel", "optimizer", "architecture", "schedule", "systems", "hyperparameter", "other",
)  # fmt: skip


class ProposalFailed(Exception):
    """The proposer could not make its edit (a patch that does not apply, say): the engine
    records the attempt as refused, with the reason, and asks for the next proposal."""

    def __init__(self, description: str, reason: str):
        self.description, self.reason = description, reason
        super().__init__(f"{description}: {reason}")


@dataclass
class Proposal:
    description: str  # one line, shown in status, report and results.tsv
    hypothesis: str = ""  # why it should be faster, in the proposer's words
    category: str = "hyperparameter"  # one of CATEGORIES
    usage: dict | None = None  # what proposing it cost (LLM tokens, USD), for the ledger


class Proposer(Protocol):
    name: str

    def propose(self, worktree: Path, history: list[dict], context: dict) -> Proposal | None:
        """Edit `worktree` (at the champion) into a candidate; None when out of ideas.

        history: the session's candidates so far, oldest first (the ledger's rows: each has
        description, proposer, verdict, decision). context: preset, objective, champion
        metrics and what else the engine knows.
        """
        ...
