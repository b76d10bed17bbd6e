"""Measuring: one benchmark run of a candidate, as the session's settings say, recorded.

`Measurer.benchmark` checks out the candidate, takes a fresh seed, starts the run in the
ledger (its files named by the ledger's run id), and makes the run (runner.run_checked): the
fixed files checked against their hashes at session start (`fixed-hash`: a changed
harness never runs), then train.py through the runner with the session's timeout and
early-stop rule; here, or on a Ray slot's node (agent/cluster.py), which sends back the
result, the log and the checkpoint. It records the outcome in the ledger and W&B (whose
run is live: train.py's lines stream into it). A run that does not count is discarded and
run again: one disturbed by a neighbour, and one lost (its Ray worker died, or a SIGKILL
from outside: infrastructure, not the candidate's failure; a Ray slot that died is retired).
It also profiles the champion for the LLM proposers, the same way, under the device lock.

What this module must never do: run candidate code in the engine's process (the runner
starts train.py; the profile runs as a child too), reuse a seed (but in a pair, whose two
runs share theirs by design), let a stale result, log or checkpoint pass for a run's own,
or count a lost run for or against anyone.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from agent import child, integrity, runner
from agent.config import SessionConfig, SessionStop
from agent.ledger import Ledger
from agent.rundir import RunDir, run_name
from agent.runner import EarlyStop
from agent.slots import Slot, SlotPool, parse_devices
from agent.stats import OBJECTIVES, first_of_seed, primary_metric
from agent.workspace import Workspace
from bench import protocol
from bench.disturbance import disturbed
from bench.locks import lock_path

# Disturbed runs discarded in a row before the next one counts anyway: a machine that stays
# busy slows a session down, it must not stop it.
MAX_DISTURBED = 2
# Lost runs of one benchmark in a row before the session stops: something that kills every
# run (a watchdog, workers that keep dying) is the infrastructure's to fix, and a lost run
# never counts, so going on would only spin.
MAX_LOST = 3
# The champion's runs with final weights for the holdout check at most: more add little to
# its test and cost a scoring each at the next accept (a paired session makes one champion
# run per candidate run; the re-measurements of an unpaired one add up over a night).
CHAMPION_CHECKPOINTS = 8
# Expected wall time of a first run, before any run was measured (timeouts scale it).
FIRST_RUN_SECONDS = {"cpu-tiny": 120.0, "gpu-small": 900.0, "gpt2-124m": 3600.0}


class Measurer:
    """Benchmark runs of one session: `workspace()` gives its worktree (made on first use),
    `say` prints a line of progress, `waiting(text)` shows a spinner while a run runs.
    Any thread may call `benchmark`: each run takes a free slot of the session's `pool`
    (agent/slots.py) and runs in that slot's worktree."""

    def __init__(self, run_dir: RunDir, ledger: Ledger, config: SessionConfig,
                 workspace: Callable[[], Workspace], tracker, say, waiting):
        self.run_dir, self.ledger, self.config = run_dir, ledger, config
        self.workspace, self.tracker, self.say, self.waiting = workspace, tracker, say, waiting
        self.pool = SlotPool(make_slots(config))
        self._lock = threading.Lock()  # a run's seed and ledger row; the slots' worktrees
        self._worktrees: dict[str, Workspace] = {}
        self._weighing: Counter = Counter()  # champion runs in flight that keep their weights

    @property
    def parallel(self) -> bool:
        """Several slots: each its own worktree and no spinner, even after some retired."""
        return len(self.pool.slots) + len(self.pool.retired) > 1

    @contextlib.contextmanager
    def slot(self, name: str | None = None) -> Iterator[tuple[Slot, Workspace]]:
        """A free slot (the one named `name`, when given) and its worktree, for one run.
        With one slot that is the session's worktree; with several each has its own."""
        with self.pool.take(name) as slot:
            if not self.parallel:
                yield slot, self.workspace()
                return
            with self._lock:
                if slot.name not in self._worktrees:
                    path = self.run_dir.slot_worktree(slot.name)
                    self._worktrees[slot.name] = self.workspace().second(path)
            yield slot, self._worktrees[slot.name]

    def session_hashes(self) -> dict:
        """The hashes of the fixed files, taken from the champion once and kept in the
        session's config, so a resumed session checks against the same ones."""
        if self.config.fixed_hashes is None:
            ws = self.workspace()
            ws.reset()
            self.config.fixed_hashes = integrity.fixed_hashes(ws.path)
            self.ledger.set_session(asdict(self.config))
        return self.config.fixed_hashes

    def timeout(self) -> float:
        """A run's hard limit: a multiple of the longest run so far, and never under the
        preset's first-run allowance, so a loaded machine that slows start-up several times
        does not kill a valid run before its clock starts."""
        walls = [r["wall_seconds"] for c in self.ledger.candidates()
                 for r in self.ledger.runs_of(c["id"], ok_only=True) if r["wall_seconds"]]
        floor = FIRST_RUN_SECONDS.get(self.config.preset, 600.0)
        return max(self.config.timeout_factor * max(walls, default=floor), floor)

    def objective_args(self) -> list[str]:
        cfg = self.config
        if cfg.objective == "time-to-loss" and cfg.target_loss is not None:
            return ["--target-loss", f"{cfg.target_loss:.4f}"]
        if cfg.objective == "loss-at-time" and cfg.seconds is not None:
            return ["--budget-seconds", f"{cfg.seconds:g}"]
        return []

    def benchmark(self, candidate: dict, role: str, early_stop: EarlyStop | None = None,
                  slot: str | None = None, seed: int | None = None) -> dict:
        """Run train.py once for `candidate` on a free slot (the one named `slot`, while the
        session has it) and record the run; returns its result dict. A fresh seed, or
        `seed` (the partner of a paired run). A run disturbed by a
        neighbour (bench/disturbance.py) is discarded and run again, up to MAX_DISTURBED
        times; then the last one counts, and an event says so. A lost run is discarded and
        run again (on another slot when its own died); MAX_LOST in a row stop the session."""
        discarded = {"disturbed": 0, "lost": 0}
        while True:
            with self.slot(slot) as taken:
                result = self._benchmark(*taken, candidate, role, early_stop,
                                         discarded["disturbed"] < MAX_DISTURBED, seed)
            if isinstance(result, dict):
                return result
            discarded[result] += 1
            if discarded["lost"] >= MAX_LOST:
                raise SessionStop(f"a {role} run of candidate {candidate['id']} was lost "
                                  f"{MAX_LOST} times in a row (its workers died, or something "
                                  f"killed it from outside; the events and {self.run_dir.logs} "
                                  "say how): fix the machines, then `python -m agent run "
                                  f"--resume {self.run_dir}`")

    def pair(self, champion: dict, candidate: dict, role: str, early_stop: EarlyStop | None,
             champion_first: bool) -> None:
        """One run of the champion and one of `candidate` with one fresh seed, back to back
        on one slot (held between them), in the order given: the judge's paired test
        compares them (agent/judge.py). A candidate run that fails or stops early ends the
        pair (its verdict needs no partner). A champion run that fails is run again, and a
        second failure stops the session: the champion ran before, so the machine is at
        fault. A disturbed run is run again in its place; a lost one too, on any slot (its
        own may have died), with the pair's seed once its partner has run."""
        runs = [(champion, "champion", None), (candidate, role, early_stop)]
        seed = None
        with contextlib.ExitStack() as held:
            taken = held.enter_context(self.slot())

            def run(who: dict, what: str, early: EarlyStop | None) -> dict:
                """On the held slot; once a run is lost there, wherever one is free (the
                held slot goes back first: with one slot, taking another would wait on it)."""
                nonlocal taken
                result = self._held(taken, who, what, early, seed) if taken else "lost"
                if result == "lost":
                    held.close()
                    taken = None
                    result = self.benchmark(who, what, early, seed=seed)
                return result

            for who, what, early in runs if champion_first else runs[::-1]:
                result = run(who, what, early)
                if who is champion and result["status"] != "ok":
                    again = run(champion, "champion", None)
                    if again["status"] != "ok":
                        raise SessionStop(
                            f"the champion failed twice in a row beside candidate "
                            f"{candidate['id']} ({result['status']}, then {again['status']}; "
                            f"the logs are in {self.run_dir.logs}): it ran before, so the "
                            "machine is at fault; fix it, then `python -m agent run "
                            f"--resume {self.run_dir}`")  # fmt: skip
                    result = again
                if who is candidate and result["status"] != "ok":
                    return
                seed = result["seed"]

    def twin(self, candidate: dict, role: str) -> None:
        """Two runs of `candidate` with one fresh seed, back to back on one slot (held
        between them): a pair of the same code, whose difference is the clock's alone (a
        paired session's baseline, agent/baseline.py). No second run when the first fails;
        a lost run is made again on any slot, with the seed once the first has run."""
        seed = None
        with contextlib.ExitStack() as held:
            taken = held.enter_context(self.slot())
            for _ in range(2):
                result = self._held(taken, candidate, role, None, seed) if taken else "lost"
                if result == "lost":
                    held.close()
                    taken = None
                    result = self.benchmark(candidate, role, None, seed=seed)
                if result["status"] != "ok":
                    return
                seed = result["seed"]

    def _held(self, taken: tuple[Slot, Workspace], candidate: dict, role: str,
              early_stop: EarlyStop | None, seed: int | None) -> dict | str:
        """One run on a slot already held, run again in place while disturbed (up to
        MAX_DISTURBED times); its result, or "lost"."""
        disturbed_runs = 0
        while True:
            result = self._benchmark(*taken, candidate, role, early_stop,
                                     disturbed_runs < MAX_DISTURBED, seed)
            if result != "disturbed":
                return result
            disturbed_runs += 1

    def on_every_slot(self, candidate: dict, role: str, slots: Sequence[str]) -> None:
        """One run of `candidate` on each of `slots`, all at once (a thread each)."""
        with ThreadPoolExecutor(max_workers=max(1, len(slots))) as runs:
            for done in [runs.submit(self.benchmark, candidate, role, None, name)
                         for name in slots]:
                done.result()

    def _benchmark(self, slot: Slot, ws: Workspace, candidate: dict, role: str,
                   early_stop: EarlyStop | None, discard_disturbed: bool,
                   seed: int | None = None) -> dict | str:
        """One run, recorded: its result dict, or why it was discarded ("disturbed",
        "lost") to be run again. A fresh seed unless `seed` (a pair's second run) is given."""
        expected = self.session_hashes()
        ws.checkout(candidate["commit_sha"])
        cid = candidate["id"]
        # A baseline run given a seed is a twin (agent/baseline.py): its final weights are
        # its replicate's, so the holdout check has them already.
        twin = role == "baseline" and seed is not None
        with self._lock:  # two threads must never take the same seed
            if seed is None:
                seed = max(self.ledger.used_seeds() | {0}) + 1
            run_id = self.ledger.start_run(
                cid, role, seed, lambda i: self.run_dir.log(run_name(i, cid, role, seed)),
                lock_path=None if slot.remote else lock_path(
                    self.config.device, *(slot.gpus or slot.cores)[:1]),  # a node's is there
                slot=slot.name)  # fmt: skip
            # A champion's run keeps its final weights while fewer than CHAMPION_CHECKPOINTS
            # of its runs have theirs, those in flight included.
            weighed = role in ("baseline", "champion") and not twin and \
                self.champion_checkpoints(cid) + self._weighing[cid] < CHAMPION_CHECKPOINTS
            keep = weighed or role not in ("baseline", "champion")
            self._weighing[cid] += int(weighed)
        try:
            return self._recorded(slot, ws, candidate, role, early_stop, discard_disturbed,
                                  run_id, seed, keep, expected)
        finally:
            with self._lock:
                self._weighing[cid] -= int(weighed)

    def _recorded(self, slot: Slot, ws: Workspace, candidate: dict, role: str,
                  early_stop: EarlyStop | None, discard_disturbed: bool, run_id: int,
                  seed: int, keep: bool, expected: Mapping[str, str]) -> dict | str:
        """`_benchmark`'s run, started in the ledger as `run_id`: made and recorded."""
        cid = candidate["id"]
        name = run_name(run_id, cid, role, seed)
        log = self.run_dir.log(name)
        self.tracker.start_run(self.ledger.run(run_id), candidate)
        # The final weights, for the holdout check at acceptance; a champion's
        # re-measurements are evaluated at the next check too: more runs, more power.
        checkpoint = self.run_dir.checkpoint(name)
        checkpoint.unlink(missing_ok=True)  # a stale one must never pass for this run's
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint = checkpoint if keep else None
        on = f" on slot {slot.name}" if self.parallel else ""
        self.say(f"  run {name}{on}: {candidate['description']}")
        outcome = self._train(slot, ws, run_id, seed, name, early_stop, checkpoint, expected)
        if child.cancelled():
            # The engine is stopping (Ctrl-C, SIGTERM): a signal to the whole process group
            # may have ended this run first. Not the candidate's doing: left running, it is
            # discarded and made again on resume.
            raise child.Cancelled(f"run {run_id} ended while the engine was stopping")
        why = disturbed(outcome.result) if outcome.status == "ok" else None
        if checkpoint is not None and (outcome.status != "ok" or (why and discard_disturbed)):
            checkpoint.unlink(missing_ok=True)  # nothing will evaluate it
        if slot.remote is not None and slot.remote.dead:
            self.pool.retire(slot.name)
            self.ledger.log_event(f"slot {slot.name} retired, its worker died: "
                                  f"{slot.remote.dead}; {len(self.pool)} slot(s) left")
        if outcome.status == "lost":
            self.ledger.discard_run(run_id, f"lost: {outcome.error}", None, outcome.wall_seconds)
            self.tracker.finish_run(self.ledger.run(run_id), self.ledger.candidate(cid))
            self.say(f"  -> lost, discarded and run again: {outcome.error}")
            return "lost"
        if why and discard_disturbed:
            self.ledger.discard_run(run_id, f"disturbed: {why}", outcome.result,
                                    outcome.wall_seconds)
            self.tracker.finish_run(self.ledger.run(run_id), self.ledger.candidate(cid))
            self.say(f"  -> disturbed, discarded and run again: {why}")
            return "disturbed"
        if why:
            self.ledger.log_event(f"run {run_id} counted although disturbed ({why}): the "
                                  f"machine stayed busy for {MAX_DISTURBED + 1} runs in a row")
        self.ledger.finish_run(run_id, outcome.status, outcome.result, outcome.error,
                               outcome.wall_seconds)  # fmt: skip
        self.tracker.finish_run(self.ledger.run(run_id), self.ledger.candidate(cid))
        if outcome.returncode == protocol.EXIT_USAGE and role in ("baseline", "champion"):
            # The champion's own code refused the session's settings (a dataset gone, say):
            # every run would, so stop now and say why. A candidate's exit 2 is its crash.
            lines = (outcome.error or "").splitlines()
            raise SessionStop(f"train.py refused its input: {lines[-1] if lines else ''} "
                              f"(exit {protocol.EXIT_USAGE}; log {log})")
        result = {**(outcome.result or {}), "status": outcome.status, "seed": seed}
        self.say(f"  -> {outcome.status}{summary(result, self.config.objective)}")
        if outcome.error and outcome.status == "integrity-violation":
            self.say(f"     {outcome.error}")
        return result

    def _train(self, slot: Slot, ws: Workspace, run_id: int, seed: int, name: str,
               early_stop: EarlyStop | None, checkpoint: Path | None,
               expected: Mapping[str, str]) -> runner.RunOutcome:
        """The run of the worktree's commit with the session's settings, here or on the
        slot's node; the ledger hears when the run has its device lock (until then it
        waits, not runs)."""
        cfg = self.config
        spec = runner.RunSpec(
            worktree=ws.path, preset=cfg.preset, seed=seed, out_path=self.run_dir.result(name),
            log_path=self.run_dir.log(name), timeout_s=self.timeout(),
            extra_args=list(cfg.train_args) + self.objective_args(), device=cfg.device,
            gpus=slot.gpus, cores=slot.cores, nproc=cfg.gpus, early_stop=early_stop,
            checkpoint=checkpoint, sandbox=cfg.sandbox,
            on_lock=lambda lock: self.ledger.lock_taken(run_id, lock.waited_s),
            on_line=lambda line: self.tracker.run_line(run_id, line),
        )  # fmt: skip
        # One spinner at a time: with several slots the progress lines say what runs.
        waiting = self.waiting if not self.parallel else lambda text: contextlib.nullcontext()
        run = runner.run_checked if slot.remote is None else slot.remote.run
        with waiting(f"running {name} (timeout {spec.timeout_s:.0f} s)"):
            return run(spec, expected)

    def champion_checkpoints(self, candidate_id: int) -> int:
        """The champion's ok runs whose final weights the holdout check has: scored, or a
        checkpoint waiting to be."""
        runs = self.ledger.runs_of(candidate_id, ok_only=True)
        scored = self.ledger.holdout_of(r["id"] for r in runs)
        return sum(r["id"] in scored or self.run_dir.run_checkpoint(r).is_file() for r in runs)

    def close(self) -> None:
        """End the session's Ray workers, if it has any (the local slots need nothing)."""
        for slot in self.pool.slots + self.pool.retired:
            if slot.remote is not None:
                slot.remote.close()

    def champion_profile(self, champion: dict) -> str | None:
        """Where the champion spends its time (bench/profile.py): made once per champion,
        under the device lock, so never during a benchmark; None when it failed (said)."""
        path = self.run_dir.profile_path(champion["id"])
        if not path.exists():
            with self.slot() as (slot, ws):
                return self._profile(champion, path, slot, ws)
        return path.read_text()

    def _profile(self, champion: dict, path: Path, slot: Slot, ws: Workspace) -> str | None:
        ws.checkout(champion["commit_sha"])
        cfg = self.config
        cmd = [sys.executable, "-m", "bench.profile", "--preset", cfg.preset,
               *train_flags(cfg.train_args, ("--data",)), "--out", str(path),
               *([] if cfg.sandbox else ["--no-sandbox"])]  # it sandboxes itself
        path.parent.mkdir(parents=True, exist_ok=True)
        done = child.run_tool(cmd, ws.path, self.timeout(), device=cfg.device,
                              gpus=slot.gpus, cores=slot.cores)
        if done.code != 0:
            self.say(f"no profile of the champion: {done.last_lines()}")
            self.ledger.log_event(f"no profile of the champion: {done.last_lines()}")
            return None
        return path.read_text()


