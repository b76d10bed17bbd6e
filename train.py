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

# Before torch loads OpenMP: the harness's threads (2 while it scores an evaluation) sleep
# when they wait, as the workers' do (bench/candidate.py OMP_WAIT_POLICY). Set, not
# defaulted: an inherited ACTIVE would bring back the spinning a neighbour turns into noise.
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch

from bench import protocol
from bench.candidate import Forward, Trainer, WorkerFailed, WorkerUsageError, fingerprint_file
from bench.curves import eval_points, interpolate_target
from bench.disturbance import run_delay_seconds, steal_seconds
from bench.hardware import mfu
from bench.harness import Budget, Clock, Data, Evaluations, held_device, work_dir
from bench.presets import PRESETS, Setup, UsageError, add_setup_arguments, resolve_setup
from bench.proctree import extra_cpu
from bench.sandbox import Sandbox, SandboxError, available
from bench.telemetry import Telemetry, visible_gpus
from data.cache import DataMissingError
from data.shards import ShardError

REPO = Path(__file__).resolve().parent
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


def run(args: argparse.Namespace, setup: Setup) -> tuple[dict, int]:
    """Start the workers, measure the run, and return the result and the exit code."""
    device = setup.device
    if device.type == "cpu":
        torch.set_num_threads(1)  # the harness's own work (batches, scores) beside the trainer
    sandbox = Sandbox(None) if args.no_sandbox else available()
    data = Data(args, setup)
    # One thread per trainer process on the CPU: measured steadier on a shared machine than
    # one per core (bench/RESULTS.md); on CUDA the host threads barely matter.
    threads = args.cpu_threads or (1 if device.type == "cpu" else 0)
    wall0, load_start = time.perf_counter(), os.getloadavg()
    work = work_dir()
    weights = work / "weights"
    weights.mkdir()
    violations: list[dict] = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        kw = dict(preset=args.preset, device=device, kernels=setup.kernels, vocab=data.vocab)
        trainer = stack.enter_context(contextlib.closing(Trainer(
            sandbox, REPO, weights, seed=args.seed, compile=setup.compile, nproc=args.nproc,
            threads=threads, **kw)))
        # The forward worker runs only while the trainer is frozen: it may use every core
        # this run has, untimed (0: torch's own count on CUDA).
        cores = len(os.sched_getaffinity(0)) if device.type == "cpu" else 0
        forward = stack.enter_context(contextlib.closing(Forward(
            sandbox, REPO, weights, batch=(data.val.batch_size, data.val.seq_len),
            threads=cores, **kw)))
        info = trainer.ready()
        forward.ready()
        forward.freeze()  # idle until the first evaluation: it takes nothing from training
        logits_via = ("gpu-buffer" if forward.shared is not None
                      else "shared-memory" if forward.mapped is not None else "socket")
        # The warm-up trained on random tokens; the clock starts from the initial weights.
        init_fingerprint, n_params = fingerprint_file(weights / "init.pt")
        if fingerprint_file(weights / "start.pt")[0] != init_fingerprint:
            violations.append(protocol.violation(
                "restore", "the weights at the clock's start are not the initial weights: "
                "warm-up progress was kept"))
        startup_seconds = time.perf_counter() - wall0

        evaluations = Evaluations(trainer, forward, data.val, device, violations, cores)
        cpu_before = trainer.cpu_times()
        waited, stolen = run_delay_seconds(trainer.processes()), steal_seconds()
        # The GPUs' clocks, power, heat and throttle reasons just outside the clock.
        gpus = visible_gpus(args.nproc) if device.type == "cuda" else ()
        telemetry = Telemetry.open(device.type, gpus)
        stack.callback(telemetry.close)
        telemetry.start()
        timed = timed_run(args, setup.preset, data, trainer, evaluations, info["shape"])
        telemetry.end()
        gpu_telemetry = telemetry.as_result()
        if gpu_telemetry["throttled"]:
            print(f"the GPU throttled: {', '.join(gpu_telemetry['throttled'])}", flush=True)
        cpu_seconds, extra = extra_cpu(cpu_before, trainer.cpu_times(), threads or 1 << 16)
        # What a neighbour took from the timed region (bench/disturbance.py): the engine
        # re-runs a disturbed run instead of counting it.
        waited = run_delay_seconds(trainer.processes()) - waited
        stolen = steal_seconds() - stolen
        allowed = CPU_EXTRA_FRACTION * timed["train_seconds"] + CPU_EXTRA_S
        if device.type == "cpu" and args.nproc == 1 and extra > allowed:
            violations.append(protocol.violation(
                "cpu-threads", f"besides its {threads} thread(s), the trainer's other threads "
                f"and processes used {extra:.2f} CPU seconds in "
                f"{timed['train_seconds']:.1f} timed seconds (allowed {allowed:.2f})"))
        status = "integrity-violation" if violations else timed["status"]
        if args.checkpoint and status == "ok":
            shutil.copyfile(evaluations.last_weights, args.checkpoint)
    wall_seconds = time.perf_counter() - wall0
    train_seconds, tokens, curve = timed["train_seconds"], timed["tokens"], evaluations.curve
    tokens_per_sec = tokens / train_seconds if train_seconds > 0 else 0.0
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    final = curve[-1] if curve else None
    flops = info.get("flops_per_token")  # as the worker reports it
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
        "flops_per_token": flops,
        "budget_tokens": timed["budget_tokens"],
        "budget_seconds": args.budget_seconds,
        "target_loss": args.target_loss,
        "tokens": tokens,
        "steps": timed["steps"],
        "train_seconds": train_seconds,
        "eval_seconds": evaluations.seconds,
        "wall_seconds": wall_seconds,
        "untimed": {  # where the seconds outside the clock went
            "startup": startup_seconds,  # processes, imports, build, warm-up
            "evaluation": evaluations.seconds,
            "other": wall_seconds - startup_seconds - train_seconds - evaluations.seconds,
        },
        "tokens_per_sec": tokens_per_sec,
        "cpu_usage": {"threads": threads, "trainer_cpu_seconds": cpu_seconds,
                      "beyond_threads_seconds": extra, "run_delay_seconds": waited,
                      "steal_seconds": stolen, "wait_policy": os.environ["OMP_WAIT_POLICY"],
                      "load_start": load_start[0], "load_end": os.getloadavg()[0]},
        "val_loss": final["val_loss"] if final else None,
        "val_bpb": final["val_bpb"] if final else None,
        "time_to_target": (interpolate_target(curve, args.target_loss)
                           if args.target_loss is not None else None),
        "mfu": mfu(flops, tokens_per_sec, gpu_name) if isinstance(flops, (int, float)) else None,
        "peak_memory_bytes": trainer.reported_peak_memory,  # as the trainer reports it
        "logits_via": logits_via,
        "telemetry": gpu_telemetry,
        "twins": evaluations.twins,
        "integrity": {"ok": not violations, "violations": violations},
        "checkpoint": str(args.checkpoint) if args.checkpoint and status == "ok" else None,
        "curve": curve,
    }
    code = {"ok": protocol.EXIT_OK, "diverged": protocol.EXIT_DIVERGED}.get(
        status, protocol.EXIT_INTEGRITY)
    return result, code


