"""Acceptance checks: what a candidate the judge would accept must also pass before it becomes
the champion (bench/INTEGRITY.md, threats 3, 5 and 8), and the names of every integrity
check that can catch a candidate.

- `holdout-gap` (threat 3): each ok run's final weights (its checkpoint) are evaluated by
  the fixed evaluator on the val slice and on the holdout slice that no run ever reads. A
  candidate that learned the val slice (or a cheaper evaluation of it) has a larger
  holdout − val gap than the champion; it is rejected when the gap rose beyond noise.
- `untimed-overhead` (threat 5): wall time of the process minus the harness's timed
  training and evaluation. Work moved out of the clock (into import, warmup) shows here.
- `implausible-speedup` (threat 8): a step larger than `max_speedup` is held for a human
  (`python -m agent review`), not accepted automatically.

What this module must never do: run candidate code in the loop's process (the evaluator
runs in a child process, in the candidate's worktree), or reject an honest candidate on
noise: both tests need a rise that is significant and large (false alarms cost real
speedups; the thresholds are in `AcceptanceConfig` with the reasons for their defaults).
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from agent import runner
from agent.stats import welch

# The names of the checks, as the ledger's `caught_by` records them (one place; the
# adversarial suite and bench/INTEGRITY.md use these). A candidate caught by several lists
# them comma-separated.
SURFACE = "surface"  # the diff leaves the research surface (workspace, threat 1)
DIFF_SCAN = "diff-scan"  # "diff-scan:<rule>", rule one of integrity.RULES (threats 4, 5, 7)
FIXED_HASH = "fixed-hash"  # a fixed file differs from its hash at session start (threat 1)
HOLDOUT_GAP = "holdout-gap"  # the holdout − val gap rose beyond noise (threat 3)
EVAL_REPRODUCE = "eval-reproduce"  # a run's val loss is not reproduced from its checkpoint
# How far the standalone evaluation of a run's checkpoint may differ from the val loss the
# run reported: the same weights, slice and code give the same bits on a CPU; a GPU may
# pick other kernels for the batch in a fresh process.
REPRODUCE_TOLERANCE = {"cpu": 1e-5, "cuda": 1e-3}
UNTIMED_OVERHEAD = "untimed-overhead"  # wall minus timed seconds rose (threat 5)
IMPLAUSIBLE_SPEEDUP = "implausible-speedup"  # held for a human (threat 8)
# The harness's checks (train.py) name themselves in each violation record {"check",
# "detail"}: "twins", "restore", "frozen-signals".
TWINS = "twins"  # a twin row scored apart from its original (look-ahead, rows mixed, drift)
SEED_IGNORED = "seed-ignored"  # runs given different seeds started from the same weights


@dataclass(frozen=True)
class AcceptanceConfig:
    # Holdout gap: the rise of the mean (holdout − val) gap over the champion's must be
    # significant at holdout_alpha (one-sided Welch) AND at least holdout_min_gap nats. 0.01:
    # the test runs once per accepted candidate, and a false alarm throws away a real
    # speedup. 0.05 nats: measured on cpu-tiny (8192 tokens, 16k eval tokens a slice), the
    # gap is 0.088-0.144 nats over four seeds, a seed-to-seed sd of ~0.025; Welch's test
    # alone at 0.01 then flags 1.2-1.5% of A/A candidates (liberal with few, unequal runs),
    # and a recipe that fits both slices better, not exactly equally, shifts the gap for
    # real. Two sds of one run's gap keep both from being caught, while a model that
    # learned the val slice moves it by tenths of a nat.
    holdout_alpha: float = 0.01
    holdout_min_gap: float = 0.05
    # Untimed overhead: a rise of the median past max(overhead_abs_s, overhead_rel x the
    # champion's median) rejects. The absolute floor absorbs the jitter of imports and
    # process start on a busy machine (seconds on a shared CPU); the relative part lets
    # compile time grow somewhat with an honest model change (torch.compile, autotuning).
    overhead_abs_s: float = 3.0
    overhead_rel: float = 0.5
    # Speed ratio over the champion above which a step is held for a human: a 2x step in
    # one edit is far more often a broken measurement than a discovery.
    max_speedup: float = 2.0

    def __post_init__(self):
        if not 0.0 < self.holdout_alpha < 0.5:
            raise ValueError(f"holdout_alpha={self.holdout_alpha}: must be in (0, 0.5)")
        for name in ("holdout_min_gap", "overhead_abs_s", "overhead_rel"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.max_speedup <= 1.0:
            raise ValueError(f"max_speedup={self.max_speedup}: must be above 1 (a ratio)")


@dataclass(frozen=True)
class Check:
    """One check's outcome: its numbers, kept in the decision, and whether it caught."""

    name: str
    caught: bool
    reason: str
    numbers: dict = field(default_factory=dict)