def make_slots(config: SessionConfig) -> list[Slot]:
    """The session's slots: Ray actors with `--cluster ray` (agent/cluster.py, which needs
    Ray: imported only then), else this machine's devices as `--devices` names them."""
    if config.cluster == "ray":
        from agent import cluster

        return cluster.slots(config)
    return parse_devices(config.devices, config.device, config.gpus)


def train_flags(args: Sequence[str], names: Sequence[str]) -> list[str]:
    """The flags `names`, each with its value, among train.py arguments."""
    out = []
    for i, arg in enumerate(args[:-1]):
        if arg in names:
            out += [arg, args[i + 1]]
    return out


# The champion's runs (the latest) that the early stop compares a screen against: a
# baseline's worth, so that the rule is as strict late in a session as at its start.
EARLY_STOP_RUNS = 3


def early_stop_rule(champion: Sequence[dict], config: SessionConfig,
                    loss_margin: float) -> EarlyStop | None:
    """The rule that stops a screening run that is clearly losing, by the objective's own
    comparison: loss at equal training time (time-to-loss, loss-at-time), or at equal
    tokens past the judge's loss margin (throughput, whose loss test is at equal tokens).
    Against the slowest of the champion's last `EARLY_STOP_RUNS` runs, from half of it on:
    only a clear loser stops, not a run that met a slow minute of a shared machine. The
    last few, not all: the slowest of all only ever gets slower as the champion's runs
    accumulate (pairs, re-measurements), and one run that met a neighbour's burst would
    blunt the rule for the rest of the session."""
    ok = first_of_seed(r for r in champion if r.get("status") == "ok" and r["curve"])
    curves = [r["curve"] for r in ok][-EARLY_STOP_RUNS:]  # a twin repeats its replicate
    if not curves:
        return None
    if config.objective == "throughput":
        slowest = min(curves, key=lambda curve: curve[-1]["tokens"] / curve[-1]["seconds"])
        margin = config.early_stop_margin + loss_margin
        return behind_champion(slowest, margin, min_fraction=0.5, axis="tokens")
    slowest = max(curves, key=lambda curve: curve[-1]["seconds"])
    return behind_champion(slowest, config.early_stop_margin, min_fraction=0.5)


