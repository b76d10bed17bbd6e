"""The experiment loop: baseline, then propose, run, judge, keep or discard, until a budget ends.

Every step reads the ledger first and writes it before moving on, so the loop can be
killed at any instant and resumed (`python -m agent run --resume D`): runs that were in
flight are discarded and re-run, and nothing decided is decided again. The loop never
runs candidate code in its own process (the runner does, in a child process group), never
trusts a proposer's edit (the workspace checks it) and never decides on its own (the
judge does). A proposer that fails the same way `max_failures` times in a row stops the
session with that cause (the brake), instead of cycling until the budget ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from agent import acceptance, integrity, liveness, runner
from agent.acceptance import AcceptanceConfig
from agent.costs import ProposerStop
from agent.judge import Decision, JudgeConfig, assess, comparable
from agent.leaderboard import leaderboard_rules, under_rules
from agent.ledger import LEDGER_FILE, Ledger
from agent.proposers import Proposal, ProposalFailed, Proposer
from agent.review import session_lock
from agent.stats import OBJECTIVES, primary_metric
from agent.tracking import Tracker
from agent.workspace import (
    Candidate,
    EmptyChange,
    PatchError,
    RefusedChange,
    Workspace,
    apply_patch,
)
from bench import protocol
from bench.locks import lock_path

# Proposers that read the research context (and so the champion's profile).
LLM_PROPOSERS = ("anthropic", "command")


# Expected wall time of a first run, before any run was measured (runner timeouts scale it).
FIRST_RUN_SECONDS = {"cpu-tiny": 120.0, "gpu-small": 900.0, "gpt2-124m": 3600.0}


@dataclass
class SessionConfig:
    preset: str = "cpu-tiny"
    objective: str = "time-to-loss"  # time-to-loss | throughput | loss-at-time
    proposer: str = "sweep"
    proposer_arg: str | None = None  # e.g. the patch directory, or the agent command
    proposer_options: dict = field(default_factory=dict)  # LLMConfig / CommandConfig fields
    experiments: int | None = None  # stop after this many decided candidates
    hours: float | None = None  # stop after this many hours of session time
    deadline: float | None = None  # stop at this unix time
    baseline_runs: int = 3  # baseline replicates that measure the noise (>= 2)
    remeasure_every: int = 3  # re-measure the champion after this many candidates
    max_failures: int = 5  # proposer failures in a row, with one cause, that stop the session
    train_args: list[str] = field(default_factory=list)  # extra train.py flags, every run
    target_loss: float | None = None  # time-to-loss target; None: from the baseline replicates
    target_slack: float = 0.01  # least nats above the worst baseline replicate's final loss
    seconds: float | None = None  # loss-at-time budget; None: from one calibration run
    overlap: bool = True  # draft the next candidate while the current one runs
    early_stop_margin: float = 0.15  # nats behind the champion's curve that stop a screen
    timeout_factor: float = 3.0  # a run's hard timeout, in expected run times
    device: str = "cpu"
    gpus: int = 1  # processes of every benchmark run, one per GPU: torchrun when > 1
    rules: str | None = None  # a leaderboard's rules (judge.RULES) that acceptance also needs
    judge: dict = field(default_factory=dict)  # JudgeConfig overrides
    # AcceptanceConfig overrides: the holdout-gap and untimed-overhead tests, and the speedup
    # above which a step is held for a human (max_speedup), checked before every accept.
    acceptance: dict = field(default_factory=dict)
    wandb: str = "auto"  # auto (online with a key, else offline) | offline | disabled
    repo: str = "."
    # Integrity (bench/INTEGRITY.md): the sha256 of every fixed file, taken at session start
    # and checked before every run; and whether candidates the diff scan flags may run.
    fixed_hashes: dict | None = None
    allow_flagged: bool = False
    # False: candidate code runs unconfined (--no-sandbox), every result marked untrusted.
    sandbox: bool = True

    @classmethod
    def from_dict(cls, data: dict) -> SessionConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def judge_config(self) -> JudgeConfig:
        return JudgeConfig(**{"objective": self.objective, **self.judge})

    def acceptance_config(self) -> AcceptanceConfig:
        return AcceptanceConfig(**self.acceptance)


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


class SessionStop(Exception):
    """The session cannot go on (the baseline itself fails, say); the message says why."""


class Session:
    def __init__(self, run_dir: Path, proposer: Proposer, say=print, waiting=None):
        self.run_dir = Path(run_dir)
        self.ledger = Ledger(self.run_dir / LEDGER_FILE, create=False)
        self.proposer = proposer
        self.say = say  # prints one line of progress
        self.waiting = waiting or (lambda text: contextlib.nullcontext())  # a live spinner
        session = self.ledger.session()
        if session is None:
            raise SessionStop(f"{self.run_dir} has no session: start one with `agent run`")
        self.id = session["id"]
        self.config = SessionConfig.from_dict(session["config"])
        self.judge = self.config.judge_config()
        self.tracker = Tracker(self.ledger, mode=self.config.wandb)
        if hasattr(proposer, "say"):  # LLM proposers report pauses and costs in the log
            proposer.say = self.event
        if hasattr(proposer, "on_request"):  # and each request's cost, as it is paid
            proposer.on_request = lambda usage: self.ledger.add_spend(usage["model"], usage)
        self.started = session["created"]  # --hours counts from the session's start
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="proposer")
        self._next: Future | None = None  # the draft being made in the background
        self._failures: list[str] = []  # causes of the proposer's failures in a row
        if hasattr(proposer, "stop_at"):  # an LLM proposer's pauses end with the session
            proposer.stop_at = self.ends_at()

    # -- setting up ----------------------------------------------------------------------

    @classmethod
    def create(cls, run_dir: Path, config: SessionConfig, proposer: Proposer, **kw) -> Session:
        """A new session in `run_dir`: its ledger appears whole (Ledger.create) or not at
        all, and a failed create leaves no directory it made."""
        run_dir = Path(run_dir)
        if (run_dir / LEDGER_FILE).exists():
            raise SessionStop(f"{run_dir} already holds a session: use --resume {run_dir}")
        config.judge_config()  # validate before anything is written
        config.acceptance_config()
        made = run_dir  # the first directory this call makes, with all below it
        while not made.parent.exists():
            made = made.parent
        made = None if made.exists() else made
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            Ledger.create(run_dir / LEDGER_FILE, asdict(config)).close()
            return cls(run_dir, proposer, **kw)
        except BaseException:
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
            raise

    @property
    def workspace(self) -> Workspace:
        path = self.run_dir / "worktree"
        if not (path / ".git").exists() and self.ledger.baseline() is None:
            # Made on first use, so a session killed before it had one still resumes.
            return Workspace.create(Path(self.config.repo), path, self.id)
        return Workspace.open(Path(self.config.repo), path, self.id)

    def event(self, text: str) -> None:
        self.ledger.log_event(text)
        self.say(text)

    # -- budgets -------------------------------------------------------------------------

    def ends_at(self) -> float | None:
        """When --hours or --deadline ends the session (unix time), or None."""
        cfg = self.config
        ends = [t for t in (cfg.hours and self.started + cfg.hours * 3600, cfg.deadline) if t]
        return min(ends) if ends else None

    def out_of_budget(self) -> str | None:
        cfg = self.config
        if cfg.experiments is not None and self.ledger.n_experiments() >= cfg.experiments:
            return f"{cfg.experiments} experiments done"
        if cfg.hours is not None and time.time() - self.started >= cfg.hours * 3600:
            return f"{cfg.hours} hours spent"
        if cfg.deadline is not None and time.time() >= cfg.deadline:
            return "the deadline passed"
        return None

    # -- running one benchmark -----------------------------------------------------------

    def objective_args(self) -> list[str]:
        cfg = self.config
        if cfg.objective == "time-to-loss" and cfg.target_loss is not None:
            return ["--target-loss", f"{cfg.target_loss:.4f}"]
        if cfg.objective == "loss-at-time" and cfg.seconds is not None:
            return ["--budget-seconds", f"{cfg.seconds:g}"]
        return []

    def comparable(self, results: list[dict]) -> list[dict]:
        return comparable(results, asdict(self.config))

    def expected_seconds(self) -> float:
        walls = [
            r["wall_seconds"]
            for c in self.ledger.candidates()
            for r in self.ledger.runs_of(c["id"], ok_only=True)
            if r["wall_seconds"]
        ]
        first = FIRST_RUN_SECONDS.get(self.config.preset, 600.0)
        return max(walls) if walls else first

    def run_timeout(self) -> float:
        """A run's hard limit: a multiple of the longest run so far, and never under the
        preset's first-run allowance, so a loaded machine that slows start-up several times
        does not kill a valid run before its clock starts."""
        floor = FIRST_RUN_SECONDS.get(self.config.preset, 600.0)
        return max(self.config.timeout_factor * self.expected_seconds(), floor)

    def fresh_seed(self) -> int:
        return max(self.ledger.used_seeds() | {0}) + 1

    def benchmark(self, candidate: dict, role: str, early_stop=None) -> dict:
        """Run train.py once for `candidate` and record the run; returns its result dict."""
        expected = self.fixed_hashes()  # integrity: taken once, at session start
        ws = self.workspace
        ws.checkout(candidate["commit_sha"])
        seed, cid = self.fresh_seed(), candidate["id"]
        run_id = self.ledger.start_run(
            cid, role, seed, lambda i: self.log_path(acceptance.run_name(i, cid, role, seed)),
            lock_path=lock_path(self.config.device),
        )
        name = acceptance.run_name(run_id, cid, role, seed)
        log_path = self.log_path(name)
        # The final weights, for the holdout check at acceptance (threat 3); a champion's
        # re-measurements are evaluated at the next check too: more runs, more power.
        checkpoint = acceptance.checkpoint_path(self.run_dir, name)
        checkpoint.unlink(missing_ok=True)  # a stale one must never pass for this run's
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        # Integrity (threat 1): a fixed file that differs from its hash at session start
        # fails the run as an integrity violation, without running train.py.
        self.say(f"  run {name}: {candidate['description']}")
        changed = integrity.changed_fixed(ws.path, expected)
        if changed:
            detail = f"fixed files differ from the session start: {', '.join(changed[:10])}"
            error = f"{acceptance.FIXED_HASH}: {detail}"
            found = [{"check": acceptance.FIXED_HASH, "detail": detail}]
            result = {"integrity": {"ok": False, "violations": found, "changed": changed}}
            outcome = runner.RunOutcome(
                "integrity-violation", result, error, 0.0, str(log_path), None
            )
        else:
            outcome = self.run_train(ws, run_id, seed, name, log_path, early_stop, checkpoint)
        if outcome.status != "ok":
            checkpoint.unlink(missing_ok=True)  # nothing will evaluate it
        self.ledger.finish_run(
            run_id, outcome.status, outcome.result, outcome.error, outcome.wall_seconds
        )
        self.tracker.log_run(self.ledger.run(run_id), self.ledger.candidate(candidate["id"]))
        if outcome.returncode == protocol.EXIT_USAGE and role in ("baseline", "champion"):
            # The champion's own code refused the session's settings (a dataset gone, say):
            # every run would, so stop now and say why. A candidate's exit 2 is its crash.
            lines = (outcome.error or "").splitlines()
            raise SessionStop(f"train.py refused its input: {lines[-1] if lines else ''} "
                              f"(exit {protocol.EXIT_USAGE}; log {log_path})")
        result = {**(outcome.result or {}), "status": outcome.status, "seed": seed}
        self.say(f"  -> {outcome.status}{_summary(result, self.judge.objective)}")
        if outcome.error and outcome.status == "integrity-violation":
            self.say(f"     {outcome.error}")
        return result

    def log_path(self, name: str) -> Path:
        return self.run_dir / "logs" / f"{name}.log"

    def run_train(
        self, ws: Workspace, run_id: int, seed: int, name: str, log_path: Path, early_stop,
        checkpoint=None,
    ):  # fmt: skip
        """train.py in the worktree through the runner, with the session's settings; the
        ledger hears when the run has its device lock (until then it waits, not runs)."""
        spec = runner.RunSpec(
            worktree=ws.path,
            preset=self.config.preset,
            seed=seed,
            out_path=self.run_dir / "results" / f"{name}.json",
            log_path=log_path,
            timeout_s=self.run_timeout(),
            extra_args=list(self.config.train_args) + self.objective_args(),
            device=self.config.device,
            nproc=self.config.gpus,
            early_stop=early_stop,
            checkpoint=checkpoint,
            sandbox=self.config.sandbox,
            on_lock=lambda lock: self.ledger.lock_taken(run_id, lock.waited_s),
        )
        try:
            with self.waiting(f"running {name} (timeout {spec.timeout_s:.0f} s)"):
                return runner.run(spec)
        except FileNotFoundError as e:  # the candidate removed the harness itself
            return runner.RunOutcome("crash", None, str(e), 0.0, str(log_path), None)

    # -- the baseline ----------------------------------------------------------------------

    def ensure_baseline(self) -> dict:
        ledger, cfg = self.ledger, self.config
        baseline = ledger.baseline()
        if baseline is None:
            start = self.workspace.champion
            bid = ledger.add_candidate(
                "baseline", parent_id=None, commit_sha=start, proposer="baseline"
            )
            baseline = ledger.candidate(bid)
        if baseline["state"] == "decided":
            return baseline
        if cfg.objective == "loss-at-time" and cfg.seconds is None:
            self.calibrate(baseline)
        attempts = 0
        while len(self.ok(baseline)) < cfg.baseline_runs:
            attempts += 1
            if attempts > 2 * cfg.baseline_runs:
                raise SessionStop(
                    f"the baseline failed {attempts - 1} of its runs; see {self.run_dir}/logs"
                )
            self.event(f"baseline replicate {len(self.ok(baseline)) + 1}/{cfg.baseline_runs}")
            self.benchmark(baseline, "baseline")
        runs = self.ok(baseline)
        if cfg.objective == "time-to-loss" and cfg.target_loss is None:
            self.set_target(runs)
            runs = self.ok(baseline)
        decision = Decision(
            verdict="accept",
            reason=f"the baseline, measured {len(runs)} times",
            effect=1.0,
            ci_low=None,
            ci_high=None,
            p_value=None,
            p_value_loss=None,
            n_champion=0,
            n_candidate=len(runs),
            loss_delta=None,
        )
        ledger.decide(baseline["id"], "accept", decision, speedup=1.0)
        self.event(f"baseline measured {len(runs)} times; it is the first champion")
        return ledger.candidate(baseline["id"])

    def fixed_hashes(self) -> dict:
        """Integrity (threat 1): the hashes of the fixed files, taken from the champion at
        session start (or at the first run of a session made before they existed) and kept
        in the session config, so a resumed session checks against the same ones."""
        if self.config.fixed_hashes is None:
            ws = self.workspace
            ws.reset()
            self.config.fixed_hashes = integrity.fixed_hashes(ws.path)
            self.ledger.set_session(asdict(self.config))
        return self.config.fixed_hashes

    def ok(self, candidate: dict) -> list[dict]:
        results = self.comparable(self.ledger.results_of(candidate["id"]))
        return [r for r in results if r["status"] == "ok"]

    def set_target(self, runs: list[dict]) -> None:
        """The time-to-loss target: the worst baseline replicate's final loss plus a slack
        of two seed-to-seed standard deviations (at least `target_slack`), so that every
        replicate reached it and a candidate as good as the baseline rarely misses it;
        the replicates' crossing times are then read off their curves (judge.comparable)."""
        cfg = self.config
        finals = [r["val_loss"] for r in runs]
        slack = max(cfg.target_slack, 2 * statistics.stdev(finals))
        cfg.target_loss = _round(max(finals) + slack)
        self.ledger.set_session(asdict(cfg))
        self.event(
            f"target loss {cfg.target_loss:.4f} (worst baseline replicate {max(finals):.4f}, "
            f"slack {slack:.4f})"
        )

    def calibrate(self, baseline: dict) -> None:
        """For loss-at-time: one baseline run at the preset's budget fixes the time budget."""
        self.event("calibration run of the baseline (sets the time budget)")
        result = self.benchmark(baseline, "baseline")
        if result["status"] != "ok":
            raise SessionStop(f"the baseline's calibration run failed: {result['status']}")
        cfg = self.config
        cfg.seconds = round(result["train_seconds"], 1)
        self.ledger.set_session(asdict(cfg))
        self.event(f"time budget {cfg.seconds:g} s per run")

    # -- candidates ------------------------------------------------------------------------

    def champion(self) -> dict:
        return self.ledger.champion()

    def champion_results(self) -> list[dict]:
        return self.comparable(self.ledger.results_of(self.champion()["id"]))

    def judge_candidate(self, candidate: dict) -> Decision:
        while True:
            results = self.comparable(self.ledger.results_of(candidate["id"]))
            champion = self.champion_results()
            if results:
                decision = assess(champion, results, self.judge)
                decision = self.under_rules(decision, results, candidate)
                if decision.verdict != "more":
                    return decision
            early = None if results else self.early_stop(champion)  # replicates: the judge's
            self.benchmark(candidate, "confirm" if results else "screen", early_stop=early)

    def early_stop(self, champion: list[dict]):
        """The rule that stops a screening run that is clearly losing, by the objective's own
        comparison: loss at equal training time (time-to-loss, loss-at-time), or at equal
        tokens past the judge's loss margin (throughput, whose loss test is at equal
        tokens). Against the champion's slowest run, from half of it on: only a clear loser
        stops, not a run that met a slow minute of a shared machine."""
        curves = [r["curve"] for r in champion if r.get("status") == "ok" and r["curve"]]
        if not curves:
            return None
        cfg = self.config
        if cfg.objective == "throughput":
            slowest = min(curves, key=lambda curve: curve[-1]["tokens"] / curve[-1]["seconds"])
            margin = cfg.early_stop_margin + self.judge.loss_margin
            return runner.behind_champion(slowest, margin, min_fraction=0.5, axis="tokens")
        slowest = max(curves, key=lambda curve: curve[-1]["seconds"])
        return runner.behind_champion(slowest, cfg.early_stop_margin, min_fraction=0.5)

    def under_rules(self, decision: Decision, results: list[dict], candidate: dict) -> Decision:
        """With --rules, an accept also needs the leaderboard's loss test at the session's
        target (a change of category "systems" may be waived)."""
        if self.config.rules is None:
            return decision
        return under_rules(
            decision, results, leaderboard_rules(self.config.rules), self.config.target_loss,
            systems=candidate.get("category") == "systems", max_runs=self.judge.max_replicates,
        )  # fmt: skip

    def record(self, candidate: dict, decision: Decision) -> None:
        """Record the judge's decision. An accept must first pass the acceptance checks
        (agent/acceptance.py): one that fails is rejected with the check named, a step too
        large to believe is held for a human."""
        cid, title = candidate["id"], f"#{candidate['experiment']} {candidate['description']}"
        if decision.verdict == "accept":
            checked = acceptance.judge_acceptance(self, candidate, decision.effect)
            payload = {**asdict(decision), "checks": checked.checks}
            if checked.verdict == "accept":
                old = self.champion()
                speedup = old["speedup"] * decision.effect
                self.ledger.decide(cid, "accept", payload, speedup=speedup)
                self.workspace.promote(candidate["commit_sha"])
                # No check will compare against the old champion again.
                acceptance.drop_checkpoints(self.run_dir, self.ledger.runs_of(old["id"]))
                self.tracker.log_decision(self.ledger.candidate(cid))
                self.event(
                    f"ACCEPT {title}: x{decision.effect:.3f} ({decision.reason}); "
                    f"total x{speedup:.3f}"
                )
                return
            payload = acceptance.evidence(self, candidate, decision, checked)
            reason = f"{checked.caught_by}: {checked.reason} (the judge: {decision.reason})"
            if checked.verdict == "hold":
                self.ledger.hold(
                    cid, {**payload, "verdict": "held", "reason": reason}, checked.caught_by
                )
                self.tracker.log_decision(self.ledger.candidate(cid))
                self.event(f"HELD {title} for a human: {reason}")
                return
            self.ledger.decide(
                cid,
                "reject",
                {**payload, "verdict": "reject", "reason": reason},
                caught_by=checked.caught_by,
            )
            self.event(f"reject {title}: {reason}")
        else:
            caught_by = acceptance.caught_by_runs(self.ledger.runs_of(cid))
            self.ledger.decide(cid, "reject", decision, caught_by=caught_by)
            self.event(f"reject {title}: {decision.reason}")
        acceptance.drop_checkpoints(self.run_dir, self.ledger.runs_of(cid))
        self.tracker.log_decision(self.ledger.candidate(cid))

    def propose_context(self) -> tuple[dict, list[dict], dict]:
        """What a proposer sees: the champion, the history and the context, read now."""
        champion = self.champion()
        context = {
            "preset": self.config.preset,
            "objective": self.config.objective,
            "champion": champion,
            "champion_results": self.champion_results(),
            "spent_usd": self.ledger.spend()["cost_usd"],
        }
        profile = self.champion_profile(champion)
        if profile:
            context["profile"] = profile
        return champion, self.ledger.candidates(), context

    def champion_profile(self, champion: dict) -> str | None:
        """Where the champion spends its time (bench/profile.py), for the LLM proposers: made
        once per champion, under the device lock and never during a benchmark."""
        if self.proposer.name not in LLM_PROPOSERS:
            return None
        path = self.run_dir / "profiles" / f"c{champion['id']:03d}.txt"
        if not path.exists():
            ws = self.workspace
            ws.checkout(champion["commit_sha"])
            cmd = [sys.executable, "-m", "bench.profile", "--preset", self.config.preset]
            cmd += _data_flag(self.config.train_args) + ["--out", str(path)]
            cmd += [] if self.config.sandbox else ["--no-sandbox"]  # it sandboxes itself
            path.parent.mkdir(parents=True, exist_ok=True)
            with runner.device_lock(self.config.device):
                proc = subprocess.run(
                    cmd, cwd=ws.path, capture_output=True, text=True,
                    timeout=self.run_timeout(),
                )  # fmt: skip
            if proc.returncode != 0:
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
                self.event(f"no profile of the champion: {' | '.join(tail)}")
                return None
        return path.read_text()

    def draft(self, ws: Workspace, champion: dict, history: list[dict], context: dict) -> Draft:
        """Run the proposer in `ws` and take its edit as a commit on `champion`. Writes
        nothing to the ledger, so it may run in a background thread while a benchmark runs."""
        ws.checkout(champion["commit_sha"])
        try:
            proposal = self.proposer.propose(ws.path, history, context)
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
                self.refuse(draft.champion, "proposer stopped", str(draft.stop), usage=usage)
            raise draft.stop
        if draft.proposal is None:
            return None
        proposal, champion = draft.proposal, self.champion()
        if draft.refused is not None:
            self.refuse(champion, proposal.description, draft.refused, draft.diff, proposal.usage,
                        caught_by=draft.caught_by)  # fmt: skip
            return self.ledger.candidates()[-1]
        made = draft.made
        if champion["id"] != draft.champion["id"]:
            ws = self.workspace
            ws.reset()
            try:
                apply_patch(ws.path, made.diff)
                made = ws.capture(len(self.ledger.candidates()), f"{proposal.description}")
            except (PatchError, RefusedChange, EmptyChange) as e:
                self.event(f"dropped '{proposal.description}': it was proposed on the previous "
                           f"champion and does not apply to the new one ({e})")
                return self.propose()
        # Integrity (threats 4, 5, 7): scan the lines the diff adds to the surface; a flagged
        # candidate is refused, with the findings, unless the session allows flagged ones.
        findings = integrity.scan_diff(made.diff, self.source_at(made.commit))
        if findings and not self.config.allow_flagged:
            rules = dict.fromkeys(f"{acceptance.DIFF_SCAN}:{f.rule}" for f in findings)
            self.refuse(
                champion, proposal.description, integrity.describe(findings), made.diff,
                proposal.usage, caught_by=",".join(rules),
            )  # fmt: skip
            return self.ledger.candidates()[-1]
        if findings:
            self.event(f"allowed by allow_flagged: {integrity.describe(findings)}")
        cid = self.ledger.add_candidate(
            proposal.description,
            parent_id=champion["id"],
            diff=made.diff,
            commit_sha=made.commit,
            ref=made.ref,
            hypothesis=proposal.hypothesis,
            category=proposal.category,
            proposer=self.proposer.name,
            usage=proposal.usage,
        )
        return self.ledger.candidate(cid)

    def source_at(self, commit: str):
        """path -> the file's text at `commit` (None if it has none), for the diff scan."""

        def source(path: str) -> str | None:
            try:
                return self.workspace.git("show", f"{commit}:{path}")
            except Exception:  # deleted at that commit, or not a text file
                return None

        return source

    def propose(self) -> dict | None:
        """Ask the proposer for the next candidate now; None when it is done."""
        return self.take(self.draft(self.workspace, *self.propose_context()))

    def prefetch(self) -> None:
        """Start drafting the next candidate in the second worktree, so that the proposer
        (an LLM, say) works while the benchmark runs instead of after it."""
        cfg = self.config
        last = cfg.experiments is not None and self.ledger.n_experiments() + 1 >= cfg.experiments
        if not cfg.overlap or self._next is not None or last or self.out_of_budget():
            return
        ws = self.workspace.second(self.run_dir / "propose")
        self._next = self._pool.submit(self.draft, ws, *self.propose_context())

    def next_candidate(self) -> dict | None:
        if self._next is None:
            return self.propose()
        future, self._next = self._next, None
        return self.take(future.result())

    def refuse(
        self, champion: dict, description: str, reason: str, diff: str = "", usage=None,
        caught_by: str | None = None,
    ) -> None:  # fmt: skip
        cid = self.ledger.add_refused(
            description, reason, parent_id=champion["id"], diff=diff,
            proposer=self.proposer.name, usage=usage, caught_by=caught_by,
        )  # fmt: skip
        self.tracker.log_decision(self.ledger.candidate(cid))
        self.event(f"refused {description}: {reason}")

    def remeasure_due(self) -> bool:
        """After every `remeasure_every` candidates that ran (refusals ran nothing) since
        the champion was last measured."""
        champion = self.champion()
        since = [
            c for c in self.ledger.candidates(["decided", "held"])
            if c["decided_at"] and c["decided_at"] > champion["champion_since"]
        ]
        champion_runs = self.ledger.runs_of(champion["id"], roles=["champion"])
        recent = [r for r in champion_runs if r["started_at"] > champion["champion_since"]]
        return len(since) >= self.config.remeasure_every * (len(recent) + 1)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> str:
        """Run until a budget ends or the proposer has nothing left; returns why it stopped."""
        shown = {k: v for k, v in asdict(self.config).items() if k != "fixed_hashes"}
        self.tracker.start_session(shown)  # the file hashes are for the checks, not a chart
        try:
            with self.running():
                return self._run()
        finally:
            self.tracker.finish()

    @contextlib.contextmanager
    def running(self):
        """While the loop runs: hold the run directory's lock (`agent review` waits for no
        running loop; `status` sees it alive), and record in the ledger when it started and
        why it stopped, so `status` tells a stopped session from a killed one."""
        with session_lock(self.run_dir):
            self.ledger.log_event(f"{liveness.STARTED} (pid {os.getpid()})")
            try:
                yield
            except KeyboardInterrupt:
                self.ledger.log_event(f"{liveness.STOPPED}interrupted by the user (Ctrl-C)")
                raise
            except SessionStop as e:
                self.ledger.log_event(f"{liveness.STOPPED}{e}")
                raise
            except Exception as e:
                self.ledger.log_event(f"{liveness.STOPPED}an error: {type(e).__name__}: {e}")
                raise

    def resume_state(self) -> None:
        """Session start or resume: drop runs a kill left unfinished, put the champion
        branch where the ledger says, and take the fixed files' hashes (integrity)."""
        discarded = self.ledger.discard_unfinished_runs()
        if discarded:
            self.event(f"resumed: discarded unfinished run(s) {discarded}; they will be re-run")
        for c in self.ledger.candidates(["proposed"]):
            if c["commit_sha"] is None:  # nothing to run: a ledger from a session killed
                # between adding a candidate and refusing it
                self.ledger.refuse(c["id"], "left without a commit by a killed session")
        champion = self.ledger.champion()
        if champion is not None:  # a kill between the ledger's accept and the git update
            self.workspace.promote(champion["commit_sha"])
        self.workspace.reset()
        self.fixed_hashes()

    def _run(self) -> str:
        self.resume_state()
        self.ensure_baseline()
        while True:
            pending = self.ledger.candidates(["proposed", "running"])
            candidate = pending[0] if pending else None
            if candidate is None:
                why = self.out_of_budget()
                if why:
                    break
                if self.remeasure_due():
                    self.event("re-measuring the champion")
                    self.benchmark(self.champion(), "champion")
                    continue
                try:
                    candidate = self.next_candidate()
                except ProposerStop as e:  # the LLM budget is spent, say: a normal end
                    why = f"the proposer stopped: {e}"
                    break
                if candidate is None:
                    why = "the proposer has nothing more to propose"
                    break
                why = self.brake(candidate)
                if why:
                    break
                if candidate["state"] == "refused":
                    continue
            self.event(f"experiment #{candidate['experiment']}: {candidate['description']}")
            self.prefetch()
            self.record(candidate, self.judge_candidate(candidate))
        self.keep_pending_draft()
        self.workspace.reset()
        self.event(f"{liveness.STOPPED}{why}")
        return why

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

    def keep_pending_draft(self) -> None:
        """A draft still in the making when the session stops is waited for and recorded
        (as a proposed candidate that --resume will judge), so its LLM spend is not lost."""
        if self._next is None:
            return
        future, self._next = self._next, None
        draft = future.result()
        if draft.made is not None and draft.champion["id"] == self.champion()["id"]:
            self.take(draft)


