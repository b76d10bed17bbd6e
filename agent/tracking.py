"""Weights & Biases tracking of a session, derived from the ledger, live.

One W&B run per benchmark run (group = the session's id, job type baseline / candidate /
confirmation / champion), opened when the run starts: what train.py prints streams into
it as it comes (the trainer's loss and tokens/s every few steps, each evaluation's val
loss), plotted against training seconds (`by_seconds/*`) and tokens (`by_tokens/*`). At
the end: the result as summary, the run's log as a file, the candidate's diff as an
artifact. Its config carries the session's settings and the candidate's; its tags the
role, and once the candidate is decided its verdict and the check that caught it: a run
stays open until then, so the tags are set on the run itself (a run left from a killed
process is resumed by id for them). One session run (job type "session") takes the
session's settings (again when the baseline sets the target) and, at every decision, a
point, the candidates table and the progress chart: a session killed at any moment keeps
every decision so far (each waits until W&B's service holds it, whose writer flushes the
file every FLUSH_S seconds).

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
import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

from agent import report
from agent.judge import comparable
from agent.ledger import Ledger
from agent.proposers.sweep import knob_of
from agent.rundir import RunDir
from agent.stats import speedup_vs_baseline
from bench import protocol

MODES = ("online", "offline", "disabled")  # and "auto": decide from the environment
_ALIASES = {"dryrun": "offline", "run": "online"}  # older values of WANDB_MODE
JOB_TYPES = {"baseline": "baseline", "screen": "candidate", "confirm": "confirmation",
             "champion": "champion"}
SUMMARY_KEYS = ("tokens_per_sec", "train_seconds", "val_loss", "val_bpb", "time_to_target",
                "mfu", "peak_memory_bytes", "tokens", "steps", "n_params", "device",
                "gpu_name", "data_fingerprint")
SESSION_KEYS = ("preset", "objective", "experiments", "hours", "deadline", "train_args",
                "target_loss", "seconds", "rules", "gpus", "sandbox")
X_SECONDS, X_TOKENS = "train_seconds", "tokens"  # the x axes of every live series
MAX_FAILURES = 3
FLUSH_S = 0.05  # how often W&B writes a run's .wandb file: what a kill -9 can lose


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


def quiet_weave(mode: str) -> None:
    """W&B suggests Weave ("install Weave") whenever it sees an LLM client imported (the
    anthropic proposer): traces go to Weave only online with weave installed; else
    WANDB_DISABLE_WEAVE, W&B's documented switch, turns the suggestion off. A user's own
    setting of it wins."""
    if mode == "online" and importlib.util.find_spec("weave") is not None:
        import weave  # noqa: F401  (imported first, W&B initialises it for the session)
        return
    os.environ.setdefault("WANDB_DISABLE_WEAVE", "true")


def live_row(line: str) -> dict | None:
    """The W&B row of one line of train.py's stdout (bench/protocol.py), or None."""
    point = protocol.parse_eval_line(line)
    if point is not None:
        return {X_SECONDS: point["seconds"], X_TOKENS: point["tokens"],
                "by_seconds/val_loss": point["val_loss"], "by_tokens/val_loss": point["val_loss"]}
    point = protocol.parse_train_line(line)
    if point is not None:
        return {X_SECONDS: point["seconds"], X_TOKENS: point["tokens"],
                "by_seconds/train_loss": point["train_loss"],
                "by_tokens/train_loss": point["train_loss"],
                "by_seconds/tokens_per_sec": point["tokens_per_sec"]}
    return None


def decision_tags(candidate_row: dict) -> list[str]:
    """`verdict:accept`, `caught_by:holdout-gap`: what a decided candidate's runs are
    filtered by."""
    tags = [f"verdict:{candidate_row['verdict']}"] if candidate_row["verdict"] else []
    return tags + ([f"caught_by:{candidate_row['caught_by']}"]
                   if candidate_row["caught_by"] else [])


def _guarded(what: str):
    """Run a tracker method only while tracking is on, one at a time (the proposer's
    thread records refusals), and turn its errors into events."""
    def wrap(method):
        @functools.wraps(method)
        def run(self: Tracker, *args, **kwargs):
            if self.mode == "disabled":
                return
            with self._lock:
                try:
                    method(self, *args, **kwargs)
                    self._failures = 0
                except Exception as err:  # whatever W&B raises, the session goes on
                    self._failures += 1
                    give_up = what == "start the session run" or \
                        self._failures >= MAX_FAILURES
                    self._say(f"W&B: could not {what}: {type(err).__name__}: {err}"
                              + ("; W&B tracking is off for the rest of this session"
                                 if give_up else ""))
                    if give_up:
                        self.mode = "disabled"
                        self._close_all()
        return run
    return wrap


