"""`python -m agent show D ID`: one candidate in full, whatever became of it.

Its description, proposer and hypothesis; the verdict and why; the judge's numbers
(effect against the champion of its time with its interval, p-values, the loss delta);
each acceptance check passed, not tested or failed with its numbers; every run with its
outcome and its evaluation curve as a compact table; and the diff. All from the ledger.

What this module must never do: write anything.
"""

from __future__ import annotations

from pathlib import Path

from agent.ledger import Ledger, LedgerError
from agent.rundir import RunDir

JUDGE_NUMBERS = ("effect", "ci_low", "ci_high", "p_value", "p_value_loss", "loss_delta",
                 "n_champion", "n_candidate")


class NoSuchCandidate(LedgerError):
    """The id names no candidate of the session."""


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _checks(decision: dict, caught_by: str | None) -> list[str]:
    lines = []
    for name, numbers in (decision.get("checks") or {}).items():
        numbers = numbers or {}
        state = ("FAILED" if name == caught_by else
                 "not tested" if "skipped" in numbers else "passed")
        shown = ", ".join(f"{k}: {v}" if isinstance(v, str) else f"{k} {_number(v)}"
                          for k, v in numbers.items())
        lines.append(f"  {name}: {state}" + (f" ({shown})" if shown else ""))
    if caught_by and caught_by not in (decision.get("checks") or {}):
        lines.append(f"  {caught_by}: FAILED")
    return lines


def _runs(ledger: Ledger, candidate_id: int) -> list[str]:
    lines = []
    for r in ledger.runs_of(candidate_id):
        result = r["result"] or {}
        speed = result.get("tokens_per_sec")
        lines.append(f"  run {r['id']} {r['role']} seed {r['seed']}: {r['outcome']}"
                     + (f", {speed:,.0f} tok/s" if isinstance(speed, (int, float)) else "")
                     + (f", val loss {result['val_loss']:.4f}"
                        if isinstance(result.get("val_loss"), (int, float)) else "")
                     + (f"; log {r['log_path']}" if r["log_path"] else ""))
        if r["error"]:
            lines.append(f"    error: {r['error'].strip().splitlines()[-1][:200]}")
        curve = result.get("curve") or []
        if curve:
            lines.append("    tokens        seconds   val loss")
            lines += [f"    {p['tokens']:>11,}  {p['seconds']:>8.2f}  {p['val_loss']:>9.4f}"
                      for p in curve]
    return lines or ["  none (nothing ran)"]


def show_text(run_dir: str | Path, candidate_id: int) -> str:
    """Everything the ledger knows of one candidate, as text."""
    path = RunDir(run_dir).ledger
    with Ledger(path, create=False) as ledger:
        try:
            c = ledger.candidate(candidate_id)
        except LedgerError:
            ids = [x["id"] for x in ledger.candidates()]
            raise NoSuchCandidate(
                f"candidate {candidate_id}: no such candidate in {path} (its ids are "
                f"{ids[0]} to {ids[-1]}; `python -m agent status {run_dir}` lists them)"
                if ids else f"candidate {candidate_id}: {path} holds no candidate yet"
            ) from None
        d = c["decision"] or {}
        title = "the baseline" if c["experiment"] is None else f"experiment #{c['experiment']}"
        lines = [f"candidate {c['id']} ({title}): {c['description']}",
                 f"proposer {c['proposer'] or '-'}, category {c['category'] or '-'}, parent "
                 f"{c['parent_id'] if c['parent_id'] is not None else '-'}, commit "
                 f"{c['commit_sha'] or '-'}",
                 f"hypothesis: {c['hypothesis'] or '-'}",
                 f"verdict: {c['verdict'] or c['state']}"
                 + (f" (caught by {c['caught_by']})" if c["caught_by"] else ""),
                 f"why: {d.get('reason') or '-'}"]
        if d.get("review"):
            lines.append(f"reviewed by a human: {d['review']['verdict']}: "
                         f"{d['review'].get('note') or ''}")
        numbers = [f"{k} {_number(d[k])}" for k in JUDGE_NUMBERS if d.get(k) is not None]
        lines.append("the judge: " + (", ".join(numbers) if numbers else "no numbers"))
        checks = _checks(d, c["caught_by"])
        lines += ["checks:", *checks] if checks else ["checks: none ran"]
        lines += ["runs:", *_runs(ledger, c["id"])]
        lines += ["diff:", c["diff"].rstrip() if c["diff"] else "  (none)"]
    return "\n".join(lines) + "\n"