def failure_cause(candidate: dict) -> str:
    """What made a refused proposal fail, the same for each repeat: the check that refused
    it, or the first clause of the reason ("exited with status 1", "does not apply to the
    champion", "timed out after 600 s")."""
    if candidate["caught_by"]:
        return candidate["caught_by"]
    reason = (candidate["decision"] or {}).get("reason", "")
    return re.split(r"[:;\n]", reason, maxsplit=1)[0].strip() or "no reason given"


def _round(value: float | None) -> float | None:
    """Targets go through argv as 4 decimals; compare them at that precision."""
    return None if value is None else round(float(value), 4)


def _summary(result: dict, objective: str) -> str:
    """`: time_to_target 12.3, 9,876 tok/s, val loss 5.432` for a progress line."""
    if result["status"] != "ok":
        return ""
    speed = f"{result['tokens_per_sec']:,.0f} tok/s, val loss {result['val_loss']:.4f}"
    if objective == "time-to-loss" and result.get("target_loss") is None:
        return f": {speed}"  # ran without a target: the baseline replicates that set it
    metric = primary_metric(result, objective)
    shown = "not reached" if metric is None else f"{metric:.4g}"
    return f": {OBJECTIVES[objective][0]} {shown}, {speed}"


def _data_flag(train_args: list[str]) -> list[str]:
    """The --data flag of the session's train.py arguments, for tools that take the same."""
    if "--data" in train_args:
        i = train_args.index("--data")
        return train_args[i : i + 2]
    return []
