"""`status` as data and as a live view: `python -m agent status D --json` and `--watch`
(and, without either, agent/status.py's text).

`status_data` is everything `status` shows, as one JSON-ready dict (the keys are listed in
STATUS_KEYS; tests/test_status.py holds its schema). `watch_view` renders that dict as a
rich renderable: champion, speedup so far, what runs now, the last decisions, the spend;
`watch` refreshes it every `every` seconds with rich.live until Ctrl-C.

What this module must never do: write anything, or wait on a lock.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from agent.liveness import lock_holder
from agent.report import collect, llm_spend
from agent.status import status_text

STATUS_KEYS = ("session", "created", "state", "life", "untrusted", "preset", "objective",
               "proposer", "experiments", "budget_experiments", "spend", "busy", "champion",
               "decisions", "held", "running", "events")


def _speedup(s) -> dict | None:
    return None if s is None else {"ratio": s.ratio, "ci_low": s.ci_low, "ci_high": s.ci_high,
                                   "n": s.n}


def status_data(run_dir: str | Path, last: int = 10) -> dict:
    """Everything `status` shows, as plain JSON values."""
    s = collect(run_dir)
    cfg, champ = s.session["config"], s.champion
    running = []
    for r in s.running:
        c = s.candidate(r["candidate_id"])
        if s.life.state != "alive":
            what, holder = "left running", None
        elif r["lock_at"] is None and r["lock_path"]:
            what, holder = "waiting", lock_holder(r["lock_path"]).removeprefix("held by ")
        else:
            what, holder = "running", None
        running.append({"run": r["id"], "slot": r["slot"], "candidate": c["id"],
                        "description": c["description"],
                        "role": r["role"], "seed": r["seed"], "state": what,
                        "lock_holder": holder, "since": r["lock_at"] or r["started_at"],
                        "log": r["log_path"]})
    timed = s.timed()
    return {
        "session": s.session["id"], "created": s.session["created"], "state": s.life.state,
        "life": s.life.text, "untrusted": s.untrusted() or None,
        "preset": cfg.get("preset"), "objective": s.objective, "proposer": cfg.get("proposer"),
        "experiments": s.n_experiments, "budget_experiments": cfg.get("experiments"),
        "spend": {**s.spend, "text": llm_spend(s.spend, [e.candidate for e in s.rows])
                  or None},
        "busy": s.busy_text() or None,
        "timed": None if timed is None else {
            "share": timed.share, "runs": timed.runs,
            "seconds": {"wall": timed.wall, "train": timed.train, "startup": timed.startup,
                        "evaluation": timed.evaluation, "rest": timed.rest},
            "text": timed.text()},
        "champion": None if champ is None else {
            "id": champ["id"], "description": champ["description"],
            "speedup": champ["speedup"], "since": champ["champion_since"]},
        "decisions": [{"experiment": e.candidate["experiment"], "id": e.candidate["id"],
                       "description": e.candidate["description"],
                       "proposer": e.candidate["proposer"], "outcome": e.outcome,
                       "verdict": e.candidate["verdict"], "caught_by": e.candidate["caught_by"],
                       "speedup": _speedup(e.speedup), "runs": len(e.runs)}
                      for e in s.rows[-last:]],
        "held": [e.candidate["id"] for e in s.rows if e.kind == "held"],
        "running": running,
        "events": [{"time": ev["time"], "text": ev["text"]} for ev in s.events],
    }


def watch_view(data: dict, width: int = 110):
    """The live view of `status --watch`, from `status_data`."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    champ = data["champion"]
    lines = [Text(f"speedloop {data['session']}: {data['life']}"),
             Text(f"{data['preset']}, {data['objective']}, proposer {data['proposer']}; "
                  f"experiments {data['experiments']}"
                  + (f" of {data['budget_experiments']}" if data["budget_experiments"] else ""))]
    if data["untrusted"]:
        lines.insert(0, Text(data["untrusted"], style="bold red"))
    lines.append(Text("champion: none yet (the baseline is being measured)" if champ is None
                      else f"champion: candidate {champ['id']} ({champ['description']}), "
                      f"speedup ×{champ['speedup']:.3f} vs baseline", style="bold green"))
    now = time.time()
    for r in data["running"] or [None]:
        lines.append(Text("running now: nothing" if r is None else
                          f"{r['state']}: candidate {r['candidate']} ({r['description']}), "
                          f"{r['role']} run {r['run']}, seed {r['seed']}, slot {r['slot']}, "
                          f"{now - r['since']:.0f} s"))
    table = Table(title="last decisions", title_justify="left", box=box.SIMPLE_HEAD,
                  width=width)
    for name in ("#", "id", "description", "verdict", "check", "speedup", "runs"):
        table.add_column(name, no_wrap=name != "description")
    for d in data["decisions"][-8:]:
        sp = d["speedup"]
        table.add_row(str(d["experiment"]), str(d["id"]), d["description"],
                      d["verdict"] or "pending", d["caught_by"] or "",
                      "–" if sp is None else f"×{sp['ratio']:.3f}", str(d["runs"]))
    spend = [Text(data["spend"]["text"])] if data["spend"]["text"] else []
    busy = [Text(data["busy"])] if data["busy"] else []
    return Group(*lines, table, *spend, *busy)


def watch(run_dir: str | Path, every: float = 2.0) -> None:
    """A live terminal view of the session, refreshed every `every` s; Ctrl-C ends it."""
    from rich.live import Live

    try:
        with Live(watch_view(status_data(run_dir)), auto_refresh=False) as live:
            while True:
                time.sleep(every)
                live.update(watch_view(status_data(run_dir)), refresh=True)
    except KeyboardInterrupt:
        pass


def print_status(run_dir: str | Path, as_json: bool = False, live: bool = False) -> None:
    """`python -m agent status D [--json | --watch]`."""
    if as_json:
        print(json.dumps(status_data(run_dir), indent=1))
    elif live:
        watch(run_dir)
    else:
        print(status_text(run_dir))
