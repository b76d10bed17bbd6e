"""What `python -m agent status D` prints: where a session stands, as plain text.

The champion, the speedup so far, the last experiments, what runs now (or waits for the
device lock, and who holds it), the LLM spend and the latest events, all from one snapshot
of the ledger (agent/report.py `collect`) and the session's lock (agent/liveness.py).

What this module must never do: write anything, or wait on a lock.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

from agent.liveness import lock_holder, when
from agent.report import collect, duration, llm_spend, short, speedup_text


def status_text(run_dir: str | Path, last: int = 10, width: int = 110) -> str:
    """What `python -m agent status D` prints: champion, speedup so far, the last experiments,
    what runs now and the latest events, as plain text."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    s = collect(run_dir)
    now, cfg = time.time(), s.session["config"]
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None,
                      markup=False, highlight=False)  # descriptions may hold [brackets]
    for warning in (s.untrusted(), s.throttled()):
        if warning:
            console.print(warning)
    console.print(f"speedloop session {s.session['id']}, started {when(s.session['created'])} "
                  f"({duration(now - s.session['created'])} ago)")
    console.print(s.life.text)
    console.print(f"preset {cfg.get('preset', '?')}, objective {s.objective}, proposer "
                  f"{cfg.get('proposer', '?')}")
    budget = cfg.get("experiments")
    console.print(f"experiments decided: {s.n_experiments}"
                  + (f" of {budget}" if budget else ""))
    spend = llm_spend(s.spend, [e.candidate for e in s.rows])
    if spend:
        console.print(spend)
    if s.busy_text():
        console.print(s.busy_text())
    if s.timed():
        console.print(s.timed().text())
    if s.champion is None:
        console.print("champion: none yet (the baseline is being measured)")
    else:
        c = s.champion
        console.print(f"champion: candidate {c['id']} ({c['description']}), speedup "
                      f"×{c['speedup']:.3f} vs baseline, since "
                      f"{duration(now - c['champion_since'])} ago")
    if s.rows:
        table = Table(title=f"last {min(last, len(s.rows))} experiments", title_justify="left",
                      box=box.SIMPLE_HEAD, pad_edge=False)
        for name in ("#", "id", "description", "proposer", "outcome", "verdict", "check",
                     "vs baseline", "runs"):  # the judge's reasons are in report.md
            table.add_column(name, no_wrap=name != "description",
                             min_width=20 if name == "description" else None)
        for e in s.rows[-last:]:
            c = e.candidate
            table.add_row(str(c["experiment"]), str(c["id"]), short(c["description"], 40),
                          c["proposer"],
                          e.outcome, c["verdict"] or "pending", c["caught_by"] or "",
                          speedup_text(e.speedup, ".2f"), str(len(e.runs)))
        console.print(table)
    for e in (e for e in s.rows if e.kind == "held"):
        c = e.candidate
        console.print(f"held for review: candidate {c['id']} (#{c['experiment']} "
                      f"{c['description']}), x{(c['decision'] or {}).get('effect') or 0:.3f} "
                      f"vs its champion; `python -m agent review --run-dir {run_dir} {c['id']} "
                      "--accept|--reject`")
    for r in s.running:
        c = s.candidate(r["candidate_id"])
        on_slot = f", slot {r['slot']}" if cfg.get("devices") or cfg.get("cluster") else ""
        what = f"candidate {c['id']} ({c['description']}), {r['role']} run {r['id']}, seed " \
            f"{r['seed']}{on_slot}"
        if s.life.state != "alive":
            console.print(f"left running by the ended process: {what}; a resume discards and "
                          "re-runs it")
        elif r["lock_at"] is None and r["lock_path"]:
            held = lock_holder(r["lock_path"]).removeprefix("held by ")
            console.print(f"waiting now: {what}, for the lock held by {held} "
                          f"({r['lock_path']}), for {duration(now - r['started_at'])}")
        else:
            since = r["lock_at"] or r["started_at"]
            console.print(f"running now: {what}, for {duration(now - since)}; log "
                          f"{r['log_path'] or '-'}")
    if not s.running:
        console.print("running now: nothing")
    if s.events:
        console.print("events:")
        for ev in s.events:
            console.print(f"  {time.strftime('%H:%M:%S', time.localtime(ev['time']))} "
                          f"{ev['text']}")
    return console.export_text()
