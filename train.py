"""The fixed timing harness: trains the research surface's recipe on a preset and measures it.

    python train.py --preset cpu-tiny [--budget-tokens N | --budget-seconds S]
                    [--target-loss L] [--seed S] [--out result.json]

Under `torchrun --nproc_per_node=K train.py ...` each rank trains on its own
batch_size / K rows of every batch (DistributedDataParallel averages the gradients, so
a step's math does not depend on K); the clock, the evaluation and the result are rank
0's, and every decision to stop is rank 0's, broadcast.

The harness owns the clock, the data and the evaluation. The clock starts after an
untimed warmup (which compiles and fills caches; the model and optimizer state are then
restored, so no training progress leaks into the timed run), is CUDA-synchronised, and
is paused for every evaluation. Evaluation happens in a separate process
(bench/eval_worker.py) from checkpoints: this process never reads the validation data.
The clock's start and pauses are printed as they happen (`clock start`, `clock pause`),
so the runner can time the timed region from its side. The result JSON is written to
--out and printed as the last line of stdout. Nothing in model/ or kernels/ may change
what is measured here.
"""

import argparse
import copy
import json
import math
import os
import platform
import secrets
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import kernels
from bench.curves import eval_points, interpolate_target
from bench.eval_worker import EvalProcess
from bench.guards import fingerprint, fingerprint_change, restore_problems
from bench.hardware import mfu
from bench.kernel_check import check_kernels
from data.cache import DataMissingError, load_meta
from data.loader import Loader, open_split
from data.shards import ShardError
from model import build_recipe

SCHEMA_VERSION = 2  # 2: clock lines, evaluator process, checkpoint

EXIT_OK, EXIT_CRASH, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTEGRITY = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class Preset:
    device: str  # where it runs: "cpu" or "cuda"
    data: str  # default dataset (a name under the data cache)
    budget_tokens: int  # default budget; also the schedule's horizon under --target-loss
    eval_tokens: int  # validation tokens per evaluation (a fixed prefix of the val split)
    eval_seq_len: int
    eval_batch_size: int
    n_evals: int  # the curve's resolution: see bench/curves.py eval_points
    target_loss: float | None  # the preset's default target for time-to-loss


PRESETS = {
    "cpu-tiny": Preset("cpu", "embedded", 180_224, 16_384, 128, 64, 4, None),
    "gpu-small": Preset("cuda", "fineweb", 200_000_000, 2_097_152, 1024, 32, 20, None),
    "gpt2-124m": Preset("cuda", "fineweb", 4_000_000_000, 10_485_760, 1024, 32, 16, 3.28),
}


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, *args) -> None:
        """Progress lines come from rank 0 only: one run, one log."""
        if self.main:
            print(*args, flush=True)

    def from_main(self, value, device: torch.device):
        """Rank 0's value (a picklable object) on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
        return box[0]

    def gather(self, items: list[str], device: torch.device) -> list[str]:
        """Every rank's items, on every rank, each named by its rank when K > 1."""
        if self.world == 1:
            return items
        out = [None] * self.world
        dist.all_gather_object(out, items)
        return [f"{v} (rank {r})" if r else v for r, vs in enumerate(out) for v in vs]

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)  # a sum: gloo has no average
            t /= self.world
        return t


def init_ranks(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the torchrun job, if there is one; each rank gets its own GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), device
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(rank, world), device


class Clock:
    """Wall time of the timed region, synchronised with the GPU, pausable for evaluation.

    With announce, every start and pause is printed at once, so that the process that
    runs the harness can time the same region with its own clock (threat 4)."""

    def __init__(self, device: torch.device, announce: bool = False):
        self.device = device
        self.announce = announce
        self.elapsed_before = 0.0
        self.started_at: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        if self.announce:
            print(f"clock start | timed {self.elapsed_before:.6f}s", flush=True)
        self.started_at = time.perf_counter()

    @property
    def running(self) -> bool:
        return self.started_at is not None

    def pause(self) -> None:
        if self.running:
            self._sync()
            self.elapsed_before += time.perf_counter() - self.started_at
            self.started_at = None
            if self.announce:
                print(f"clock pause | timed {self.elapsed_before:.6f}s", flush=True)

    def elapsed(self, sync: bool = True) -> float:
        """Timed seconds so far; sync=False reads the host clock without waiting for the GPU
        (for the budget check every step, where a sync would idle the GPU)."""
        if self.started_at is None:
            return self.elapsed_before
        if sync:
            self._sync()
        return self.elapsed_before + time.perf_counter() - self.started_at


