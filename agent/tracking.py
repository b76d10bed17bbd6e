"""Weights & Biases tracking of a session, derived from the ledger.

One W&B run per finished benchmark run (group = the session's id, job type baseline /
candidate / confirmation / champion; config = preset, seed, the candidate's description and
more; the candidate's diff as an artifact; the evaluation curve as a series over tokens; the
result metrics as summary), and one session run (job type "session") with a point per
decision, the progress chart and the table of candidates.

Mode: an explicit `mode` wins, then WANDB_MODE, then "online" when WANDB_API_KEY is set,
else "offline" (files under WANDB_DIR or the run directory's wandb/; upload them later
with `wandb sync`). "disabled" writes nothing and never imports wandb. Without wandb
installed (the GPU machines) the tracker says so once and does nothing.

What tracking must never do: stop or slow the session. Every W&B error is caught, printed
as one line and kept as a ledger event; a tracker whose session run cannot start, or that
fails three times in a row, turns itself off and says so.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from agent import report
from agent.judge import comparable
from agent.ledger import Ledger
from agent.rundir import RunDir
from agent.stats import speedup_vs_baseline

MODES = ("online", "offline", "disabled")  # and "auto": decide from the environment
_ALIASES = {"dryrun": "offline", "run": "online"}  # older values of WANDB_MODE
JOB_TYPES = {"baseline": "baseline", "screen": "candidate", "confirm": "confirmation",
             "champion": "champion"}
SUMMARY_KEYS = ("tokens_per_sec", "train_seconds", "val_loss", "val_bpb", "time_to_target",
                "mfu", "peak_memory_bytes", "tokens", "steps", "n_params", "device",
                "gpu_name", "data_fingerprint")
MAX_FAILURES = 3


def resolve_mode(mode: str | None = None) -> str:
    """The W&B mode: `mode` unless None or "auto", else WANDB_MODE, else online with an API
    key, else offline."""
    chosen = (mode if mode != "auto" else None) or os.environ.get("WANDB_MODE") or \
        ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    chosen = _ALIASES.get(chosen, chosen)
    if chosen not in MODES:
        raise ValueError(f"W&B mode {chosen!r} (from the command line or WANDB_MODE): "
                         f"choose one of {MODES}")
    return chosen


def _guarded(what: str):
    """Run a tracker method only while tracking is on, and turn its errors into events."""
    def wrap(method):
        @functools.wraps(method)
        def run(self: Tracker, *args, **kwargs):
            if self.mode == "disabled":
                return
            try:
                method(self, *args, **kwargs)
                self._failures = 0
            except Exception as err:  # whatever W&B raises, the session goes on
                self._failures += 1
                give_up = what == "start the session run" or self._failures >= MAX_FAILURES
                self._say(f"W&B: could not {what}: {type(err).__name__}: {err}"
                          + ("; W&B tracking is off for the rest of this session"
                             if give_up else ""))
                if give_up:
                    self.mode = "disabled"
                    self._close_session_run()
        return run
    return wrap


class Tracker:
    """Mirror a session's ledger into W&B; every method is a no-op when tracking is off.

    The loop calls, after the ledger has the facts: `start_session()` once the session is
    set (again on resume), `log_run(ledger.run(r), ledger.candidate(c))` after each
    `finish_run`, `log_decision(ledger.candidate(c))` after each verdict or refusal, and
    `finish()` at the end, Ctrl-C included.
    """

    def __init__(self, ledger: Ledger, mode: str | None = None, project: str = "speedloop",
                 entity: str | None = None):
        self.ledger, self.project, self.entity = ledger, project, entity
        self.mode = resolve_mode(mode)
        self._failures = 0
        self._session_run = None
        self._wandb = None
        if self.mode == "disabled":
            return
        try:
            import wandb  # lazily: only a tracked session pays for it, and it may be absent
        except ImportError:
            self.mode = "disabled"
            self._say("W&B: wandb is not installed, tracking is off "
                      "(pip install wandb to turn it on)")
            return
        self._wandb = wandb
        # WANDB_DIR, when set, says where the files go; else beside the ledger.
        self.dir = None if os.environ.get("WANDB_DIR") else str(RunDir(ledger.run_dir).wandb)

    def _say(self, text: str) -> None:
        print(f"speedloop: {text}", file=sys.stderr)
        try:
            self.ledger.log_event(text)
        except Exception as err:  # a busy ledger must not swallow the message
            print(f"speedloop: could not record that in the ledger: {err}", file=sys.stderr)

    def _close_session_run(self) -> None:
        run, self._session_run = self._session_run, None
        if run is None:
            return
        try:
            run.finish(exit_code=1)
        except Exception as err:  # said, not raised: tracking is off anyway
            print(f"speedloop: W&B: could not close the session run: {err}", file=sys.stderr)

    def _init(self, **kwargs):
        settings = self._wandb.Settings(
            console="off",  # leave the terminal to the loop's own display
            silent=True, disable_git=True,
            x_disable_stats=True,  # no system sampler competing with the benchmark
        )
        session = self.ledger.session()
        return self._wandb.init(
            project=self.project, entity=self.entity, dir=self.dir, mode=self.mode,
            group=session["id"], reinit="create_new", resume="allow", settings=settings,
            **kwargs)

    @_guarded("start the session run")
    def start_session(self, config: dict | None = None) -> None:
        """Open the session run; `config` defaults to the ledger's session config."""
        session = self.ledger.session()
        if session is None:
            raise RuntimeError("the ledger has no session yet: call set_session first")
        config = config or session["config"]
        trusted = config.get("sandbox", True)
        self._session_run = self._init(
            id=f"{session['id']}-session", name=f"session {session['id']}",
            job_type="session", config=config, tags=[] if trusted else ["untrusted"],
            notes=None if trusted else "candidate code ran without a sandbox: not evidence")
        self._session_run.define_metric("decision/*", step_metric="decision/experiment")
        where = "W&B online" if self.mode == "online" else (
            f"W&B offline in {Path(self._session_run.dir).parent.parent}; upload later "
            "with `wandb sync` on its offline-run-* folders")
        self._say(f"{where} (project {self.project}, group {session['id']})")

    @_guarded("log a benchmark run")
    def log_run(self, run_row: dict, candidate_row: dict) -> None:
        """One W&B run for one finished benchmark run (ledger dicts: `run`, `candidate`)."""
        if run_row["state"] != "finished":
            return  # a running or discarded run has nothing to show and never counts
        session = self.ledger.session()
        result, cand = run_row["result"] or {}, candidate_row
        config = {
            "preset": session["config"].get("preset"),
            "objective": session["config"].get("objective"),
            "seed": run_row["seed"], "role": run_row["role"], "candidate": cand["id"],
            "parent": cand["parent_id"], "experiment": cand["experiment"],
            "description": cand["description"], "hypothesis": cand["hypothesis"],
            "category": cand["category"], "proposer": cand["proposer"],
            "commit": cand["commit_sha"], "log_path": run_row["log_path"],
            "sandbox": result.get("sandbox")}
        untrusted = result.get("sandbox") is False
        run = self._init(id=f"{session['id']}-run{run_row['id']}",
                         name=f"c{cand['id']} {run_row['role']} seed {run_row['seed']}",
                         job_type=JOB_TYPES[run_row["role"]], config=config,
                         tags=["untrusted"] if untrusted else [])
        try:
            run.define_metric("curve/*", step_metric="curve/tokens")
            for point in result.get("curve") or []:
                run.log({f"curve/{k}": v for k, v in point.items()})
            run.summary.update({k: result[k] for k in SUMMARY_KEYS if k in result})
            run.summary.update({"outcome": run_row["outcome"],
                                "wall_seconds": run_row["wall_seconds"]})
            if run_row["error"]:
                run.summary["error"] = run_row["error"][-2000:]  # the traceback's tail
            if cand["diff"]:
                diff = self._wandb.Artifact(f"diff-{session['id']}-c{cand['id']}", type="diff",
                                            description=cand["description"])
                with diff.new_file("candidate.diff") as f:
                    f.write(cand["diff"])
                run.log_artifact(diff)
        finally:
            run.finish()

    @_guarded("log a decision")
    def log_decision(self, candidate_row: dict) -> None:
        """A point on the session run for a decided or refused candidate."""
        if self._session_run is None or candidate_row["experiment"] is None:
            return
        cand, decision = candidate_row, candidate_row["decision"] or {}
        config = self.ledger.session()["config"]
        base = self.ledger.baseline()
        measured = speedup_vs_baseline(
            comparable(self.ledger.results_of(base["id"]) if base else [], config),
            comparable(self.ledger.results_of(cand["id"]), config),
            config.get("objective", "time-to-loss"))
        champion = self.ledger.champion()
        point = {"decision/experiment": cand["experiment"],
                 "decision/accepted": int(cand["verdict"] == "accept"),
                 "decision/best_speedup": champion["speedup"] if champion else None,
                 "decision/speedup": measured.ratio if measured else None,
                 "decision/effect": decision.get("effect"),
                 "decision/p_value": decision.get("p_value")}
        self._session_run.log({k: v for k, v in point.items() if v is not None})

    @_guarded("log the replay")
    def log_replay(self, columns: list[str], rows: list[list], plot: Path) -> None:
        """A leaderboard replay's table (agent/replay_report.py) and its plot of time against
        rung, on the session run."""
        if self._session_run is None:
            return
        self._session_run.log({"replay/table": self._wandb.Table(columns=columns, data=rows),
                               "replay/time_by_rung": self._wandb.Image(str(plot))})

    @_guarded("finish the session run")
    def finish(self) -> None:
        """Log the progress chart and the candidates table, then close the session run.

        It (re)writes the report first, so the chart it logs is the ledger's latest."""
        if self._session_run is None:
            return
        run, self._session_run = self._session_run, None
        try:
            paths = report.write_report(self.ledger.run_dir)
            columns, rows = report.results_table(self.ledger.run_dir)
            champion = self.ledger.champion()
            run.log({"progress": self._wandb.Image(str(paths.progress)),
                     "candidates": self._wandb.Table(columns=columns, data=rows)})
            run.summary.update({"experiments": self.ledger.n_experiments(),
                                "best_speedup": champion["speedup"] if champion else None})
        finally:
            run.finish()

