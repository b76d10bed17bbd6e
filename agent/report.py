"""What a session found, derived from its ledger alone: report.md, progress.png (drawn by
agent/progress_chart.py) and results.tsv, from one snapshot of the ledger (`collect`,
which `status` reads too).

Two kinds of numbers appear side by side, and the names keep them apart:
- `speedup`: a candidate against the baseline, measured here from the ledger's runs (ratio
  of geometric means of the objective's primary metric over ok runs, > 1 is better, with a
  95% Welch interval on the log scale when both sides have two runs or more);
- `effect`, `ci_low`, `ci_high`, `p_value`, `loss_delta`: the judge's Decision, against the
  champion of its time, as stored when the candidate was decided.

results.tsv keeps autoresearch's first five columns (commit, the primary metric named by its
result field as autoresearch names val_bpb, memory_gb, status keep/discard/crash,
description; 0 for what a crash did not measure), then adds speedloop's.

What this module must never do: write to the ledger, or show a number it did not get from
the ledger.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from agent import progress_chart
from agent.judge import comparable, measure_noise
from agent.ledger import Ledger
from agent.liveness import STARTED, STOPPED, Liveness, liveness, when
from agent.rundir import RunDir
from agent.shares import TimedShare, slot_busy, timed_share
from agent.stats import (
    OBJECTIVES,
    Speedup,
    censored_metric,
    metric_values,
    primary_metric,
    speedup_vs_baseline,
)
from bench.telemetry import flagged

# Candidate classes, with the status column of results.tsv (autoresearch's); progress.png
# gives each its colour (agent/progress_chart.py STYLES).
CLASSES = {"accepted": "keep", "rejected": "discard", "failed": "crash", "refused": "discard",
           "held": "discard"}  # held for a human's review: not kept (yet)
TSV_EXTRA = ("speedup", "speedup_ci_low", "speedup_ci_high", "effect", "ci_low", "ci_high",
             "p_value", "runs", "val_loss", "outcome", "proposer", "candidate", "caught_by")


class ReportPaths(NamedTuple):
    report: Path  # report.md
    progress: Path  # progress.png
    results: Path  # results.tsv


@dataclass
class Experiment:
    candidate: dict
    runs: list[dict]  # finished runs, all roles
    results: list[dict]  # the judge's input: comparable results of the runs
    outcome: str  # ok, a failure outcome, refused or running
    kind: str  # a CLASSES key, or "pending" while undecided
    speedup: Speedup | None

    def ok_values(self, key: str) -> list[float]:
        return [r[key] for r in self.results
                if r["status"] == "ok" and isinstance(r.get(key), (int, float))]


def _experiment(ledger: Ledger, cand: dict, baseline: list[dict],
                config: dict) -> Experiment:
    runs = ledger.runs_of(cand["id"])
    failed = [r["outcome"] for r in runs if r["outcome"] != "ok"]
    if cand["state"] == "refused":
        outcome, kind = "refused", "refused"
    else:
        outcome = failed[0] if failed else (
            "ok" if cand["state"] in ("decided", "held") else "running")
        kind = {"accept": "accepted", "reject": "rejected", "held": "held"}.get(
            cand["verdict"], "pending")
        if kind == "rejected" and outcome not in ("ok", "early-stopped"):
            kind = "failed"
    results = comparable(ledger.results_of(cand["id"]), config)
    return Experiment(cand, runs, results, outcome, kind, speedup_vs_baseline(
        baseline, results, config.get("objective", "time-to-loss")))


@dataclass
class Snapshot:
    """Everything the report and status show, read from one snapshot of the ledger."""

    session: dict
    objective: str
    base: Experiment | None
    rows: list[Experiment]  # the experiments, baseline excluded, in order
    champion: dict | None
    champions: list[dict]
    running: list[dict]
    events: list[dict]
    n_experiments: int  # decided or refused, as the budget counts them
    spend: dict  # the LLM requests paid for (Ledger.spend)
    life: Liveness  # alive, stopped or killed, and when it ended

    def untrusted(self) -> str:
        """A warning when candidate code ran outside the sandbox, else ""."""
        runs = [r for e in [self.base, *self.rows] if e for r in e.runs]
        unconfined = sum((r.get("result") or {}).get("sandbox") is False for r in runs)
        if self.session["config"].get("sandbox", True) and not unconfined:
            return ""
        return (f"UNTRUSTED: candidate code ran without a sandbox ({unconfined} of {len(runs)} "
                "runs): it could reach what measured it, so these numbers are not evidence")

    def throttled(self) -> str:
        """A warning when a run's GPU throttled by heat or power (bench/telemetry.py)."""
        runs = [r for e in [self.base, *self.rows] if e for r in e.runs]
        hit = [f"run {r['id']}: {', '.join(flagged(r.get('result')))}" for r in runs
               if flagged(r.get("result"))]
        if not hit:
            return ""
        return (f"THROTTLED: the GPU slowed down for heat or power in {len(hit)} of {len(runs)} "
                f"runs ({'; '.join(hit)}): their times are slower than the GPU is")

    @property
    def until(self) -> float:
        """The end of the session's time: now while it runs, else when it stopped (or was
        last seen), so a finished session's shares do not shrink as days pass."""
        return self.life.end if self.life.end is not None else time.time()

    def busy_text(self) -> str:
        """`benchmarks ran 80% of the session's 2h 10m; they waited 7% for the device lock
        (other processes' runs); the device idled 13%`; with several slots, the shares are
        of all slots' time, each slot's after it."""
        runs = [r for e in [self.base, *self.rows] if e for r in e.runs]
        shares = slot_busy(runs, self.session["created"], self.until)
        if not shares or not runs:
            return ""
        busy = sum(b for b, _ in shares.values()) / len(shares)
        waited = sum(w for _, w in shares.values()) / len(shares)
        span = duration(self.until - self.session["created"])
        on = "" if len(shares) == 1 else f" on {len(shares)} slots (" + ", ".join(
            f"slot {name} {b:.0%}" for name, (b, _) in sorted(shares.items())) + ")"
        wait = (f"; they waited {waited:.0%} for the device lock (other processes' runs)"
                if waited >= 0.005 else "")
        return (f"benchmarks ran {busy:.0%} of the session's {span}{on}{wait}; the device "
                f"idled {max(0.0, 1 - busy - waited):.0%}")

    def timed(self) -> TimedShare | None:
        """How much of the slots' time was timed training, and where a run's other seconds
        went (agent/shares.py)."""
        runs = [r for e in [self.base, *self.rows] if e for r in e.runs]
        slots = len({r.get("slot") or "0" for r in runs})
        return timed_share(runs, self.session["created"], self.until, slots)

    def candidate(self, candidate_id: int) -> dict:
        return next(e.candidate for e in [self.base, *self.rows]
                    if e and e.candidate["id"] == candidate_id)


