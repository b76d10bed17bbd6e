"""A human's review of the candidates the loop held (`implausible-speedup` in
bench/INTEGRITY.md): a step too large to believe is neither accepted nor rejected by the
loop.

    python -m agent review --run-dir D                          # list what is held
    python -m agent review --run-dir D ID                       # its evidence and diff
    python -m agent review --run-dir D ID --accept|--reject [--note TEXT]

Accepting promotes the candidate as the loop's accept does (agent/recording.py `promote`:
champion in the ledger, champion branch in git, total speedup = the champion's times its
effect); both
verdicts are recorded with the note. What it must never do: decide while a session runs in
the same directory (the loop holds `session.lock` while it runs), or accept a candidate made
on a champion that is no longer the champion (that would drop the changes accepted since).
"""

from __future__ import annotations

from pathlib import Path

from agent.ledger import Ledger
from agent.liveness import session_lock
from agent.recording import promote
from agent.rundir import RunDir
from agent.workspace import Workspace


class ReviewError(RuntimeError):
    """A review that cannot be made as asked; the message says why and what to do."""


def held_text(run_dir: Path) -> str:
    """The held candidates, one paragraph each, or a line saying there are none."""
    with Ledger(RunDir(run_dir).ledger, create=False) as ledger:
        held = ledger.held()
        if not held:
            return "no candidate is held for review"
        return "\n\n".join(_describe(ledger, c, run_dir) for c in held)


def _describe(ledger: Ledger, c: dict, run_dir: Path) -> str:
    d = c["decision"] or {}
    lines = [
        f"candidate {c['id']} (experiment #{c['experiment']}): {c['description']}",
        f"  held by {c['caught_by']}: {d.get('reason', '-')}",
        f"  effect x{d.get('effect') or 0:.3f} vs champion {c['parent_id']}, CI "
        f"[{d.get('ci_low') or 0:.3f}, {d.get('ci_high') or 0:.3f}], p={d.get('p_value')}"
        f", val loss {d.get('loss_delta') or 0:+.4f} nats",
        f"  commit {c['commit_sha']} (ref {c['ref']})",
    ]
    for name, numbers in (d.get("checks") or {}).items():
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers.items()
        )
        lines.append(f"  check {name}: {shown}")
    for r in ledger.runs_of(c["id"]):
        lines.append(
            f"  run {r['id']} {r['role']} seed {r['seed']}: {r['outcome']}, log {r['log_path']}"
        )
    lines.append(
        f"  decide: python -m agent review --run-dir {run_dir} {c['id']} "
        "--accept|--reject --note '...'"
    )
    return "\n".join(lines)


def show(run_dir: Path, candidate_id: int) -> str:
    """One held candidate's evidence and its diff."""
    with Ledger(RunDir(run_dir).ledger, create=False) as ledger:
        c = ledger.candidate(candidate_id)
        if c["state"] != "held":
            raise ReviewError(f"candidate {candidate_id} is {c['state']}, not held")
        return _describe(ledger, c, run_dir) + "\n\n" + (c["diff"] or "(no diff)")


def settle(run_dir: Path, candidate_id: int, accept: bool, note: str = "") -> str:
    """A human's verdict on a held candidate, accept or reject; returns a line saying what
    was done."""
    where = RunDir(run_dir)
    with session_lock(where.root), Ledger(where.ledger, create=False) as ledger:
        c = ledger.candidate(candidate_id)
        if c["state"] != "held":
            raise ReviewError(
                f"candidate {candidate_id} is {c['state']}, not held: only a "
                "held candidate can be reviewed"
            )
        if not accept:
            ledger.review(candidate_id, "reject", note)
            text = f"rejected candidate {candidate_id} ({c['description']})"
            ledger.log_event(f"review: {text}" + (f": {note}" if note else ""))
            return text
        champion = ledger.champion()
        if champion["id"] != c["parent_id"]:
            raise ReviewError(
                f"candidate {candidate_id} was made on champion {c['parent_id']}, but the "
                f"champion is now {champion['id']}: accepting it would drop the changes "
                "accepted since. Reject it, and propose its diff again on the current champion "
                "(e.g. --proposer patches)"
            )
        session = ledger.session()
        # The worktree is opened before the ledger changes: a session without one cannot
        # promote, and then nothing is recorded.
        ws = Workspace.open(Path(session["config"].get("repo", ".")), where.worktree,
                            session["id"])
        speedup = promote(ledger, ws, c, c["decision"]["effect"], lambda total: ledger.review(
            candidate_id, "accept", note, speedup=total))
        text = (
            f"accepted candidate {candidate_id} ({c['description']}): it is the champion, "
            f"total x{speedup:.3f}"
        )
        ledger.log_event(f"review: {text}" + (f": {note}" if note else ""))
        return text
