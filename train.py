"""The fixed timing harness: trains the research surface's recipe on a preset and measures it.

    python train.py --preset cpu-tiny [--budget-tokens N | --budget-seconds S]
                    [--target-loss L] [--seed S] [--out result.json] [--nproc K]

This process is the trusted side of a run, and it never imports the research surface
(model/, kernels/). The candidate's code runs in two sandboxed worker processes
(bench/worker.py, bench/sandbox.py): a trainer and a forward pass. The harness

- feeds the trainer every training batch itself, from the data it alone can read, and
  counts the tokens; the trainer never sees the dataset;
- times the run on its own clock: from the first batch it sends until the trainer hands
  back its final weights, less the evaluations, during which the trainer is frozen
  (SIGSTOP on every process of its sandbox), so no work hides in a pause;
- evaluates by sending the forward worker input rows only and computing the loss itself
  from the logits it returns, with twin rows that catch a look at the future
  (bench/evaluator.py); the forward worker never holds a target;
- reports only what it measured: nothing a worker prints or claims about time or loss is
  used (a worker's train loss is only logged, and its claim to have diverged only hurts it).

Without a sandbox (`--no-sandbox`, or where bubblewrap cannot run) the same processes run
unconfined and the result says "sandbox": false: untrusted. The result JSON is written to
--out and printed as the last line of stdout (bench/protocol.py has the contract).
"""

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import protocol
from bench.candidate import (
    Forward,
    Trainer,
    WorkerFailed,
    WorkerUsageError,
    extra_cpu,
    fingerprint_file,
)
from bench.curves import eval_points, interpolate_target
from bench.evaluator import EvalSet, evaluate
from bench.hardware import mfu
from bench.locks import LOCK_HELD_ENV, device_lock
from bench.presets import PRESETS, Setup, UsageError, add_setup_arguments, resolve_setup
from bench.sandbox import Sandbox, SandboxError, available
from data.cache import DataMissingError, dataset_dir
from data.loader import open_split, read_split_tokens
from data.shards import ShardError

REPO = Path(__file__).resolve().parent
WORK_PREFIX = "speedloop-run-"  # then this process's pid: folders of killed runs are swept
# CPU a trainer's threads beyond its --cpu-threads may use (a share of the timed seconds and
# a fixed allowance): an honest trainer's other threads are idle (measured: bench/RESULTS.md).
CPU_EXTRA_FRACTION, CPU_EXTRA_S = 0.05, 0.25


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-tokens", type=int, help="train for this many tokens")
    budget.add_argument("--budget-seconds", type=float, help="train for this many timed seconds")
    p.add_argument("--target-loss", type=float,
                   help="stop when val loss reaches this; report the time it took")
    p.add_argument("--seed", type=int, default=0, help="seed for the model init and data order")
    p.add_argument("--out", type=Path, help="write the result JSON here (also printed last)")
    p.add_argument("--checkpoint", type=Path,
                   help="save the final weights here (for the checks at acceptance)")
    add_setup_arguments(p)
    p.add_argument("--nproc", type=int, default=1,
                   help="trainer processes (torchrun inside the sandbox), one per GPU")
    p.add_argument("--cpu-threads", type=int,
                   help="intra-op threads of each trainer process on the CPU (default: 1 there, "
                   "torch's own on CUDA); the trainer may not use more CPU time than this")
    p.add_argument("--log-every", type=int, default=10, help="print a progress line every N steps")
    p.add_argument("--no-sandbox", action="store_true",
                   help="run the surface unconfined: the result is marked untrusted")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Bad input is found before anything runs, and named with its flag."""
    for flag in ("budget_tokens", "budget_seconds"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive number, got {value}")
    if args.target_loss is not None and not (math.isfinite(args.target_loss)
                                             and args.target_loss > 0):
        raise UsageError(f"--target-loss must be a positive finite number, got {args.target_loss}")
    if args.seed < 0 or args.seed >= 2**63:
        raise UsageError(f"--seed must be in [0, 2^63), got {args.seed}")
    if args.log_every < 1:
        raise UsageError(f"--log-every must be at least 1, got {args.log_every}")
    if args.nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {args.nproc}")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        raise UsageError(f"--cpu-threads must be at least 1, got {args.cpu_threads}")
    for flag in ("out", "checkpoint"):
        path = getattr(args, flag)
        if path is not None:
            _check_writable(path, f"--{flag}")


def _check_writable(path: Path, flag: str) -> None:
    """The folder exists (or can be made) and takes a file: checked now, not after training."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".speedloop-check-"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder: give a file path")