def behind_champion(
    champion_curve: Sequence[dict], margin: float, min_fraction: float = 0.3,
    axis: str = "seconds",
) -> EarlyStop:  # fmt: skip
    """An early-stop rule: stop when the candidate's val loss is worse than the champion's at
    the same point of training by more than `margin` nats.

    The point is the training time (`axis="seconds"`: who gets lower sooner, for the
    time-to-loss and loss-at-time objectives) or the tokens seen (`axis="tokens"`: the
    throughput objective compares loss at equal tokens). The champion's curve is
    interpolated linearly on that axis, and held at its ends. Nothing is stopped before
    `min_fraction` of the champion's whole run on that axis: early evaluations are noisy,
    and a different schedule can start slower.
    """
    if axis not in ("seconds", "tokens"):
        raise ValueError(f"axis {axis!r}: use 'seconds' or 'tokens'")
    points = sorted((float(row[axis]), float(row["val_loss"])) for row in champion_curve)
    if not points:
        raise ValueError("behind_champion needs a champion curve with at least one evaluation")
    xs = [x for x, _ in points]
    losses = [loss for _, loss in points]
    earliest = min_fraction * xs[-1]

    def champion_loss(x: float) -> float:
        i = bisect.bisect_left(xs, x)
        if i == 0:
            return losses[0]
        if i == len(xs):
            return losses[-1]
        x0, x1 = xs[i - 1], xs[i]
        return losses[i - 1] + (losses[i] - losses[i - 1]) * (x - x0) / (x1 - x0)

    def should_stop(tokens: int, seconds: float, val_loss: float) -> bool:
        x = seconds if axis == "seconds" else tokens
        if x < earliest:
            return False
        if not math.isfinite(val_loss):
            return True  # a NaN loss is as far behind as a run can be
        return val_loss > champion_loss(x) + margin

    return should_stop


def summary(result: dict, objective: str) -> str:
    """`: time_to_target 12.3, 9,876 tok/s, val loss 5.432` for a progress line."""
    if result["status"] != "ok":
        return ""
    speed = f"{result['tokens_per_sec']:,.0f} tok/s, val loss {result['val_loss']:.4f}"
    if objective == "time-to-loss" and result.get("target_loss") is None:
        return f": {speed}"  # ran without a target: the baseline replicates that set it
    metric = primary_metric(result, objective)
    shown = "not reached" if metric is None else f"{metric:.4g}"
    return f": {OBJECTIVES[objective][0]} {shown}, {speed}"