class Budget:
    """Progress in [0, 1] through the run, in tokens or in seconds."""

    def __init__(self, tokens: int | None, seconds: float | None):
        self.tokens, self.seconds = tokens, seconds

    def progress(self, tokens: int, clock: Clock) -> float:
        if self.seconds is not None:
            # The host runs at most a few steps ahead of the GPU; the final train_seconds is
            # synchronised, so a time budget overshoots by at most those steps.
            return clock.elapsed(sync=False) / self.seconds
        return tokens / self.tokens


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-tokens", type=int, help="train for this many tokens")
    budget.add_argument("--budget-seconds", type=float, help="train for this many timed seconds")
    p.add_argument(
        "--target-loss",
        type=float,
        help="stop when val loss reaches this; report the time it took (time-to-target)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the model init and data order")
    p.add_argument("--out", type=Path, help="write the result JSON here (also printed last)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="save the final model's weights here (for the held-out check at acceptance)",
    )
    add_setup_arguments(p)
    p.add_argument("--log-every", type=int, default=10, help="print a progress line every N steps")
    return p.parse_args(argv)


def add_setup_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that resolve_setup takes, for train.py and the tools that must build the
    surface exactly as it does (bench/profile.py)."""
    p.add_argument("--data", help="dataset name in the data cache (default: the preset's)")
    p.add_argument("--device", help="cpu or cuda (default: the preset's)")
    p.add_argument(
        "--kernels", default="auto", help="kernel backend: auto (triton on CUDA), torch, triton"
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model (default: on for CUDA, off for CPU)",
    )


@dataclass
class Setup:
    """What a run is: the preset, the device, the data and the kernels, all checked."""

    name: str
    preset: Preset
    device: torch.device
    data: str
    meta: dict  # the dataset's meta.json
    kernels: str  # the backend that runs: torch or triton
    compile: bool


def resolve_setup(
    preset: str,
    device: str | None = None,
    data: str | None = None,
    kernel_backend: str = "auto",
    compile: bool | None = None,
) -> Setup:
    """Check a run's settings; UsageError (or DataMissingError) names what is wrong.

    Shared with bench/profile.py, so a profile is made of exactly what train.py times.
    """
    if preset not in PRESETS:
        raise UsageError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    config = PRESETS[preset]
    try:
        dev = torch.device(device or config.device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"preset '{preset}' runs on CUDA but no CUDA GPU is visible; "
            "use --preset cpu-tiny, or --device cpu to force it onto the CPU"
        )
    data_name = data or config.data
    try:
        meta = load_meta(data_name)
        backend = kernels.resolve(kernel_backend, dev.type)
    except (ValueError, RuntimeError) as e:  # a bad dataset name, a backend that cannot run
        raise UsageError(str(e)) from None
    compile_model = dev.type == "cuda" if compile is None else compile
    return Setup(preset, config, dev, data_name, meta, backend, compile_model)


def validate_args(args: argparse.Namespace) -> Setup:
    for flag in ("budget_tokens", "budget_seconds"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    return resolve_setup(args.preset, args.device, args.data, args.kernels, args.compile)


def snapshot(recipe) -> tuple[dict, list[dict]]:
    model_state = {k: v.detach().clone() for k, v in recipe.model.state_dict().items()}
    opt_states = [copy.deepcopy(opt.state_dict()) for opt in recipe.optimizers]
    return model_state, opt_states


def restore(recipe, state: tuple[dict, list[dict]]) -> None:
    model_state, opt_states = state
    recipe.model.load_state_dict(model_state)
    for opt, opt_state in zip(recipe.optimizers, opt_states):
        opt.load_state_dict(copy.deepcopy(opt_state))  # replaces the state wholesale


def rank_rows(batch_size: int, ranks: Ranks) -> int:
    """This rank's rows of a batch of batch_size sequences."""
    if batch_size % ranks.world:
        raise UsageError(
            f"the recipe's batch of {batch_size} sequences does not split over "
            f"{ranks.world} processes: use a process count that divides it"
        )
    return batch_size // ranks.world


def warmup(recipe, loader: Loader, evaluate_fn, ranks: Ranks = Ranks(), max_steps: int = 3) -> None:
    """Run the batch shapes the recipe will use, and one evaluation, outside the clock."""
    shapes = []
    for i in range(21):
        shape = recipe.batch_shape(i / 20)
        if shape not in shapes:
            shapes.append(shape)
    for step in range(max(max_steps, len(shapes))):
        batch_size, seq_len = shapes[step % len(shapes)]
        x, y = loader.next_batch(rank_rows(batch_size, ranks), seq_len)
        recipe.train_step(x, y, min(1.0, step / max_steps))
    evaluate_fn()


def run(args: argparse.Namespace) -> tuple[dict | None, int]:
    """Train and measure; the result is rank 0's (None on the other ranks)."""
    setup = validate_args(args)
    ranks, device = init_ranks(setup.device)
    setup.device = device
    # The evaluator process starts first: it imports and reads its data while this process
    # builds the model and warms up, and it is ready before the clock starts.
    evaluator = None
    if ranks.main:
        evaluator = EvalProcess(args.preset, setup.data, device, setup.kernels)
    try:
        return _run(args, setup, ranks, evaluator)
    finally:
        if evaluator is not None:
            evaluator.close()
        if ranks.world > 1:
            dist.destroy_process_group()