class Clock:
    """Timed seconds on this process's own clock, pausable for evaluations."""

    def __init__(self):
        self.before, self.started = 0.0, None

    def start(self) -> None:
        self.started = time.perf_counter()

    def pause(self) -> None:
        if self.started is not None:
            self.before += time.perf_counter() - self.started
            self.started = None

    def elapsed(self) -> float:
        running = 0.0 if self.started is None else time.perf_counter() - self.started
        return self.before + running


class Budget:
    """Progress in [0, 1] through the run, in tokens or in timed seconds."""

    def __init__(self, tokens: int | None, seconds: float | None):
        self.tokens, self.seconds = tokens, seconds

    def progress(self, tokens: int, clock: Clock) -> float:
        if self.seconds is not None:
            return clock.elapsed() / self.seconds
        return tokens / self.tokens


def work_dir() -> Path:
    """A private folder for the weights the trainer hands over: in memory (/dev/shm) when it
    has room, else the system's temporary folder. Folders of killed runs are removed."""
    shm = Path("/dev/shm")
    base = None
    if shm.is_dir() and os.access(shm, os.W_OK):
        for old in shm.glob(f"{WORK_PREFIX}*"):
            pid = old.name[len(WORK_PREFIX):].split("-")[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(old, ignore_errors=True)
        if shutil.disk_usage(shm).free > 4 << 30:
            base = shm
    return Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir=base))