def gap_test(
    candidate: Sequence[float],
    champion: Sequence[float],
    alpha: float = 0.01,
    min_gap: float = 0.05,
) -> Check:
    """Did the mean holdout − val gap rise from the champion's runs to the candidate's?

    Caught when the one-sided Welch test of "no rise" is rejected at `alpha` AND the rise
    is at least `min_gap` nats. Needs two gaps a side (a Welch test needs a spread).
    """
    if len(candidate) < 2 or len(champion) < 2:
        raise ValueError(
            f"gap test with {len(candidate)} candidate and {len(champion)} "
            "champion gaps: need at least 2 a side"
        )
    diff = welch(candidate, champion)
    p = diff.p_above(0.0)
    numbers = {
        "candidate_gap": float(np.mean(candidate)),
        "champion_gap": float(np.mean(champion)),
        "rise": diff.estimate,
        "p_value": p,
        "n_candidate": len(candidate),
        "n_champion": len(champion),
    }
    caught = p < alpha and diff.estimate >= min_gap
    reason = (
        f"holdout − val gap {numbers['candidate_gap']:+.4f} nats against the champion's "
        f"{numbers['champion_gap']:+.4f}: a rise of {diff.estimate:+.4f} (p={p:.2g}; "
        f"caught at p < {alpha} and a rise >= {min_gap})"
    )
    return Check(HOLDOUT_GAP, caught, reason, numbers)


def overhead_test(
    candidate: Sequence[float], champion: Sequence[float], abs_s: float = 3.0, rel: float = 0.5
) -> Check:
    """Did the median untimed overhead rise past max(abs_s, rel x the champion's median)?"""
    if not candidate or not champion:
        raise ValueError(
            f"overhead test with {len(candidate)} candidate and {len(champion)} "
            "champion runs: need one a side"
        )
    mine, theirs = statistics.median(candidate), statistics.median(champion)
    limit = max(abs_s, rel * theirs)
    numbers = {"candidate_s": mine, "champion_s": theirs, "rise_s": mine - theirs, "limit_s": limit}
    reason = (
        f"untimed overhead (wall − train − eval seconds) median {mine:.1f} s against "
        f"the champion's {theirs:.1f} s: a rise of {mine - theirs:+.1f} s (limit "
        f"{limit:.1f} s)"
    )
    return Check(UNTIMED_OVERHEAD, mine - theirs > limit, reason, numbers)


def seed_test(runs: Sequence[dict]) -> Check:
    """Did runs given different seeds start from different weights? The harness fingerprints
    the weights the trainer starts from; a candidate that ignores the seed (fixed or
    loaded weights) makes its replicates copies of one run, which the judge's statistics
    would take for independent evidence."""
    firsts: dict[str, int] = {}
    for run in runs:
        result = run.get("result") or {}
        fp = result.get("init_fingerprint")
        if fp is None:
            continue
        seed = result.get("seed", run.get("seed"))
        if fp in firsts and firsts[fp] != seed:
            reason = (f"runs with seeds {firsts[fp]} and {seed} started from the same weights "
                      f"(fingerprint {fp[:12]}): the candidate ignores the seed")
            return Check(SEED_IGNORED, True, reason, {"seeds": [firsts[fp], seed]})
        firsts.setdefault(fp, seed)
    return Check(SEED_IGNORED, False, "", {"distinct_starts": len(firsts)})


def untimed_overhead(run: dict) -> float | None:
    """A ledger run's untimed seconds: the runner's wall time minus the harness's timed
    training and evaluation (import, data, warmup, checks, checkpoint, exit)."""
    result = run.get("result") or {}
    parts = (run.get("wall_seconds"), result.get("train_seconds"), result.get("eval_seconds"))
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in parts):
        return None
    wall, train, evaluation = parts
    return wall - train - evaluation


def caught_by_runs(runs: Sequence[dict]) -> str | None:
    """caught_by for a candidate whose runs the harness or the loop failed as integrity
    violations: the checks their results name, in order (None when none did)."""
    ids: list[str] = []
    for run in runs:
        if run["outcome"] != "integrity-violation":
            continue
        found = ((run.get("result") or {}).get("integrity") or {}).get("violations") or []
        for v in found:
            if isinstance(v, dict) and isinstance(v.get("check"), str) and v["check"] not in ids:
                ids.append(v["check"])
    return ",".join(ids) or None


