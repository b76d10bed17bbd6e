"""The experiment loop: baseline, then propose, run, judge, keep or discard, until a budget ends.

A `Session` holds one run directory's handles (its ledger, config, workspace and tracker)
and hands them to collaborators with one job each: the Measurer runs and records a
benchmark (agent/measure.py), `measure_baseline` makes the first champion
(agent/baseline.py), the Drafter turns an edit into a candidate (agent/drafting.py) and
the Recorder judges and records it (agent/recording.py). The loop itself keeps the budgets,
resumes, re-measures the champion now and then, and brakes a proposer that fails the same
way `max_failures` times in a row instead of cycling until the budget ends. A replay
(agent/replay.py) is this loop with a ladder for proposer and its own steps.

Every step reads the ledger first and writes it before moving on, so the loop can be
killed at any instant and resumed (`python -m agent run --resume D`): runs that were in
flight are discarded and re-run, and nothing decided is decided again. What the loop must
never do: run candidate code in its own process (the runner does, in a child process
group), trust a proposer's edit (the workspace and the scan check it) or decide on its own
(the judge does).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from agent import baseline, child, liveness
from agent.config import SessionConfig, SessionStop, stored
from agent.costs import ProposerStop
from agent.drafting import Drafter, Edit
from agent.ledger import Ledger
from agent.measure import Measurer
from agent.proposers import Proposer
from agent.recording import Recorder
from agent.rundir import RunDir
from agent.scheduler import InFlight
from agent.tracking import Tracker
from agent.workspace import Workspace


class Session:
    def __init__(self, run_dir: Path, proposer: Proposer, say=print, waiting=None):
        self.run_dir = RunDir(run_dir)
        session, self.config = stored(self.run_dir.root)
        self.id, self.started = session["id"], session["created"]  # --hours counts from here
        self.ledger = Ledger(self.run_dir.ledger, create=False)
        self.proposer = proposer
        self.say = say  # prints one line of progress
        waiting = waiting or (lambda text: contextlib.nullcontext())  # a live spinner
        self.tracker = Tracker(self.ledger, mode=self.config.wandb)
        self._workspace: Workspace | None = None
        self._failures: list[str] = []  # causes of the proposer's failures in a row
        workspace = lambda: self.workspace  # noqa: E731  (made on first use)
        self.measurer = Measurer(self.run_dir, self.ledger, self.config, workspace,
                                 self.tracker, say, waiting)
        self.drafter = Drafter(proposer, self.run_dir, self.ledger, self.config, workspace,
                               self.measurer, self.tracker, self.event)
        self.recorder = Recorder(self.run_dir, self.ledger, self.config, workspace,
                                 self.measurer, self.tracker, self.event)
        if hasattr(proposer, "say"):  # LLM proposers report pauses and costs in the log
            proposer.say = self.event
        if hasattr(proposer, "on_request"):  # and each request's cost, as it is paid
            proposer.on_request = lambda usage: self.ledger.add_spend(usage["model"], usage)
        if hasattr(proposer, "stop_at"):  # an LLM proposer's pauses end with the session
            proposer.stop_at = self.ends_at()

    @classmethod
    def create(cls, run_dir: Path, config: SessionConfig, proposer: Proposer | None, **kw):
        """A new session in `run_dir`: its ledger appears whole (Ledger.create) or not at
        all, and a failed create leaves no directory it made."""
        run_dir = Path(run_dir)
        if RunDir(run_dir).ledger.exists():
            raise SessionStop(f"{run_dir} already holds a session: use --resume {run_dir}")
        config.judge_config()  # validate before anything is written
        config.acceptance_config()
        made = run_dir  # the first directory this call makes, with all below it
        while not made.parent.exists():
            made = made.parent
        made = None if made.exists() else made
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            Ledger.create(RunDir(run_dir).ledger, asdict(config)).close()
            return cls(run_dir, proposer, **kw)
        except BaseException:
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
            raise

    @property
    def workspace(self) -> Workspace:
        """The session's worktree: made on first use, so a session killed before it had one
        still resumes; opened (and checked) once per process."""
        if self._workspace is None:
            repo, path = Path(self.config.repo), self.run_dir.worktree
            if not (path / ".git").exists() and self.ledger.baseline() is None:
                self._workspace = Workspace.create(repo, path, self.id)
            else:
                self._workspace = Workspace.open(repo, path, self.id)
        return self._workspace

    def event(self, text: str) -> None:
        self.ledger.log_event(text)
        self.say(text)

    # -- the public steps ----------------------------------------------------------------

    def submit(self, edit: Edit) -> dict | None:
        """Submit an edit as a candidate: `edit(worktree)` changes the champion's worktree
        and returns its Proposal; the engine takes it as a commit, checks it and records it.
        Returns the candidate's ledger row (proposed, or refused)."""
        return self.drafter.submit(edit)

    def measure_baseline(self) -> dict:
        """The baseline, measured if it is not yet: the first champion."""
        return baseline.measure_baseline(self.measurer, self.event)

    # -- budgets -------------------------------------------------------------------------

    def ends_at(self) -> float | None:
        """When --hours or --deadline ends the session (unix time), or None."""
        cfg = self.config
        ends = [t for t in (cfg.hours and self.started + cfg.hours * 3600, cfg.deadline) if t]
        return min(ends) if ends else None

    def stop_reason(self, in_flight: int = 0) -> str | None:
        """Why the session must not start another candidate (`in_flight` are running): a
        budget is spent."""
        cfg = self.config
        if cfg.experiments is not None and \
                self.ledger.n_experiments() + in_flight >= cfg.experiments:
            return f"{cfg.experiments} experiments done"
        if cfg.hours is not None and time.time() - self.started >= cfg.hours * 3600:
            return f"{cfg.hours} hours spent"
        if cfg.deadline is not None and time.time() >= cfg.deadline:
            return "the deadline passed"
        return None

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> str:
        """Run until a budget ends or the proposer has nothing left; returns why it stopped."""
        shown = {k: v for k, v in asdict(self.config).items() if k != "fixed_hashes"}
        self.tracker.start_session(shown)  # the file hashes are for the checks, not a chart
        try:
            with self.running():
                why = self._run()
            self.finished()
            return why
        finally:
            self.measurer.close()  # a cluster's workers end with the session
            self.tracker.finish()

    @contextlib.contextmanager
    def running(self):
        """While the loop runs: hold the run directory's lock (`agent review` waits for no
        running loop; `status` sees it alive), and record in the ledger when it started and
        why it stopped, so `status` tells a stopped session from a killed one."""
        with liveness.session_lock(self.run_dir.root):
            self.ledger.log_event(f"{liveness.STARTED} (pid {os.getpid()})")
            try:
                yield
            except KeyboardInterrupt as e:  # Ctrl-C, or a SIGTERM (agent/cli.py)
                how = f"a {e.args[0]}" if e.args else "the user (Ctrl-C)"
                self.ledger.log_event(f"{liveness.STOPPED}interrupted by {how}")
                raise
            except SessionStop as e:
                self.ledger.log_event(f"{liveness.STOPPED}{e}")
                raise
            except Exception as e:
                how = child.stopped_by() if isinstance(e, child.Cancelled) else None
                if how is not None:  # a stop signal whose KeyboardInterrupt was swallowed
                    who = "the user (Ctrl-C)" if how == "SIGINT" else f"a {how}"
                    self.ledger.log_event(f"{liveness.STOPPED}interrupted by {who}")
                    raise KeyboardInterrupt(how) from e
                self.ledger.log_event(f"{liveness.STOPPED}an error: {type(e).__name__}: {e}")
                raise

    def resume_state(self) -> None:
        """Session start or resume: drop runs a kill left unfinished, put the champion
        branch where the ledger says, and take the fixed files' hashes."""
        discarded = self.ledger.discard_unfinished_runs()
        if discarded:
            self.event(f"resumed: discarded unfinished run(s) {discarded}; they will be re-run")
        for c in self.ledger.candidates(["proposed"]):
            if c["commit_sha"] is None:  # nothing to run: a ledger from a session killed
                # between adding a candidate and refusing it
                self.ledger.refuse(c["id"], "left without a commit by a killed session")
        champion = self.ledger.champion()
        if champion is not None:  # a kill between the ledger's accept and the git update
            self.workspace.move_champion(champion["commit_sha"])
        self.workspace.reset()
        self.measurer.session_hashes()

    def _run(self) -> str:
        if self.config.judge_config().paired:
            self.event("--paired is experimental: its judge is strict (a candidate's spread "
                       "never below the session's pair noise), and it has few real-run A/A "
                       "decisions yet (bench/RESULTS.md)")
        self.resume_state()
        self.prepare()
        self.measure_baseline()
        why = None
        with InFlight(len(self.measurer.pool)) as work:
            while True:
                for key, result in work.finished():
                    if key != "champion" and result is not None:  # its champion changed
                        self.drafter.rebase(result)
                if not work.full():
                    pending = [c for c in self.ledger.candidates(["proposed", "running"])
                               if c["id"] not in work]
                    if pending:
                        self.start(work, pending[0])
                        continue
                    if why is None:
                        why = self.feed(work)
                        if why is None:
                            continue
                if not len(work):
                    break
                work.wait()
        self.drafter.keep_pending()
        self.workspace.reset()
        self.event(f"{liveness.STOPPED}{why}")
        return why

    def feed(self, work: InFlight) -> str | None:
        """Put one more piece of work in flight (a champion re-measurement, or the next
        candidate, refused ones recorded on the way); returns why the session drafts no
        more instead (what is in flight still finishes)."""
        while True:
            why = self.stop_reason(in_flight=experiments_in(work))
            if why:
                return why
            if self.remeasure_due() and "champion" not in work:
                self.event("re-measuring the champion")
                work.submit("champion", self.measurer.benchmark, self.ledger.champion(),
                            "champion")
                return None
            try:
                candidate = self.drafter.next_candidate()
            except ProposerStop as e:  # the LLM budget is spent, say: a normal end
                return f"the proposer stopped: {e}"
            if candidate is None:
                return self.nothing_left()
            why = self.brake(candidate)
            if why:
                return why
            if candidate["state"] != "refused":
                self.start(work, candidate)
                return None

    def start(self, work: InFlight, candidate: dict) -> None:
        """Start an experiment; the next candidates are drafted meanwhile, as many as the
        budget of experiments has room for beside those in flight and in the making."""
        ahead = experiments_in(work) + 1
        self.drafter.prefetch(lambda drafts: not self.stop_reason(in_flight=ahead + drafts))
        work.submit(candidate["id"], self.experiment, candidate)

    def prepare(self) -> None:
        """What the session does before its baseline (a replay: its starting commit)."""

    def finished(self) -> None:
        """What the session does after its loop, the lock released (a replay: its table)."""

    def nothing_left(self) -> str:
        return "the proposer has nothing more to propose"

    def experiment(self, candidate: dict) -> dict | None:
        """One experiment: judged by its runs, and recorded. Returns the candidate when its
        champion was replaced before its verdict (the loop re-bases it), else None."""
        self.event(f"experiment #{candidate['experiment']}: {candidate['description']}")
        decision = self.recorder.judge(candidate)
        if decision is None or not self.recorder.record(candidate, decision):
            return self.ledger.candidate(candidate["id"])
        return None

    def remeasure_due(self) -> bool:
        """After every `remeasure_every` candidates that ran (refusals ran nothing) since
        the champion was last measured; never with paired runs, where every candidate run
        has a champion run beside it."""
        if self.config.judge_config().paired:
            return False
        champion = self.ledger.champion()
        since = [c for c in self.ledger.candidates(["decided", "held"])
                 if c["decided_at"] and c["decided_at"] > champion["champion_since"]]
        champion_runs = self.ledger.runs_of(champion["id"], roles=["champion"])
        recent = [r for r in champion_runs if r["started_at"] > champion["champion_since"]]
        return len(since) >= self.config.remeasure_every * (len(recent) + 1)

    def brake(self, candidate: dict) -> str | None:
        """Why the session must stop after this proposal, or None: a proposer that failed
        `max_failures` times in a row with the same cause (a command that exits 1 or
        hangs, patches that do not apply, an API that is down) will not do better before
        the budget ends, and cycling through it costs the night's device time."""
        cause = failure_cause(candidate) if candidate["state"] == "refused" else None
        self._failures = self._failures + [cause] if cause is not None else []
        recent = self._failures[-self.config.max_failures:]
        if len(recent) == self.config.max_failures and len(set(recent)) == 1:
            return f"the proposer failed {len(recent)} times in a row: {cause}"
        return None


def experiments_in(work: InFlight) -> int:
    """The experiments in flight (a champion re-measurement is none)."""
    return len([key for key in work.keys() if key != "champion"])


def failure_cause(candidate: dict) -> str:
    """What made a refused proposal fail, the same for each repeat: the check that refused
    it, or the first clause of the reason ("exited with status 1", "does not apply to the
    champion", "timed out after 600 s")."""
    if candidate["caught_by"]:
        return candidate["caught_by"]
    reason = (candidate["decision"] or {}).get("reason", "")
    return re.split(r"[:;\n]", reason, maxsplit=1)[0].strip() or "no reason given"