def run(args: argparse.Namespace, setup: Setup) -> tuple[dict, int]:
    """Start the workers, measure the run, and return the result and the exit code."""
    preset, device, vocab = setup.preset, setup.device, setup.meta["vocab_size"]
    sandbox = Sandbox(None) if args.no_sandbox else available()
    loader = open_split(setup.data, "train", args.seed, torch.device("cpu"))
    token_bytes = None
    if setup.meta.get("token_bytes"):
        path = dataset_dir(setup.data) / setup.meta["token_bytes"]
        if not path.is_file():
            raise DataMissingError(f"{path} (the byte table of dataset {setup.data!r}) is "
                                   "missing: rebuild the dataset with its prepare command --force")
        token_bytes = np.load(path)
    try:
        evalset = EvalSet(read_split_tokens(setup.data, "val"), preset.eval_seq_len,
                          preset.eval_batch_size, preset.eval_tokens, vocab, token_bytes)
    except ValueError as e:  # too short, or token ids outside the vocabulary
        raise UsageError(f"dataset {setup.data!r}: {e}") from None
    # One thread per trainer process on the CPU: measured steadier on a shared machine than
    # one per core (bench/RESULTS.md); on CUDA the host threads barely matter.
    threads = args.cpu_threads or (1 if device.type == "cpu" else 0)
    wall0, load_start = time.perf_counter(), os.getloadavg()
    work = work_dir()
    weights = work / "weights"
    weights.mkdir()
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        kw = dict(preset=args.preset, device=device, kernels=setup.kernels, vocab=vocab,
                  threads=threads)
        trainer = stack.enter_context(contextlib.closing(Trainer(
            sandbox, REPO, weights, seed=args.seed, compile=setup.compile, nproc=args.nproc,
            **kw)))
        forward = stack.enter_context(contextlib.closing(Forward(
            sandbox, REPO, weights, batch=(evalset.batch_size, evalset.seq_len), **kw)))
        info = trainer.ready()
        forward.ready()
        forward.freeze()  # idle until the first evaluation: it takes nothing from training
        logits_via = ("gpu-buffer" if forward.shared is not None
                      else "shared-memory" if forward.mapped is not None else "socket")
        init_fingerprint, n_params = fingerprint_file(weights / "init.pt")
        violations = []
        if fingerprint_file(weights / "start.pt")[0] != init_fingerprint:
            violations.append(protocol.violation(
                "restore", "the weights at the clock's start are not the initial weights: "
                "warm-up progress was kept"))
        startup_seconds = time.perf_counter() - wall0

        cpu_before = trainer.cpu_times()
        measured = train_and_evaluate(args, setup, loader, evalset, trainer, forward, info,
                                      violations)
        cpu_seconds, extra = extra_cpu(cpu_before, trainer.cpu_times(), threads or 1 << 16)
        allowed = CPU_EXTRA_FRACTION * measured["train_seconds"] + CPU_EXTRA_S
        if device.type == "cpu" and args.nproc == 1 and extra > allowed:
            violations.append(protocol.violation(
                "cpu-threads", f"besides its {threads} thread(s), the trainer's other threads "
                f"and processes used {extra:.2f} CPU seconds in "
                f"{measured['train_seconds']:.1f} timed seconds (allowed {allowed:.2f})"))
            measured["status"] = "integrity-violation"
        if args.checkpoint and measured["status"] == "ok":
            shutil.copyfile(measured.pop("final_weights"), args.checkpoint)
        measured.pop("final_weights", None)
    wall_seconds = time.perf_counter() - wall0
    train_seconds, tokens = measured["train_seconds"], measured["tokens"]
    tokens_per_sec = tokens / train_seconds if train_seconds > 0 else 0.0
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    curve = measured["curve"]
    final = curve[-1] if curve else None
    status = measured["status"]
    result = {
        "schema_version": protocol.SCHEMA_VERSION,
        "status": status,
        "sandbox": sandbox.enabled,  # False: the surface ran unconfined; not to be trusted
        "preset": args.preset,
        "seed": args.seed,
        "device": device.type,
        "world_size": args.nproc,
        "gpu_name": gpu_name,
        "cpu": platform.processor() or platform.machine(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "kernels": info.get("kernels"),  # as the worker reports it
        "compile": setup.compile,
        "data": setup.data,
        "data_fingerprint": setup.meta["fingerprint"],
        "n_params": n_params,
        "init_fingerprint": init_fingerprint,
        "flops_per_token": info.get("flops_per_token"),  # as the worker reports it
        "budget_tokens": measured["budget_tokens"],
        "budget_seconds": args.budget_seconds,
        "target_loss": args.target_loss,
        "tokens": tokens,
        "steps": measured["steps"],
        "train_seconds": train_seconds,
        "eval_seconds": measured["eval_seconds"],
        "wall_seconds": wall_seconds,
        "untimed": {  # where the seconds outside the clock went
            "startup": startup_seconds,  # processes, imports, build, warm-up
            "evaluation": measured["eval_seconds"],
            "other": wall_seconds - startup_seconds - train_seconds - measured["eval_seconds"],
        },
        "tokens_per_sec": tokens_per_sec,
        "cpu_usage": {"threads": threads, "trainer_cpu_seconds": cpu_seconds,
                      "beyond_threads_seconds": extra,
                "load_start": load_start[0], "load_end": os.getloadavg()[0]},
        "val_loss": final["val_loss"] if final else None,
        "val_bpb": final["val_bpb"] if final else None,
        "time_to_target": (interpolate_target(curve, args.target_loss)
                           if args.target_loss is not None else None),
        "mfu": mfu(info["flops_per_token"], tokens_per_sec, gpu_name)
        if isinstance(info.get("flops_per_token"), (int, float)) else None,
        "peak_memory_bytes": trainer.reported_peak_memory,  # as the trainer reports it
        "logits_via": logits_via,
        "twins": measured["twins"],
        "integrity": {"ok": not violations, "violations": violations},
        "checkpoint": str(args.checkpoint) if args.checkpoint and status == "ok" else None,
        "curve": curve,
    }
    code = {"ok": protocol.EXIT_OK, "diverged": protocol.EXIT_DIVERGED}.get(
        status, protocol.EXIT_INTEGRITY)
    return result, code


def train_and_evaluate(args, setup, loader, evalset, trainer, forward, info, violations) -> dict:
    """The timed run: batches out, weights back, evaluations with the trainer frozen."""
    preset, vocab = setup.preset, setup.meta["vocab_size"]
    budget = Budget(args.budget_tokens or (None if args.budget_seconds else preset.budget_tokens),
                    args.budget_seconds)
    target = args.target_loss
    max_loss = 3 * math.log(vocab)  # far above the initial ln(vocab): the run blew up
    clock = Clock()
    rng = np.random.default_rng()  # evaluation order and twins: fresh from the OS every run
    pending = eval_points(preset.n_evals)  # the same schedule with or without a target
    curve, twins = [], []
    status, steps, tokens, eval_seconds, n_saved = "ok", 0, 0, 0.0, 0
    shape = info["shape"]

    def evaluate_now() -> dict | None:
        """Take the trainer's weights (on the clock), then pause, freeze it and score them."""
        nonlocal eval_seconds, n_saved
        n_saved += 1
        path = trainer.save(f"eval-{n_saved:03d}.pt")
        clock.pause()
        t = time.perf_counter()
        trainer.freeze()
        forward.thaw()
        try:
            forward.load(path)
            ev = evaluate(lambda x: forward.logits(x).to(setup.device), evalset, setup.device,
                          rng)
        except FloatingPointError:  # NaN or infinite logits: the weights blew up
            ev = None
        except ValueError as e:  # logits of the wrong shape: the candidate's forward is broken
            raise WorkerFailed(f"the forward pass: {e}") from None
        forward.freeze()
        outside = trainer.thaw()
        eval_seconds += time.perf_counter() - t
        if outside:
            violations.append(protocol.violation(
                "frozen-signals", f"signals reached the frozen trainer from outside its "
                f"sandbox: {'; '.join(outside)}"))
        if ev is None:
            return None
        twins.append(ev.twins.as_dict())
        if not ev.twins.ok:
            violations.append(protocol.violation(
                "twins", f"a twin row's log-probabilities moved by {ev.twins.max_change:.3g} "
                f"(tolerance {ev.twins.tolerance:.3g}) where it repeats its original row: the "
                "forward pass saw past a position, across rows, or changed as it was used"))
        point = dict(tokens=tokens, seconds=clock.elapsed(), val_loss=ev.loss, val_bpb=ev.bpb)
        curve.append(point)
        print(protocol.eval_line(steps, tokens, ev.loss, point["seconds"]), flush=True)
        return point, path

    def batch(batch_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        if batch_size % args.nproc:
            raise UsageError(f"the recipe's batch of {batch_size} sequences does not split over "
                             f"{args.nproc} processes: use an --nproc that divides it")
        try:
            x, y = loader.next_batch(batch_size, seq_len)
        except ValueError as e:  # a window longer than the split
            raise UsageError(f"dataset {setup.data!r}: {e}") from None
        if int(y.max()) >= vocab or int(x.min()) < 0:
            raise UsageError(f"the train split of dataset {setup.data!r} holds token ids outside "
                             f"the vocabulary of {vocab}: rebuild it with its prepare --force")
        return x.numpy().astype(np.int32), y.numpy().astype(np.int32)

    last = None
    if violations:  # found before the clock (the restore check): nothing is timed
        status = "integrity-violation"
    clock.start()
    while status == "ok":
        progress = budget.progress(tokens, clock)
        if progress >= 1.0:
            break
        x, y = batch(*_shape(shape))
        tokens += x.size
        steps += 1
        log = steps % args.log_every == 0 or steps == 1
        reply = trainer.step(x, y, progress, budget.progress(tokens, clock), log)
        shape = reply.get("shape")
        if log:
            loss = reply.get("loss")
            if not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss > max_loss:
                status = "diverged"
                print(f"diverged at step {steps}: train loss {loss}", flush=True)
                break
            elapsed = clock.elapsed()
            print(f"train  step {steps:5d} | tokens {tokens:>11,} | loss {loss:.4f} | "
                  f"{tokens / max(elapsed, 1e-9):,.0f} tok/s | {elapsed:.1f}s", flush=True)
        progress = budget.progress(tokens, clock)
        if pending and pending[0] <= progress < 1.0:
            while pending and pending[0] <= progress:
                pending.pop(0)
            last = evaluate_now()
            if violations:
                status = "integrity-violation"
                break
            if last is None:
                status = "diverged"
                break
            if target is not None and last[0]["val_loss"] <= target:
                break
            clock.start()
    if status == "ok" and (last is None or last[0]["tokens"] != tokens):
        last = evaluate_now()  # the final weights: the clock stops when they are handed over
        if violations:
            status = "integrity-violation"
        elif last is None:
            status = "diverged"
    clock.pause()
    return {"status": status, "steps": steps, "tokens": tokens, "curve": curve,
            "train_seconds": clock.elapsed(), "eval_seconds": eval_seconds, "twins": twins,
            "budget_tokens": budget.tokens, "final_weights": last[1] if last else None}


def _shape(shape) -> tuple[int, int]:
    """The (batch_size, seq_len) the trainer asked for, checked: it is only the worker's word."""
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 1 << 24
                       for n in shape)):
        raise WorkerFailed(f"the trainer asked for a batch of shape {shape!r}: it must be two "
                           "positive integers (recipe.batch_shape)")
    return shape[0], shape[1]


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds: the workers and the weights folder are removed


@contextlib.contextmanager
def held_device(device: str):
    """The machine-wide lock of the run's device, unless the runner that started us holds
    it; a run started by hand waits for a session's run to finish, and says so."""
    if os.environ.get(LOCK_HELD_ENV) == device:
        yield
        return
    with device_lock(device, announce=lambda holder: print(
            f"waiting for the {device} lock ({holder})", file=sys.stderr, flush=True)):
        yield


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)  # the runner's timeout and early stop
    try:
        check_args(args)
        setup = resolve_setup(args.preset, args.device, args.data, args.kernels, args.compile)
        with held_device(setup.device.type):
            result, code = run(args, setup)
    except (UsageError, DataMissingError, ShardError, WorkerUsageError, SandboxError) as e:
        print(f"error: {e}", file=sys.stderr)
        return protocol.EXIT_USAGE
    except WorkerFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return protocol.EXIT_CRASH
    line = json.dumps(result)
    print(line, flush=True)  # before the file: a result is never lost to a bad --out
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
