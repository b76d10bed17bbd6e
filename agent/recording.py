"""Deciding and recording: the judge's loop over a candidate's runs, the acceptance checks on
what it would accept, and the verdict written to the ledger and to git.

`Recorder.judge` runs a candidate (a screen, then replicates with fresh seeds; with --paired
each beside a champion run of its seed, agent/judge.py) until the judge, and a
leaderboard's loss test under --rules, conclude.
`Recorder.record` writes the verdict: an accept must first pass the acceptance checks
(agent/acceptance.py), for which the runs' checkpoints are scored by the fixed scorer
(bench/score.py) and cached in the ledger; one that fails is rejected with the check
named, a step too large to believe is held for a human. `promote` is the one way a
candidate becomes the champion: the ledger first, then the champion branch (a kill between
the two is mended on resume, which puts the branch where the ledger says).

What this module must never do: decide without the judge, accept what a check caught, or
keep a checkpoint that no check will read again.
"""

from __future__ import annotations

import json
import math
import random
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from agent import acceptance, child
from agent.acceptance import Acceptance, Check
from agent.config import SessionConfig
from agent.judge import (
    Decision,
    PairNoise,
    assess,
    comparable,
    first_of_seed,
    fresh_seed_floor,
    pair_noise,
    twins,
)
from agent.leaderboard import leaderboard_rules, under_rules
from agent.ledger import Ledger
from agent.measure import Measurer, early_stop_rule, train_flags
from agent.rundir import RunDir
from agent.slots import Slot
from agent.workspace import Workspace


class EvaluationFailed(RuntimeError):
    """The fixed scorer did not give numbers for every checkpoint; the message says why."""


class TwinsFailed(EvaluationFailed):
    """A checkpoint scored afresh failed its twin rows: the forward pass is not causal."""


def promote(ledger: Ledger, workspace: Workspace, candidate: dict, effect: float,
            write: Callable[[float], None]) -> float:
    """Make `candidate` the champion, `effect` times faster than the current one: `write`
    records the verdict in the ledger with the total speedup (which makes it the champion
    there), then the champion branch moves. Returns the total speedup vs the baseline."""
    speedup = ledger.champion()["speedup"] * effect
    write(speedup)
    workspace.move_champion(candidate["commit_sha"])
    return speedup


def drop_checkpoints(run_dir: RunDir, runs: Sequence[dict]) -> None:
    """Delete the runs' checkpoints: evaluated (their numbers are in the ledger) or of a
    candidate that will never be evaluated. No checkpoint outlives its use."""
    for run in runs:
        run_dir.run_checkpoint(run).unlink(missing_ok=True)


def with_rules(config: SessionConfig, decision: Decision, results: Sequence[dict],
               candidate: dict) -> Decision:
    """With --rules, an accept also needs the leaderboard's loss test at the session's
    target (a change of category "systems" may be waived)."""
    if config.rules is None:
        return decision
    return under_rules(
        decision, results, leaderboard_rules(config.rules), config.target_loss,
        systems=candidate.get("category") == "systems",
        max_runs=config.judge_config().max_replicates)  # fmt: skip


def evidence(candidate: dict, runs: Sequence[dict], decision: Decision,
             checked: Acceptance) -> dict:
    """What a held (or check-rejected) candidate's ledger record carries for a human: the
    judge's decision, the checks' numbers, the commit, and every run with its log."""
    return {**asdict(decision), "checks": checked.checks, "commit": candidate["commit_sha"],
            "ref": candidate["ref"],
            "runs": [{"id": r["id"], "role": r["role"], "seed": r["seed"],
                      "outcome": r["outcome"], "log": r["log_path"]} for r in runs]}