def collect(run_dir: str | Path) -> Snapshot:
    with Ledger(RunDir(run_dir).ledger, create=False) as ledger, ledger.snapshot():
        session = ledger.session() or {"id": "(not started)", "created": time.time(),
                                       "config": {}}
        config = session["config"]
        base = ledger.baseline()
        base_results = comparable(ledger.results_of(base["id"]), config) if base else []
        rows = [_experiment(ledger, c, base_results, config) for c in ledger.candidates()]
        events = ledger.events(10)
        last_seen = max([session["created"], *(e["time"] for e in events),
                         *(r["finished_at"] or r["started_at"] for e in rows for r in e.runs)])
        life = liveness(run_dir, ledger.last_event(STARTED), ledger.last_event(STOPPED),
                        last_seen)
        return Snapshot(session, config.get("objective", "time-to-loss"),
                        next((e for e in rows if e.candidate["experiment"] is None), None),
                        [e for e in rows if e.candidate["experiment"] is not None],
                        ledger.champion(), ledger.champions(), ledger.running_runs(),
                        events, ledger.n_experiments(), ledger.spend(), life)


def _f(value, spec: str = ".3f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def _ci(low, high, spec: str = ".3f") -> str:
    return "" if low is None or high is None else f" [{low:{spec}}, {high:{spec}}]"


def speedup_text(s: Speedup | None, spec: str = ".3f") -> str:
    return "–" if s is None else f"×{s.ratio:{spec}}{_ci(s.ci_low, s.ci_high, spec)}"


def short(text: str, limit: int = 0) -> str:
    """One line, at most `limit` characters."""
    text = " ".join(str(text).split())
    return text[:limit - 1] + "…" if limit and len(text) > limit else text


def _cell(text: str, limit: int = 0) -> str:
    """A markdown table cell."""
    return short(text, limit).replace("|", "\\|")


def duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else \
        f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def _fence(diff: str) -> str:
    longest = max((len(run) for run in diff.split("\n") if set(run) == {"`"}), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}diff\n{diff.rstrip()}\n{ticks}"


def _noise(s: Snapshot) -> str:
    """The baseline's noise, measured as the judge measures it."""
    ok = [r for r in (s.base.results if s.base else []) if r["status"] == "ok"]
    try:
        noise = measure_noise(ok, s.objective)
    except ValueError as err:
        return f"{len(ok)} ok baseline run(s): noise not measured ({err})."
    values = metric_values(ok, lambda r: censored_metric(r, s.objective))
    return (f"{noise.n} ok baseline runs: `{OBJECTIVES[s.objective][0]}` mean "
            f"{np.mean(values):.4g} (sd {np.std(values, ddof=1):.3g}); noise of a ratio "
            f"{noise.log_metric_sd:.2%} (sd of the log metric); val loss sd "
            f"{noise.loss_sd:.4f} nats.")


def _reason(decision: dict) -> str:
    """The decision's reason, with a human's review of a held candidate after it."""
    review = decision.get("review")
    reason = decision.get("reason", "")
    if review:
        note = f": {review['note']}" if review.get("note") else ""
        reason += f" Reviewed by a human: {review['verdict']}{note}."
    return reason


def _markdown(s: Snapshot) -> str:
    metric = OBJECTIVES[s.objective][0]
    lines = [f"# speedloop session {s.session['id']}", ""]
    for warning in (s.untrusted(), s.throttled()):
        if warning:
            lines += [f"**{warning}**", ""]
    lines += [f"Started {when(s.session['created'])}; objective `{s.objective}` (primary "
             f"metric `{metric}`). Speedups are against the baseline, measured from the "
             "ledger's runs (95% CI); effects, intervals and p-values are the judge's, against "
             "the champion of their time.", "",
             "## Session", "", "| setting | value |", "| --- | --- |"]
    for key, value in s.session["config"].items():
        if isinstance(value, dict) and len(value) > 8:  # e.g. the fixed files' hashes
            shown = f"{len(value)} entries"
        else:
            shown = value if isinstance(value, (str, int, float)) else json.dumps(value)
        lines.append(f"| {key} | {_cell(shown)} |")
    spend = llm_spend(s.spend, [e.candidate for e in s.rows])
    if spend:
        lines += ["", spend + "."]
    if s.busy_text():
        lines += ["", s.busy_text().capitalize() + "."]
    if s.timed():
        lines += ["", s.timed().text().capitalize() + "."]
    lines += ["", "## Baseline noise", "", _noise(s), "", "## Champion", ""]
    champ = s.champion
    if champ is None:
        lines.append("No champion yet: the baseline is still being measured.")
    else:
        mine = next(e for e in [s.base, *s.rows] if e and e.candidate["id"] == champ["id"])
        lines.append(f"Candidate {champ['id']} ({_cell(champ['description'])}), commit "
                     f"`{(champ['commit_sha'] or '-')[:10]}`: speedup "
                     f"**{speedup_text(mine.speedup)}** vs the baseline over "
                     f"{mine.speedup.n if mine.speedup else 0} runs; "
                     f"×{champ['speedup']:.3f} recorded when it became champion.")
    counts = {k: sum(e.kind == k for e in s.rows) for k in (*CLASSES, "pending")}
    lines += ["", f"Experiments: {len(s.rows)} ("
              + ", ".join(f"{n} {k}" for k, n in counts.items()) + ").", "",
              "## Experiments", "",
              "| # | id | description | proposer | outcome | verdict | check | speedup vs "
              "baseline | effect vs champion [CI] | p | runs | Δ val loss | reason |",
              "| ---: | ---: | --- | --- | --- | --- | --- | --- | --- | ---: | ---: | ---: "
              "| --- |"]
    for e in s.rows:
        c, d = e.candidate, e.candidate["decision"] or {}
        lines.append(
            f"| {c['experiment']} | {c['id']} | {_cell(c['description'], 60)} | "
            f"{_cell(c['proposer'])} | {e.outcome} | {c['verdict'] or 'pending'} | "
            f"{_cell(c['caught_by'] or '')} | {speedup_text(e.speedup)} | {_f(d.get('effect'))}"
            f"{_ci(d.get('ci_low'), d.get('ci_high'))} | {_f(d.get('p_value'), '.2g')} | "
            f"{len(e.runs)} | {_f(d.get('loss_delta'), '+.4f')} | "
            f"{_cell(_reason(d), 120)} |")
    lines += ["", "## Held for review", ""]
    held = [e for e in s.rows if e.kind == "held"]
    if not held:
        lines.append("None.")
    for e in held:
        c, d = e.candidate, e.candidate["decision"] or {}
        lines += [f"- #{c['experiment']} (id {c['id']}) {_cell(c['description'])}: "
                  f"{_cell(d.get('reason', ''))} Decide with `python -m agent review --run-dir "
                  f"D {c['id']} --accept|--reject --note ...`."]
    lines += ["", "## Accepted changes", ""]
    accepted = [e for e in s.rows if e.kind == "accepted"]
    if not accepted:
        lines.append("None yet.")
    for e in accepted:
        c = e.candidate
        lines += [f"### #{c['experiment']}: {_cell(c['description'])}", "",
                  f"Commit `{c['commit_sha'] or '-'}` (ref `{c['ref'] or '-'}`), proposer "
                  f"{c['proposer'] or '-'}, category {c['category'] or '-'}.", ""]
        if c["hypothesis"]:
            lines += [f"Hypothesis: {c['hypothesis']}", ""]
        lines += [f"Decision: {_reason(c['decision'] or {}) or '-'}", "",
                  "<details><summary>diff</summary>", "", _fence(c["diff"] or "(empty)"), "",
                  "</details>", ""]
    return "\n".join(lines).rstrip() + "\n"


def _results(s: Snapshot) -> tuple[list[str], list[list]]:
    """The rows of results.tsv with typed values (None: not measured), baseline first."""
    columns = ["commit", OBJECTIVES[s.objective][0], "memory_gb", "status", "description",
               *TSV_EXTRA]
    rows = []
    for e in [s.base, *s.rows] if s.base else s.rows:
        if e.kind == "pending" and e is not s.base:
            continue
        c, d, sp = e.candidate, e.candidate["decision"] or {}, e.speedup
        values = metric_values(e.results, lambda r: primary_metric(r, s.objective))
        memory, losses = e.ok_values("peak_memory_bytes"), e.ok_values("val_loss")
        rows.append([
            (c["commit_sha"] or "-")[:7], float(np.mean(values)) if values else None,
            max(memory) / 2**30 if memory else None,
            "keep" if e is s.base else CLASSES[e.kind],
            ("baseline: " if e is s.base else "") + " ".join(c["description"].split()),
            *((sp.ratio, sp.ci_low, sp.ci_high) if sp else (None, None, None)),
            d.get("effect"), d.get("ci_low"), d.get("ci_high"), d.get("p_value"), len(e.runs),
            float(np.mean(losses)) if losses else None, e.outcome, c["proposer"], c["id"],
            c["caught_by"]])
    return columns, rows


def results_table(run_dir: str | Path) -> tuple[list[str], list[list]]:
    """results.tsv's columns and rows as values (None where nothing was measured)."""
    return _results(collect(run_dir))


def _tsv(s: Snapshot) -> str:
    columns, rows = _results(s)
    # autoresearch writes 0 for what a crash did not measure; the new columns stay empty.
    specs = [None, ".6f", ".1f", None, None, *[".4f"] * 6, ".4g", None, ".4f"]
    lines = ["\t".join(columns)]
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            spec = specs[i] if i < len(specs) else None
            if value is None:
                cells.append(format(0.0, spec) if i in (1, 2) else "")
            else:
                cells.append(format(value, spec) if spec else str(value))
        lines.append("\t".join(cells))
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path) -> ReportPaths:
    """Write report.md, progress.png and results.tsv in `run_dir` from its ledger."""
    s, where = collect(run_dir), RunDir(run_dir)
    paths = ReportPaths(where.report_md, where.progress_png, where.results_tsv)
    paths.report.write_text(_markdown(s))
    paths.results.write_text(_tsv(s))
    progress_chart.plot(paths.progress, s)
    return paths


def llm_spend(spend: dict, candidates: Sequence[dict]) -> str:
    """`LLM spend: $1.234 over 56 requests (7 candidates)`, or "" when no LLM proposed.
    `spend` is the ledger's record of every request (Ledger.spend), drafts that never
    became a candidate included."""
    if not spend.get("requests"):
        return ""
    used = [c for c in candidates if c.get("usage") and c["usage"].get("requests")]
    return (
        f"LLM spend: ${spend['cost_usd']:.3f} over {spend['requests']} requests "
        f"({len(used)} candidates); tokens in {spend['input_tokens']:,}, out "
        f"{spend['output_tokens']:,}, cache read {spend['cache_read_input_tokens']:,}, "
        f"cache write {spend['cache_creation_input_tokens']:,}"
    )