class Tracker:
    """Mirror a session's ledger into W&B; every method is a no-op when tracking is off.

    The loop calls, after the ledger has the facts: `start_session()` once the session is
    set (again on resume), `update_session()` when its settings change (the target),
    `start_run(ledger.run(r), ledger.candidate(c))` after each `start_run`, `run_line`
    with each line train.py prints, `finish_run` after each `finish_run`,
    `log_decision(ledger.candidate(c))` after each verdict or refusal, and `finish()` at
    the end, Ctrl-C included.
    """

    def __init__(self, ledger: Ledger, mode: str | None = None, project: str = "speedloop",
                 entity: str | None = None):
        self.ledger, self.project, self.entity = ledger, project, entity
        self.mode = resolve_mode(mode)
        self._failures = 0
        self._lock = threading.RLock()
        self._session_run = None
        self._runs: dict[int, dict] = {}  # ledger run id -> {run, candidate, evals}
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
        quiet_weave(self.mode)
        # WANDB_DIR, when set, says where the files go; else beside the ledger.
        self.dir = None if os.environ.get("WANDB_DIR") else str(RunDir(ledger.run_dir).wandb)

    def _say(self, text: str) -> None:
        print(f"speedloop: {text}", file=sys.stderr)
        try:
            self.ledger.log_event(text)
        except Exception as err:  # a busy ledger must not swallow the message
            print(f"speedloop: could not record that in the ledger: {err}", file=sys.stderr)

    def _close_all(self) -> None:
        runs = [r["run"] for r in self._runs.values()] + [self._session_run]
        self._runs, self._session_run = {}, None
        for run in runs:
            if run is None:
                continue
            try:
                run.finish(exit_code=1)
            except Exception as err:  # said, not raised: tracking is off anyway
                print(f"speedloop: W&B: could not close a run: {err}", file=sys.stderr)

    def _init(self, **kwargs):
        settings = self._wandb.Settings(
            console="off",  # leave the terminal to the loop's own display
            silent=True, disable_git=True,
            x_disable_stats=True,  # no system sampler competing with the benchmark
            x_transaction_log_flush_interval=FLUSH_S,
        )
        session = self.ledger.session()
        return self._wandb.init(
            project=self.project, entity=self.entity, dir=self.dir, mode=self.mode,
            group=session["id"], reinit="create_new", resume="allow", settings=settings,
            **kwargs)

    # -- the session run -------------------------------------------------------------------

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

    @_guarded("update the session's settings")
    def update_session(self, config: dict) -> None:
        """The session's settings changed (the baseline set the target or the time budget)."""
        if self._session_run is not None:
            shown = {k: v for k, v in config.items() if k != "fixed_hashes"}
            self._session_run.config.update(shown, allow_val_change=True)

    # -- benchmark runs --------------------------------------------------------------------

    def _run_config(self, run_row: dict, cand: dict) -> dict:
        """The run's config: the session's settings, the candidate's, the run's own."""
        session = self.ledger.session()
        base = self.ledger.baseline()
        prints = [r.get("data_fingerprint") for r in
                  (self.ledger.results_of(base["id"]) if base else [])]
        settings = {k: session["config"].get(k) for k in SESSION_KEYS}
        return {**settings, "session_proposer": session["config"].get("proposer"),
                "data": session["config"].get("data"),
                "data_fingerprint": next((p for p in prints if p), None),
                "seed": run_row["seed"], "role": run_row["role"], "candidate": cand["id"],
                "parent": cand["parent_id"], "experiment": cand["experiment"],
                "description": cand["description"], "hypothesis": cand["hypothesis"],
                "category": cand["category"], "proposer": cand["proposer"],
                "commit": cand["commit_sha"], "log_path": run_row["log_path"],
                **{k if k == "knobs" else f"knob_{k}": v
                   for k, v in (knob_of(cand["description"]) or {}).items()}}

    def _open(self, run_row: dict, cand: dict) -> dict:
        session = self.ledger.session()
        run = self._init(id=f"{session['id']}-run{run_row['id']}",
                         name=f"c{cand['id']} {run_row['role']} seed {run_row['seed']}",
                         job_type=JOB_TYPES[run_row["role"]],
                         config=self._run_config(run_row, cand),
                         tags=[f"role:{run_row['role']}"])
        for prefix, x in (("by_seconds", X_SECONDS), ("by_tokens", X_TOKENS)):
            run.define_metric(f"{prefix}/*", step_metric=x)
        self._runs[run_row["id"]] = entry = {"run": run, "candidate": cand["id"], "evals": 0}
        return entry

    @_guarded("start a benchmark run")
    def start_run(self, run_row: dict, candidate_row: dict) -> None:
        """Open the W&B run of a benchmark run that starts now."""
        self._open(run_row, candidate_row)

    @_guarded("stream a benchmark run")
    def run_line(self, run_id: int, line: str) -> None:
        """One line of train.py's stdout, into its run as it comes."""
        entry, row = self._runs.get(run_id), live_row(line)
        if entry is None or row is None:
            return
        entry["evals"] += "by_seconds/val_loss" in row
        entry["run"].log(row)

    @_guarded("finish a benchmark run")
    def finish_run(self, run_row: dict, candidate_row: dict) -> None:
        """The end of a benchmark run: its result, log and diff. The run stays open for the
        verdict's tags (a champion's re-measurement, which no verdict follows, closes)."""
        entry = self._runs.get(run_row["id"]) or self._open(run_row, candidate_row)
        run, cand = entry["run"], candidate_row
        result = run_row["result"] or {}
        if not entry["evals"]:  # lines not streamed (a fixed-hash failure): the curve
            for point in result.get("curve") or []:
                run.log({X_SECONDS: point["seconds"], X_TOKENS: point["tokens"],
                         "by_seconds/val_loss": point["val_loss"],
                         "by_tokens/val_loss": point["val_loss"]})
        run.summary.update({k: result[k] for k in SUMMARY_KEYS if k in result})
        run.summary.update({"outcome": run_row["outcome"],
                            "wall_seconds": run_row["wall_seconds"]})
        if result.get("data_fingerprint"):
            run.config.update({"data_fingerprint": result["data_fingerprint"]},
                              allow_val_change=True)
        if result.get("sandbox") is False:
            run.tags = (*run.tags, "untrusted")
        if run_row["error"]:
            run.summary["error"] = run_row["error"][-2000:]  # the traceback's tail
        log = Path(run_row["log_path"] or "")
        if log.is_file():
            run.save(str(log), base_path=str(log.parent), policy="now")
        if cand["diff"]:
            session = self.ledger.session()
            diff = self._wandb.Artifact(f"diff-{session['id']}-c{cand['id']}", type="diff",
                                        description=cand["description"])
            with diff.new_file("candidate.diff") as f:
                f.write(cand["diff"])
            run.log_artifact(diff)
        if run_row["role"] == "champion":
            del self._runs[run_row["id"]]
            run.finish()

    def _tag_and_close(self, candidate_row: dict) -> None:
        """Close the candidate's runs with its verdict's tags; a run this process did not
        open (a resumed session) is resumed by id for them."""
        tags = decision_tags(candidate_row)
        for run_row in self.ledger.runs_of(candidate_row["id"]):
            entry = self._runs.pop(run_row["id"], None)
            if entry is None:
                if run_row["role"] == "champion":
                    continue  # closed at its end: no verdict is about it
                entry = self._open(run_row, candidate_row)
                del self._runs[run_row["id"]]
            run = entry["run"]
            run.tags = (*run.tags, *tags)
            run.config.update({"verdict": candidate_row["verdict"],
                               "caught_by": candidate_row["caught_by"]}, allow_val_change=True)
            run.finish()

    # -- decisions -------------------------------------------------------------------------

    @_guarded("log a decision")
    def log_decision(self, candidate_row: dict) -> None:
        """A decided, held or refused candidate: its runs get the verdict's tags and close;
        the session run gets a point, the candidates table and the progress chart."""
        self._tag_and_close(candidate_row)
        if self._session_run is None:
            return
        cand, decision = candidate_row, candidate_row["decision"] or {}
        row = self._table_and_chart()
        if cand["experiment"] is not None:
            config = self.ledger.session()["config"]
            base = self.ledger.baseline()
            measured = speedup_vs_baseline(
                comparable(self.ledger.results_of(base["id"]) if base else [], config),
                comparable(self.ledger.results_of(cand["id"]), config),
                config.get("objective", "time-to-loss"))
            champion = self.ledger.champion()
            row.update({"decision/experiment": cand["experiment"],
                        "decision/candidate": cand["id"],
                        "decision/verdict": cand["verdict"] or cand["state"],
                        "decision/description": cand["description"],
                        "decision/accepted": int(cand["verdict"] == "accept"),
                        "decision/best_speedup": champion["speedup"] if champion else None,
                        "decision/speedup": measured.ratio if measured else None,
                        "decision/effect": decision.get("effect"),
                        "decision/p_value": decision.get("p_value")})
        self._session_run.log({k: v for k, v in row.items() if v is not None})
        # A decision must survive a kill -9 that comes next: `step` returns once W&B's service
        # holds the row, and its writer puts it in the file within FLUSH_S.
        self._session_run.step  # noqa: B018  (reading it waits for the service)
        time.sleep(2 * FLUSH_S)

    def _table_and_chart(self) -> dict:
        """The candidates table and the progress chart, as the ledger has them now (the
        report is rewritten first, so the chart is the ledger's latest)."""
        paths = report.write_report(self.ledger.run_dir)
        columns, rows = report.results_table(self.ledger.run_dir)
        return {"progress": self._wandb.Image(str(paths.progress)),
                "candidates": self._wandb.Table(columns=columns, data=rows)}

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
        """Log the final table and chart, then close every run: a benchmark run still open
        was never decided (the session stopped first)."""
        for entry in self._runs.values():
            entry["run"].finish(exit_code=1)
        self._runs = {}
        if self._session_run is None:
            return
        run, self._session_run = self._session_run, None
        try:
            run.log(self._table_and_chart())
            champion = self.ledger.champion()
            run.summary.update({"experiments": self.ledger.n_experiments(),
                                "best_speedup": champion["speedup"] if champion else None})
        finally:
            run.finish()
