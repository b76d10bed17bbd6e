"""Proposers turn (champion worktree, history, context) into a candidate edit.

A proposer edits the files of a worktree that holds the champion and returns a
Proposal describing the edit, or None when it has nothing more to propose. The engine
then takes the edit as a commit and checks it like any other: a proposer never commits,
never runs the benchmark, and is never trusted to stay inside the research surface.
"""

from agent.proposers.base import Proposal, ProposalFailed, Proposer
from agent.proposers.patches import PatchesProposer
from agent.proposers.sweep import SweepProposer


def make_proposer(name: str, arg: str | None = None, options: dict | None = None) -> Proposer:
    """The proposer called `name` on the command line; `arg` is its argument, if any, and
    `options` its settings (anthropic: LLMConfig fields; command: CommandConfig fields)."""
    if name == "sweep":
        return SweepProposer()
    if name == "patches":
        if not arg:
            raise ValueError("--proposer patches needs a directory: --proposer-arg DIR")
        return PatchesProposer(arg)
    if name == "null":
        from agent.proposers.null import NullProposer

        return NullProposer()
    if name == "anthropic":
        from agent.proposers.anthropic import AnthropicProposer, LLMConfig

        if arg:
            raise ValueError(f"--proposer anthropic takes no --proposer-arg (got '{arg}'); "
                             "its settings (model, budget, ...) are LLM options")
        return AnthropicProposer(LLMConfig.from_dict(options or {}))
    if name == "command":
        from agent.proposers.command import CommandConfig, CommandProposer

        return CommandProposer(arg or "", CommandConfig.from_dict(options or {}))
    raise ValueError(f"unknown proposer '{name}': use sweep, patches, null, anthropic or command")


__all__ = [
    "PatchesProposer",
    "Proposal",
    "ProposalFailed",
    "Proposer",
    "SweepProposer",
    "make_proposer",
]
