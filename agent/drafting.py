"""Drafting: an edit of the champion's worktree made into a candidate, checked and recorded.

`Drafter.submit(edit)` is the one step by which an edit becomes a candidate: the edit is
made in a worktree at the champion, taken as a commit (the workspace refuses one outside
the research surface, or one that changes nothing), scanned (the diff scan refuses what
it flags unless the session allows flagged candidates), and recorded in the ledger as a
candidate or a refusal. `propose` submits the proposer's edit. While a benchmark runs,
`prefetch` drafts the next one in a worktree of its own, in a thread of its own (the
proposer, an LLM say, works meanwhile instead of after); a draft made on a champion that
has changed since is re-applied on the new one, or proposed anew when it no longer applies.
An LLM proposer (a conversation takes minutes) drafts as many at once as the session has
slots, each in its own worktree, so that no slot waits on one conversation; the others
draft one at a time (the sweep's next point depends on the last one's result).

What this module must never do: trust a proposer's edit (the workspace and the scan check
it), write to the ledger from the drafting thread (only `take` writes, in the loop's), or
lose what a proposer's drafts cost.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from agent import acceptance, integrity
from agent.config import SessionConfig
from agent.costs import ProposerStop
from agent.judge import comparable
from agent.ledger import Ledger
from agent.measure import Measurer
from agent.proposers import Proposal, ProposalFailed, Proposer
from agent.rundir import RunDir
from agent.workspace import Candidate, EmptyChange, PatchError, RefusedChange, Workspace

# Proposers that read the research context (and so the champion's profile).
LLM_PROPOSERS = ("anthropic", "command")

Edit = Callable[[Path], "Proposal | None"]  # edits a worktree at the champion, describes it


@dataclass
class Draft:
    """A proposal taken as a commit but not yet recorded in the ledger."""

    champion: dict  # the champion it was made on
    proposal: Proposal | None  # None: the proposer has nothing more
    made: Candidate | None = None
    refused: str | None = None  # why it cannot run (outside the surface, failed, empty)
    caught_by: str | None = None  # the integrity check that refused it (acceptance.SURFACE)
    diff: str = ""
    stop: ProposerStop | None = None  # the proposer cannot go on (budget, key)


class Drafter:
    def __init__(self, proposer: Proposer, run_dir: RunDir, ledger: Ledger,
                 config: SessionConfig, workspace: Callable[[], Workspace],
                 measurer: Measurer, tracker, event):
        self.proposer, self.run_dir, self.ledger, self.config = proposer, run_dir, ledger, config
        self.workspace, self.measurer, self.tracker, self.event = (workspace, measurer,
                                                                   tracker, event)
        # Drafts made at once: one per slot for an LLM, else one.
        self.width = len(measurer.pool) if proposer.name in LLM_PROPOSERS else 1
        self._pool = ThreadPoolExecutor(max_workers=self.width, thread_name_prefix="proposer")
        # The drafts being made in the background, oldest first, with their worktree's index.
        self._next: collections.deque[tuple[Future, int]] = collections.deque()

    def inputs(self) -> tuple[dict, list[dict], dict]:
        """What a proposer sees: the champion, the history and the context, read now."""
        champion = self.ledger.champion()
        context = {
            "preset": self.config.preset,
            "gpus": self.config.gpus,
            "budget_tokens": self.config.budget_tokens(),
            "objective": self.config.objective,
            "champion": champion,
            "champion_results": comparable(self.ledger.results_of(champion["id"]),
                                           asdict(self.config)),
            "spent_usd": self.ledger.spend()["cost_usd"],
        }
        if self.proposer.name in LLM_PROPOSERS:
            profile = self.measurer.champion_profile(champion)
            if profile:
                context["profile"] = profile
        return champion, self.ledger.candidates(), context

    def draft(self, ws: Workspace, champion: dict, history: list[dict], context: dict,
              edit: Edit | None = None) -> Draft:
        """Make `edit` (default: the proposer's) in `ws` and take it as a commit on
        `champion`. Writes nothing to the ledger, so it may run in the drafting thread."""
        if edit is None:
            def edit(path: Path) -> Proposal | None:
                return self.proposer.propose(path, history, context)
        ws.checkout(champion["commit_sha"])
        try:
            proposal = edit(ws.path)
            if proposal is None:
                return Draft(champion, None)
            message = f"{proposal.description}\n\n{proposal.hypothesis}"
            try:
                return Draft(champion, proposal, made=ws.capture(len(history), message))
            except RefusedChange as e:
                return Draft(champion, proposal, refused=str(e), diff=e.diff,
                             caught_by=acceptance.SURFACE)  # fmt: skip
            except EmptyChange as e:
                return Draft(champion, proposal, refused=str(e))
        except ProposalFailed as e:
            failed = Proposal(e.description, usage=getattr(e, "usage", None))
            return Draft(champion, failed, refused=e.reason)
        except ProposerStop as e:
            return Draft(champion, None, stop=e)
        finally:
            ws.checkout(champion["commit_sha"])

    def take(self, draft: Draft) -> dict | None:
        """Record a draft in the ledger: a candidate, a refusal, or None when the proposer is
        done. A draft made on an older champion is re-applied on the current one first."""
        if draft.stop is not None:
            usage = getattr(draft.stop, "usage", None)
            if usage and usage.get("requests"):  # what it cost is kept in the ledger
                self.record_refusal(draft.champion, "proposer stopped", str(draft.stop),
                                    usage=usage)
            raise draft.stop
        if draft.proposal is None:
            return None
        proposal, champion = draft.proposal, self.ledger.champion()
        if draft.refused is not None:
            return self.record_refusal(champion, proposal.description, draft.refused,
                                       draft.diff, proposal.usage, caught_by=draft.caught_by)
        made, ws = draft.made, self.workspace()
        if champion["id"] != draft.champion["id"]:
            try:
                made = self.reapply(made.diff, proposal.description)
            except (PatchError, RefusedChange, EmptyChange) as e:
                self.event(f"dropped '{proposal.description}': it was proposed on the previous "
                           f"champion and does not apply to the new one ({e})")
                return self.propose()
        # The diff scan: the lines the diff adds to the surface; a flagged candidate is
        # refused, with the findings, unless the session allows flagged ones.
        findings = integrity.scan_diff(made.diff, lambda path: ws.file_at(made.commit, path))
        if findings and not self.config.allow_flagged:
            rules = dict.fromkeys(f"{acceptance.DIFF_SCAN}:{f.rule}" for f in findings)
            return self.record_refusal(champion, proposal.description,
                                       integrity.describe(findings), made.diff, proposal.usage,
                                       caught_by=",".join(rules))
        if findings:
            self.event(f"allowed by allow_flagged: {integrity.describe(findings)}")
        cid = self.ledger.add_candidate(
            proposal.description, parent_id=champion["id"], diff=made.diff,
            commit_sha=made.commit, ref=made.ref, hypothesis=proposal.hypothesis,
            category=proposal.category, proposer=self.proposer.name, usage=proposal.usage,
        )  # fmt: skip
        return self.ledger.candidate(cid)

    def reapply(self, diff: str, description: str) -> Candidate:
        """`diff` applied to the current champion in the session's worktree, as a commit;
        PatchError, RefusedChange or EmptyChange when it no longer makes one."""
        ws = self.workspace()
        ws.reset()
        ws.apply(diff)
        return ws.capture(len(self.ledger.candidates()), description)

    def rebase(self, candidate: dict) -> dict | None:
        """Re-base a candidate whose champion was replaced while it ran: its change applied
        to the new champion becomes a new candidate, judged afresh against it (the old one
        is closed as 'rebased', its runs kept as evidence against its old parent only).
        None when the change no longer applies: the old one is closed saying so, and its
        proposer reads that in the history."""
        champion = self.ledger.champion()
        title = f"#{candidate['experiment']} {candidate['description']}"
        why = f"the champion became #{champion['experiment']} while it ran"
        try:
            made = self.reapply(candidate["diff"], candidate["description"])
        except (PatchError, RefusedChange, EmptyChange) as e:
            self.ledger.rebase(candidate["id"], f"{why}; it does not apply to the new champion "
                               f"({e}): back to its proposer", onto=None)
            self.event(f"dropped {title}: {why}, and it does not apply to it")
            return None
        new = self.ledger.rebase(candidate["id"], why, onto={
            "parent_id": champion["id"], "commit_sha": made.commit, "ref": made.ref,
            "diff": made.diff})  # fmt: skip
        rebased = self.ledger.candidate(new)
        self.event(f"re-based {title} on the new champion as #{rebased['experiment']}")
        return rebased

    def submit(self, edit: Edit | None = None) -> dict | None:
        """Submit an edit as a candidate now: `edit(worktree)` changes the champion's
        worktree and returns its Proposal (None: nothing to submit). Returns the recorded
        candidate (proposed, or refused), or None. Without `edit`, the proposer's."""
        return self.take(self.draft(self.workspace(), *self.inputs(), edit=edit))

    def propose(self) -> dict | None:
        """Ask the proposer for the next candidate now; None when it is done."""
        return self.submit()

    def prefetch(self, room: Callable[[int], bool] = lambda drafts: True) -> None:
        """Start drafting the next candidates, each in a worktree of its own, up to `width`
        at once and while `room(drafts already in the making)` says the session has room
        for one more. The context (and so the champion's profile) is read here first,
        before the benchmark takes the device; each draft is told how many others are in
        the making (`drafts_in_flight`: an LLM reserves their worst-case cost)."""
        while self.config.overlap and len(self._next) < self.width and room(len(self._next)):
            free = min(set(range(self.width)) - {i for _, i in self._next})
            ws = self.workspace().second(self.run_dir.draft_worktree(free))
            champion, history, context = self.inputs()
            context["drafts_in_flight"] = len(self._next)
            self._next.append((self._pool.submit(self.draft, ws, champion, history, context),
                               free))

    def next_candidate(self) -> dict | None:
        """The first draft made (waited for when none is ready yet), recorded; without a
        draft in the making, the proposer's next one, now."""
        if not self._next:
            return self.propose()
        wait([f for f, _ in self._next], return_when=FIRST_COMPLETED)
        entry = next(e for e in self._next if e[0].done())
        self._next.remove(entry)
        return self.take(entry[0].result())

    def keep_pending(self) -> None:
        """Drafts still in the making when the session stops are waited for and recorded
        (as proposed candidates that --resume will judge), so their LLM spend is not lost."""
        while self._next:
            draft = self._next.popleft()[0].result()
            if draft.made is not None and draft.champion["id"] == self.ledger.champion()["id"]:
                self.take(draft)

    def record_refusal(self, champion: dict, description: str, reason: str, diff: str = "",
                       usage=None, caught_by: str | None = None) -> dict:
        cid = self.ledger.add_refused(
            description, reason, parent_id=champion["id"], diff=diff,
            proposer=self.proposer.name, usage=usage, caught_by=caught_by,
        )  # fmt: skip
        self.tracker.log_decision(self.ledger.candidate(cid))
        self.event(f"refused {description}: {reason}")
        return self.ledger.candidate(cid)