class Recorder:
    def __init__(self, run_dir: RunDir, ledger: Ledger, config: SessionConfig,
                 workspace: Callable[[], Workspace], measurer: Measurer, tracker, event):
        self.run_dir, self.ledger, self.config = run_dir, ledger, config
        self.workspace, self.measurer, self.tracker, self.event = (workspace, measurer,
                                                                   tracker, event)
        self._cover_lock = threading.Lock()
        # Held from an accept's checks to its promotion: two candidates judged side by side
        # must not both be promoted over the same champion.
        self.promoting = threading.Lock()

    def results(self, candidate: dict) -> list[dict]:
        return comparable(self.ledger.results_of(candidate["id"]), asdict(self.config))

    def judge(self, candidate: dict) -> Decision | None:
        """Benchmark `candidate` until the judge concludes; returns its decision, or None
        when the champion it was made from is no longer the champion (another candidate,
        judged beside it, was accepted): it must be re-based, since a verdict is only ever
        recorded against the current champion."""
        cfg = self.config.judge_config()
        pairs = None
        if cfg.paired:  # the floor, fixed for this decision (its level assumes one)
            pairs = self.pair_noise(candidate) or fresh_seed_floor(
                self.results(self.ledger.champion()), cfg.objective)
        while True:
            champion = self.ledger.champion()
            if champion["id"] != candidate["parent_id"]:
                return None
            if not cfg.paired:  # a pair is on one slot: no offset to tell apart
                self.cover(champion)
            results = self.results(candidate)
            champion_results = self.results(champion)
            if results:
                decision = with_rules(self.config,
                                      assess(champion_results, results, cfg, pairs),
                                      results, candidate)
                if decision.verdict != "more":
                    return decision
            early = None if results else early_stop_rule(champion_results, self.config,
                                                         cfg.loss_margin)
            role = "confirm" if results else "screen"
            if cfg.paired:
                self.pair_up(champion, candidate, results, champion_results, role, early)
            else:
                self.measurer.benchmark(candidate, role, early)

    def pair_noise(self, candidate: dict) -> PairNoise | None:
        """The session's pair noise, the floor under `candidate`'s spread (agent/judge.py):
        from every other candidate's runs beside those of the champion it was made from, and
        the baseline's twin runs.
        Measured once per decision, so that the floor is fixed while the candidate is
        judged. None before any pair."""
        runs: dict[int, list[dict]] = {}

        def of(cid: int) -> list[dict]:
            if cid not in runs:
                runs[cid] = self.results(self.ledger.candidate(cid))
            return runs[cid]

        judged = [(of(other["parent_id"]), of(other["id"]))
                  for other in self.ledger.candidates()
                  if other["parent_id"] is not None and other["id"] != candidate["id"]]
        judged.append(twins(of(self.ledger.baseline()["id"])))  # the baseline's twin runs
        return pair_noise(judged, self.config.judge_config().objective)

    def pair_up(self, champion: dict, candidate: dict, results: Sequence[dict],
                champion_results: Sequence[dict], role: str, early) -> None:
        """With paired runs, the candidate's next pair, in ABBA order from a side drawn per
        candidate (a run that goes second, into a warm page cache say, favours neither side
        on average, and by at most one pair's share in any decision). First, though, the
        partner that a killed session never made for a candidate run: its seed's champion
        run, on any slot, since its moment has passed."""
        partnered = {r["seed"] for r in champion_results}
        orphans = [r["seed"] for r in results if r["status"] == "ok" and r["seed"] not in partnered]
        if orphans:
            self.event(f"the champion's run with seed {orphans[0]}, the partner of a run of "
                       f"#{candidate['experiment']} that a stop left without one")
            self.measurer.benchmark(champion, "champion", None, seed=orphans[0])
            return
        first = random.Random(candidate["id"]).random() < 0.5
        self.measurer.pair(champion, candidate, role, early, first == (len(results) % 2 == 0))

    def cover(self, champion: dict) -> None:
        """With several slots: the champion measured on every slot before a candidate is
        compared with it, so the judge can tell a slot's offset from the candidate's effect
        (agent/judge.py); the missing slots run it at once. One thread at a time: the
        others wait for these runs rather than start the same ones."""
        if len(self.measurer.pool) == 1:
            return
        with self._cover_lock:
            ran = {r["slot"] for r in self.results(champion) if r["status"] == "ok"}
            missing = [name for name in self.measurer.pool.names if name not in ran]
            if missing:
                self.event(f"measuring the champion on slot(s) {', '.join(missing)}")
                self.measurer.on_every_slot(champion, "champion", missing)

    def record(self, candidate: dict, decision: Decision) -> bool:
        """Record the judge's decision; an accept passes the acceptance checks first.
        False (nothing recorded) when the champion changed before an accept was recorded:
        the candidate must be re-based."""
        if decision.verdict != "accept":
            self._record(candidate, decision)
            return True
        with self.promoting:
            if self.ledger.champion()["id"] != candidate["parent_id"]:
                return False
            self._record(candidate, decision)
            return True

    def _record(self, candidate: dict, decision: Decision) -> None:
        cid, title = candidate["id"], f"#{candidate['experiment']} {candidate['description']}"
        if decision.verdict != "accept":
            caught_by = acceptance.caught_by_runs(self.ledger.runs_of(cid))
            self.ledger.record_decision(cid, "reject", decision, caught_by=caught_by)
            self.event(f"reject {title}: {decision.reason}")
        else:
            checked = self.checks(candidate, decision.effect)
            if checked.verdict == "accept":
                old = self.ledger.champion()
                payload = {**asdict(decision), "checks": checked.checks}
                speedup = promote(self.ledger, self.workspace(), candidate, decision.effect,
                                  lambda total: self.ledger.record_decision(
                                      cid, "accept", payload, speedup=total))  # fmt: skip
                # No check will compare against the old champion again.
                drop_checkpoints(self.run_dir, self.ledger.runs_of(old["id"]))
                self.tracker.log_decision(self.ledger.candidate(cid))
                self.event(f"ACCEPT {title}: x{decision.effect:.3f} ({decision.reason}); "
                           f"total x{speedup:.3f}")
                return
            payload = evidence(candidate, self.ledger.runs_of(cid), decision, checked)
            reason = f"{checked.caught_by}: {checked.reason} (the judge: {decision.reason})"
            if checked.verdict == "hold":
                self.ledger.hold(cid, {**payload, "verdict": "held", "reason": reason},
                                 checked.caught_by)
                self.tracker.log_decision(self.ledger.candidate(cid))
                self.event(f"HELD {title} for a human: {reason}")
                return
            self.ledger.record_decision(cid, "reject", {**payload, "verdict": "reject",
                                                        "reason": reason},
                                        caught_by=checked.caught_by)  # fmt: skip
            self.event(f"reject {title}: {reason}")
        drop_checkpoints(self.run_dir, self.ledger.runs_of(cid))
        self.tracker.log_decision(self.ledger.candidate(cid))

    def checks(self, candidate: dict, effect: float) -> Acceptance:
        """The acceptance checks for `candidate`, which the judge would accept with speed
        ratio `effect` over the current champion, in order; the scorer runs only when the
        cheaper checks passed."""
        cfg, champion = self.config.acceptance_config(), self.ledger.champion()
        mine = self.ledger.runs_of(candidate["id"], ok_only=True)
        # Each seed once: a paired baseline's twin trains as its replicate did, and would
        # count the same holdout gap twice.
        theirs = first_of_seed(self.ledger.runs_of(champion["id"], ok_only=True))
        checks = acceptance.checks_on_runs(mine, theirs, cfg)
        if acceptance.caught(checks):
            return acceptance.verdict(checks)
        try:
            scored = self.scored(candidate, mine)
        except TwinsFailed as e:
            return acceptance.verdict([*checks, Check(acceptance.TWINS, True, str(e), None)])
        except EvaluationFailed as e:  # fail closed: no numbers, no acceptance
            return acceptance.verdict([*checks, Check(acceptance.HOLDOUT_GAP, True,
                                                      f"holdout evaluation failed: {e}", None)])
        checks += acceptance.reproduce_checks(
            mine, scored, acceptance.REPRODUCE_TOLERANCE.get(self.config.device, 1e-3))
        if acceptance.caught(checks):
            return acceptance.verdict(checks)
        review = (f"python -m agent review --run-dir {self.run_dir} {candidate['id']} "
                  "--accept|--reject")
        try:
            champion_gaps = _gaps(self.scored(champion, theirs))
        except EvaluationFailed as e:
            # Fail closed: the runs already scored stand in, or a human decides; never an
            # accept whose gap test was skipped because the champion's scorer failed.
            champion_gaps = _gaps(self.ledger.holdout_of(r["id"] for r in theirs))
            self.event(f"the champion's holdout evaluation failed: {e}; "
                       f"{len(champion_gaps)} of its runs were scored before")
            if len(champion_gaps) < 2:
                return acceptance.verdict([*checks, Check(
                    acceptance.HOLDOUT_GAP, True, f"the champion's holdout evaluation failed "
                    f"({e}), so the gap test cannot run: held for a human (`{review}`)", None,
                    hold=True)])  # fmt: skip
        gap = acceptance.gap_check(list(_gaps(scored).values()), list(champion_gaps.values()),
                                   cfg)
        if "skipped" in gap.numbers:
            self.event(f"holdout gap not tested: {gap.numbers['skipped']}")
        return acceptance.verdict([*checks, gap, acceptance.step_check(effect, cfg, review)])

    def scored(self, candidate: dict, runs: Sequence[dict]) -> dict[int, dict]:
        """run id -> the ledger's holdout row for the runs with numbers: cached in the ledger,
        or scored now from their checkpoints (then cached, and the checkpoints deleted)."""
        cached = self.ledger.holdout_of(r["id"] for r in runs)
        todo = [r for r in runs
                if r["id"] not in cached and self.run_dir.run_checkpoint(r).is_file()]
        if todo:
            with self.measurer.slot() as (slot, ws):
                ws.checkout(candidate["commit_sha"])
                try:
                    numbers = score(ws.path, [self.run_dir.run_checkpoint(r) for r in todo],
                                    self.config, self.measurer.timeout(), slot)
                finally:
                    ws.reset()
            for run, row in zip(todo, numbers):
                failed = [s for s in ("val", "holdout") if row[s].get("twins_ok") is False]
                if failed:
                    raise TwinsFailed(f"run {run['id']}'s final weights failed the twin rows "
                                      f"when scored afresh on {' and '.join(failed)}")
                self.ledger.set_holdout(run["id"], row["val"], row["holdout"])
            drop_checkpoints(self.run_dir, todo)
            cached = self.ledger.holdout_of(r["id"] for r in runs)
        return cached