def timed_run(args: argparse.Namespace, preset, data: Data, trainer: Trainer,
              evaluate_now: Evaluations, shape) -> dict:
    """The timed region: a batch out and the next shape back per step, evaluations on the
    schedule (the same with or without a target), the final weights handed over."""
    budget = Budget(args.budget_tokens or (None if args.budget_seconds else preset.budget_tokens),
                    args.budget_seconds)
    max_loss = 3 * math.log(data.vocab)  # far above the initial ln(vocab): the run blew up
    pending = eval_points(preset.n_evals)
    clock, steps, tokens, status, point = Clock(), 0, 0, "ok", None
    if evaluate_now.violations:  # found before the clock (the restore check): nothing is timed
        status = "integrity-violation"
    clock.start()
    while status == "ok":
        progress = budget.progress(tokens, clock)
        if progress >= 1.0:
            break
        x, y = data.batch(shape)
        tokens += x.size
        steps += 1
        log = steps % args.log_every == 0 or steps == 1
        reply = trainer.step(x, y, progress, budget.progress(tokens, clock), log)
        shape = reply.get("shape")
        if log:
            loss = reply.get("loss")  # its word: it only ever ends its own run
            if not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss > max_loss:
                status = "diverged"
                print(f"diverged at step {steps}: train loss {loss}", flush=True)
                break
            elapsed = clock.elapsed()
            print(protocol.train_line(steps, tokens, loss, elapsed), flush=True)
        progress = budget.progress(tokens, clock)
        if pending and pending[0] <= progress < 1.0:
            while pending and pending[0] <= progress:
                pending.pop(0)
            point = evaluate_now(steps, tokens, clock)
            if evaluate_now.violations:
                status = "integrity-violation"
            elif point is None:
                status = "diverged"
            elif args.target_loss is None or point["val_loss"] > args.target_loss:
                clock.start()
                continue
            break
    if status == "ok" and (point is None or point["tokens"] != tokens):
        point = evaluate_now(steps, tokens, clock)  # the clock stops at the final weights
        if evaluate_now.violations:
            status = "integrity-violation"
        elif point is None:
            status = "diverged"
    clock.pause()
    return {"status": status, "steps": steps, "tokens": tokens,
            "train_seconds": clock.elapsed(), "budget_tokens": budget.tokens}


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds: the workers and the weights folder are removed


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
    code = main()
    # The result is out and the workers are gone: skip the interpreter's teardown of torch
    # (~0.35 s a run on a CPU), as nothing of this process is left to clean up.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