# -- checkpoints and the evaluator ---------------------------------------------------------


def run_name(run_id: int, candidate_id: int, role: str, seed: int) -> str:
    """`r0031-c004-confirm-s12`: the name of a run's log, result and checkpoint files. The
    ledger's run id makes it unique: a run discarded on resume and its re-run (same
    candidate, role and seed) keep a log each."""
    return f"r{run_id:04d}-c{candidate_id:03d}-{role}-s{seed}"


def checkpoint_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / "checkpoints" / f"{name}.pt"


def run_checkpoint(run_dir: Path, run: dict) -> Path:
    name = run_name(run["id"], run["candidate_id"], run["role"], run["seed"])
    return checkpoint_path(run_dir, name)


def drop_checkpoints(run_dir: Path, runs: Sequence[dict]) -> None:
    """Delete the runs' checkpoints: evaluated (their numbers are in the ledger) or of a
    candidate that will never be evaluated. No checkpoint outlives its use."""
    for run in runs:
        run_checkpoint(run_dir, run).unlink(missing_ok=True)


class EvaluationFailed(RuntimeError):
    """The fixed evaluator did not give numbers for every checkpoint; the message says why."""


class TwinsFailed(EvaluationFailed):
    """A checkpoint scored afresh failed its twin rows: the forward pass is not causal."""