def _run(
    args: argparse.Namespace, setup: Setup, ranks: Ranks, evaluator: EvalProcess | None
) -> tuple[dict | None, int]:
    preset, device, data_name, meta = setup.preset, setup.device, setup.data, setup.meta
    backend, compile_model = setup.kernels, setup.compile
    torch.manual_seed(args.seed)
    vocab_size = meta["vocab_size"]
    kernels.set_backend(backend)
    recipe = build_recipe(args.preset, device, vocab_size, compile_model)
    checkpoint_meta = {"preset": args.preset, "data": data_name, "seed": args.seed}

    # Integrity violations found by the harness, each "check-id: reason" (bench/INTEGRITY.md).
    violations: list[str] = []
    integrity_seconds = 0.0  # what the checks below cost, outside the clock

    def run_eval() -> dict:
        # The evaluator process scores a checkpoint; this process never sees validation
        # data. The model must not change meanwhile (threat 5: no work hidden in the pause).
        # Rank 0 evaluates; the others wait for its answer.
        nonlocal integrity_seconds
        if not ranks.main:
            return ranks.from_main(None, device)
        t = time.perf_counter()
        before = fingerprint(recipe.model)
        integrity_seconds += time.perf_counter() - t
        evaluator.save(recipe.model, checkpoint_meta)
        reply = evaluator.ask({})
        t = time.perf_counter()
        change = fingerprint_change(before, fingerprint(recipe.model))
        integrity_seconds += time.perf_counter() - t
        found = reply.get("violations", []) + ([] if change is None else [change])
        found = [v if v.startswith("eval-unchanged: ") else f"eval-unchanged: {v}" for v in found]
        if found and not any(known.startswith("eval-unchanged") for known in violations):
            violations.append(found[0])
        # Every rank gets the violations with the reply, so all of them stop at this step.
        return ranks.from_main({**reply, "violations": found[:1]}, device)

    # Untimed warmup on its own data stream, then back to the initial state.
    t0 = time.perf_counter()
    initial = snapshot(recipe)
    warmup_loader = open_split(
        data_name, "train", args.seed + 10_000, device, ranks.rank, ranks.world
    )
    warmup(recipe, warmup_loader, run_eval, ranks)
    restore(recipe, initial)
    # The restored model and optimizers must be exactly the initial ones (threat 5: no
    # warmup progress kept by, say, an overridden load_state_dict).
    t = time.perf_counter()
    violations += [f"restore: {p}" for p in restore_problems(recipe, initial)[:5]]
    # The kernels' entry points against their fixed definitions on fresh inputs (threat 6).
    interpreted = device.type == "cpu" and backend == "triton"  # ~1 ms a program: small only
    g = torch.Generator().manual_seed(secrets.randbits(63))
    violations += check_kernels(kernels, device, g, full=not interpreted)[:5]
    violations = ranks.gather(violations, device)
    integrity_seconds += time.perf_counter() - t
    if evaluator is not None:
        evaluator.wait_ready()
    warmup_seconds = time.perf_counter() - t0
    torch.manual_seed(args.seed)
    loader = open_split(data_name, "train", args.seed, device, ranks.rank, ranks.world)

    budget = Budget(
        args.budget_tokens or (None if args.budget_seconds else preset.budget_tokens),
        args.budget_seconds,
    )
    target = args.target_loss
    max_loss = 3 * math.log(vocab_size)  # far above the initial ln(vocab): the run blew up
    clock = Clock(device, announce=ranks.main)
    curve: list[dict] = []
    status, steps, tokens, eval_seconds = "ok", 0, 0, 0.0
    if violations:  # found before the clock started: nothing is timed
        status = "integrity-violation"
    pending_evals = eval_points(preset.n_evals)  # the same with or without a target
    time_to_target = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def record_eval() -> dict | None:
        nonlocal eval_seconds
        was_running = clock.running
        clock.pause()
        t = time.perf_counter()
        reply = run_eval()
        eval_seconds += time.perf_counter() - t
        if reply.get("violations") and not ranks.main:
            violations.extend(reply["violations"])  # the same decision on every rank
        if reply.get("non_finite") or "loss" not in reply:  # a NaN, or a violation
            return None
        point = dict(
            tokens=tokens, seconds=clock.elapsed(), val_loss=reply["loss"], val_bpb=reply["bpb"]
        )
        curve.append(point)
        ranks.say(
            f"eval   step {steps:5d} | tokens {tokens:>11,} | val loss {point['val_loss']:.4f} | "
            f"train time {point['seconds']:.2f}s"
        )
        if was_running:
            clock.start()
        return point

    if status == "ok":
        clock.start()

    def progress_now() -> float:
        if budget.seconds is None or ranks.world == 1:
            return budget.progress(tokens, clock)
        # A time budget ends on rank 0's clock: every rank must stop at the same step.
        return ranks.from_main(budget.progress(tokens, clock), device)

    while status == "ok":
        progress = progress_now()
        if progress >= 1.0:
            break
        batch_size, seq_len = recipe.batch_shape(progress)
        x, y = loader.next_batch(rank_rows(batch_size, ranks), seq_len)
        loss = recipe.train_step(x, y, progress)
        steps += 1
        tokens += batch_size * seq_len
        if steps % args.log_every == 0 or steps == 1:
            value = ranks.mean(loss).item()
            if not math.isfinite(value) or value > max_loss:
                status = "diverged"
                ranks.say(f"diverged at step {steps}: train loss {value}")
                break
            elapsed = clock.elapsed()
            ranks.say(
                f"train  step {steps:5d} | tokens {tokens:>11,} | loss {value:.4f} | "
                f"{tokens / max(elapsed, 1e-9):,.0f} tok/s | {elapsed:.1f}s"
            )
        progress = progress_now()
        if pending_evals and pending_evals[0] <= progress < 1.0:
            while pending_evals and pending_evals[0] <= progress:
                pending_evals.pop(0)
            point = record_eval()
            if violations:
                status = "integrity-violation"
                break
            if point is None:
                status = "diverged"
                break
            if target is not None and point["val_loss"] <= target:
                break
    clock.pause()
    train_seconds = clock.elapsed()

    if status == "ok" and (not curve or curve[-1]["tokens"] != tokens):
        if record_eval() is None:
            status = "diverged"
        if violations:
            status = "integrity-violation"
    final = curve[-1] if curve else None
    if target is not None:
        time_to_target = interpolate_target(curve, target)

    if not ranks.main:  # rank 0 probes, reports and decides the exit code
        return None, ranks.from_main(None, device)
    probe = None
    if status == "ok":
        # The probes run in the evaluator process on the final weights, which are still in
        # its checkpoint; fresh positions, tokens and rows every run.
        t = time.perf_counter()
        probe = evaluator.ask({"probe": True})
        integrity_seconds += time.perf_counter() - t
        if probe["violations"]:
            status = "integrity-violation"
            violations += probe["violations"]
        elif args.checkpoint:
            args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(evaluator.checkpoint, args.checkpoint)

    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    tokens_per_sec = tokens / train_seconds if train_seconds > 0 else 0.0
    result = {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "preset": args.preset,
        "seed": args.seed,
        "device": device.type,
        "world_size": ranks.world,
        "gpu_name": gpu_name,
        "cpu": platform.processor() or platform.machine(),
        "torch_version": torch.__version__,
        "triton_version": _triton_version(),
        "python_version": platform.python_version(),
        "kernels": backend,
        "compile": compile_model,
        "data": data_name,
        "data_fingerprint": meta["fingerprint"],
        "n_params": sum(p.numel() for p in recipe.model.parameters()),
        "flops_per_token": recipe.flops_per_token(),
        "budget_tokens": budget.tokens,
        "budget_seconds": budget.seconds,
        "target_loss": target,
        "tokens": tokens,
        "steps": steps,
        "train_seconds": train_seconds,
        "warmup_seconds": warmup_seconds,
        "eval_seconds": eval_seconds,
        "tokens_per_sec": tokens_per_sec,
        "val_loss": final["val_loss"] if final else None,
        "val_bpb": final["val_bpb"] if final else None,
        "time_to_target": time_to_target,
        "mfu": mfu(recipe.flops_per_token(), tokens_per_sec, gpu_name),
        "peak_memory_bytes": _peak_memory(device),
        "causality": None if probe is None else probe.get("probes"),
        "integrity": {
            "ok": not violations,
            "violations": violations,
            "seconds": integrity_seconds,  # what the harness's checks cost, outside the clock
        },
        "checkpoint": str(args.checkpoint) if args.checkpoint and status == "ok" else None,
        "curve": curve,
    }
    code = {"ok": EXIT_OK, "diverged": EXIT_DIVERGED}.get(status, EXIT_INTEGRITY)
    return result, ranks.from_main(code, device)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _peak_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    except ImportError:
        return None


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds: the evaluator process and its files are closed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)  # the runner's timeout and early stop
    try:
        result, code = run(args)
    except (UsageError, DataMissingError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if result is None:  # not rank 0: exit 0 whatever rank 0's code, for torchrun would
        return EXIT_OK  # end rank 0 at the first non-zero exit, before it reports
    line = json.dumps(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(line, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