def _gaps(scored: dict[int, dict]) -> dict[int, float]:
    return {i: row["holdout_loss"] - row["val_loss"] for i, row in scored.items()}


def score(worktree: Path, checkpoints: Sequence[Path], config: SessionConfig,
          timeout_s: float, slot: Slot) -> list[dict]:
    """Run `python -m bench.score` in `worktree` (checked out at the commit that made the
    checkpoints), under the device lock: each checkpoint scored on the holdout and val
    slices by a fresh sandboxed forward worker; one {'val', 'holdout'} per checkpoint, in
    order, each {'loss', 'bpb', 'twins_ok'}. On `slot`'s devices."""
    cmd = [sys.executable, "-m", "bench.score", "--preset", config.preset, "--device",
           config.device, *train_flags(config.train_args, ("--data", "--kernels")),
           "--splits", "holdout,val", *([] if config.sandbox else ["--no-sandbox"]),
           *map(str, checkpoints)]  # fmt: skip
    done = child.run_tool(cmd, worktree, timeout_s, device=config.device, gpus=slot.gpus,
                          cores=slot.cores)
    if done.code is None:
        raise EvaluationFailed(f"the scorer took over {timeout_s:.0f} s")
    lines = done.out.strip().splitlines()
    if done.code != 0 or not lines:
        raise EvaluationFailed(f"the scorer exited {done.code}: {done.last_lines()}")
    try:
        rows = {row["checkpoint"]: row for row in json.loads(lines[-1])}
        out = []
        for path in checkpoints:
            row = rows[str(path)]
            for split in ("val", "holdout"):
                loss = row[split]["loss"]
                if not (isinstance(loss, (int, float)) and math.isfinite(loss)):
                    raise ValueError(f"{split} loss {loss!r} of {path}")
            out.append({"val": row["val"], "holdout": row["holdout"]})
    except (ValueError, KeyError, TypeError) as e:
        raise EvaluationFailed(
            f"the scorer's output is not the contract's: {e!r}: {lines[-1][:200]}") from None
    return out