def evaluate(
    worktree: Path,
    checkpoints: Sequence[Path],
    preset: str,
    device: str,
    train_args: Sequence[str],
    timeout_s: float,
    sandbox: bool = True,
) -> list[dict]:
    """Run `python -m bench.score` in `worktree` (checked out at the commit that made the
    checkpoints): each checkpoint scored on the holdout and val slices by a fresh sandboxed
    forward worker; one {'val', 'holdout'} per checkpoint, in order, each {'loss', 'bpb',
    'twins_ok'}."""
    cmd = [sys.executable, "-m", "bench.score", "--preset", preset, "--device", device]
    cmd += _flags(train_args, ("--data", "--kernels"))
    cmd += ["--splits", "holdout,val", *([] if sandbox else ["--no-sandbox"])]
    cmd += list(map(str, checkpoints))
    with runner.device_lock(device):
        try:
            proc = subprocess.run(
                cmd, cwd=worktree, capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            raise EvaluationFailed(f"the scorer took over {timeout_s:.0f} s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise EvaluationFailed(f"the scorer exited {proc.returncode}: {tail}")
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
            f"the scorer's output is not the contract's: {e!r}: {lines[-1][:200]}"
        ) from None
    return out


def _flags(args: Sequence[str], names: Sequence[str]) -> list[str]:
    """The flags `names` (each with its value) among train.py arguments."""
    out = []
    for i, arg in enumerate(args[:-1]):
        if arg in names:
            out += [arg, args[i + 1]]
    return out


# -- the checks on a candidate the judge would accept ---------------------------------------


@dataclass
class Acceptance:
    verdict: str  # accept, reject or hold
    caught_by: str | None  # the check that rejected or held it
    reason: str  # why (the check's sentence), empty on accept
    checks: dict  # check name -> its numbers, or {'skipped': why}


def judge_acceptance(session, candidate: dict, effect: float) -> Acceptance:
    """Run the acceptance checks for `candidate`, which the judge would accept with speed
    ratio `effect` over the current champion. `session` is the loop's Session (ledger,
    workspace, config, run_dir, event)."""
    cfg = session.config.acceptance_config()
    ledger, champion = session.ledger, session.champion()
    mine = ledger.runs_of(candidate["id"], ok_only=True)
    theirs = ledger.runs_of(champion["id"], ok_only=True)
    checks: dict = {}

    check = seed_test(mine)
    checks[check.name] = check.numbers
    if check.caught:
        return Acceptance("reject", check.name, check.reason, checks)

    overheads = [o for o in map(untimed_overhead, mine) if o is not None]
    champion_overheads = [o for o in map(untimed_overhead, theirs) if o is not None]
    if overheads and champion_overheads:
        check = overhead_test(overheads, champion_overheads, cfg.overhead_abs_s, cfg.overhead_rel)
        checks[check.name] = check.numbers
        if check.caught:
            return Acceptance("reject", check.name, check.reason, checks)
    else:
        checks[UNTIMED_OVERHEAD] = {"skipped": "no run with wall, train and eval seconds"}

    try:
        gaps = holdout_gaps(session, candidate, mine)
    except TwinsFailed as e:
        return Acceptance("reject", TWINS, str(e), checks)
    except EvaluationFailed as e:  # fail closed: no numbers, no acceptance
        return Acceptance("reject", HOLDOUT_GAP, f"holdout evaluation failed: {e}", checks)
    missing = [r["id"] for r in mine if r["id"] not in gaps]
    if missing:
        return Acceptance(
            "reject",
            HOLDOUT_GAP,
            f"run(s) {missing} have no checkpoint to evaluate on the holdout slice",
            checks,
        )
    # The val loss the run reported must be what its final weights score outside the run: a
    # surface that behaves differently inside the run's evaluator process is caught here.
    tolerance = REPRODUCE_TOLERANCE.get(session.config.device, 1e-3)
    evaluated = session.ledger.holdout_of(gaps)
    for run in mine:
        reported = (run.get("result") or {}).get("val_loss")
        again = evaluated[run["id"]]["val_loss"]
        if not isinstance(reported, (int, float)) or abs(reported - again) > tolerance:
            checks[EVAL_REPRODUCE] = {"run": run["id"], "reported": reported, "again": again}
            return Acceptance(
                "reject",
                EVAL_REPRODUCE,
                f"run {run['id']} reported val loss {reported} but its checkpoint scores "
                f"{again:.6f} in the standalone evaluator (tolerance {tolerance:g})",
                checks,
            )
    try:
        champion_gaps = holdout_gaps(session, champion, theirs)
    except EvaluationFailed as e:
        champion_gaps = {}
        session.event(f"the champion's holdout evaluation failed: {e}")
    if len(champion_gaps) < 2:  # a session begun before checkpoints: nothing to compare
        checks[HOLDOUT_GAP] = {
            "skipped": f"the champion has {len(champion_gaps)} evaluated "
            "run(s); the gap test needs 2"
        }
        session.event(f"holdout gap not tested: {checks[HOLDOUT_GAP]['skipped']}")
    else:
        check = gap_test(
            list(gaps.values()),
            list(champion_gaps.values()),
            cfg.holdout_alpha,
            cfg.holdout_min_gap,
        )
        checks[check.name] = check.numbers
        if check.caught:
            return Acceptance("reject", check.name, check.reason, checks)

    if effect > cfg.max_speedup:
        return Acceptance(
            "hold",
            IMPLAUSIBLE_SPEEDUP,
            f"speed ratio {effect:.3f} over the champion is above the "
            f"{cfg.max_speedup:g} limit: held for a human (`python -m agent "
            f"review --run-dir {session.run_dir} {candidate['id']} "
            "--accept|--reject`)",
            checks,
        )
    return Acceptance("accept", None, "", checks)


def holdout_gaps(session, candidate: dict, runs: Sequence[dict]) -> dict[int, float]:
    """run id -> holdout loss − val loss, for the runs with numbers: cached in the ledger, or
    evaluated now from their checkpoints (then cached, and the checkpoints deleted)."""
    ledger = session.ledger
    cached = ledger.holdout_of(r["id"] for r in runs)
    todo = [
        r for r in runs if r["id"] not in cached and run_checkpoint(session.run_dir, r).is_file()
    ]
    if todo:
        ws = session.workspace
        ws.checkout(candidate["commit_sha"])
        cfg = session.config
        try:
            numbers = evaluate(
                ws.path,
                [run_checkpoint(session.run_dir, r) for r in todo],
                cfg.preset,
                cfg.device,
                cfg.train_args,
                session.run_timeout(),
                sandbox=cfg.sandbox,
            )
        finally:
            ws.reset()
        for run, row in zip(todo, numbers):
            failed = [split for split in ("val", "holdout") if row[split].get("twins_ok") is False]
            if failed:
                raise TwinsFailed(f"run {run['id']}'s final weights failed the twin rows when "
                                  f"scored afresh on {' and '.join(failed)}")
            ledger.set_holdout(run["id"], row["val"], row["holdout"])
        drop_checkpoints(session.run_dir, todo)
        cached = ledger.holdout_of(r["id"] for r in runs)
    return {i: row["holdout_loss"] - row["val_loss"] for i, row in cached.items()}


def evidence(session, candidate: dict, decision, acceptance: Acceptance) -> dict:
    """What a held (or check-rejected) candidate's ledger record carries for a human: the
    judge's decision, the checks' numbers, the commit, and every run with its log."""
    runs = session.ledger.runs_of(candidate["id"])
    return {
        **asdict(decision),
        "checks": acceptance.checks,
        "commit": candidate["commit_sha"],
        "ref": candidate["ref"],
        "runs": [
            {
                "id": r["id"],
                "role": r["role"],
                "seed": r["seed"],
                "outcome": r["outcome"],
                "log": r["log_path"],
            }
            for r in runs
        ],
    }
