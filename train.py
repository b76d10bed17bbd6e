"""The fixed timing harness: trains the research surface's recipe on a preset and measures it.

    python train.py --preset cpu-tiny [--budget-tokens N | --budget-seconds S]
                    [--target-loss L] [--seed S] [--out result.json]

The harness owns the clock, the data and the evaluation. The clock starts after an
untimed warmup (which compiles and fills caches; the model and optimizer state are then
restored, so no training progress leaks into the timed run), is CUDA-synchronised, and
is paused for every evaluation. The result JSON is written to --out and printed as the
last line of stdout. Nothing in model/ or kernels/ may change what is measured here.
"""

import argparse
import copy
import json
import math
import platform
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import kernels
from bench.curves import eval_points, interpolate_target
from bench.evaluator import causality_probe, evaluate
from bench.guards import fingerprint, fingerprint_change, restore_problems
from bench.hardware import mfu
from data.cache import DataMissingError, dataset_dir, load_meta
from data.loader import Loader, open_split, read_split_tokens
from data.shards import ShardError
from model import build_recipe

SCHEMA_VERSION = 1

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


class Clock:
    """Wall time of the timed region, synchronised with the GPU, pausable for evaluation."""

    def __init__(self, device: torch.device):
        self.device = device
        self.elapsed_before = 0.0
        self.started_at: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self.started_at = time.perf_counter()

    @property
    def running(self) -> bool:
        return self.started_at is not None

    def pause(self) -> None:
        if self.running:
            self._sync()
            self.elapsed_before += time.perf_counter() - self.started_at
            self.started_at = None

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


def warmup(recipe, loader: Loader, evaluate_fn, max_steps: int = 3) -> None:
    """Run the batch shapes the recipe will use, and one evaluation, outside the clock."""
    shapes = []
    for i in range(21):
        shape = recipe.batch_shape(i / 20)
        if shape not in shapes:
            shapes.append(shape)
    for step in range(max(max_steps, len(shapes))):
        x, y = loader.next_batch(*shapes[step % len(shapes)])
        recipe.train_step(x, y, min(1.0, step / max_steps))
    evaluate_fn()


def run(args: argparse.Namespace) -> tuple[dict, int]:
    setup = validate_args(args)
    preset, device, data_name, meta = setup.preset, setup.device, setup.data, setup.meta
    torch.manual_seed(args.seed)
    vocab_size = meta["vocab_size"]
    val_tokens = read_split_tokens(data_name, "val")[: preset.eval_tokens + 1]
    token_bytes = None
    if meta.get("token_bytes"):  # the byte table that bits per byte needs, when known
        token_bytes = np.load(dataset_dir(data_name) / meta["token_bytes"])

    backend, compile_model = setup.kernels, setup.compile
    kernels.set_backend(backend)
    recipe = build_recipe(args.preset, device, vocab_size, compile_model)

    violations: list[str] = []  # integrity violations found by the harness, with reasons
    integrity_seconds = 0.0  # what the checks below cost, outside the clock

    def run_eval():
        # Evaluation must not change the model (threat 5): eval mode, no_grad here in the
        # harness (not only in the evaluator), and a fingerprint of every parameter and
        # buffer before and after, compared exactly.
        nonlocal integrity_seconds
        t = time.perf_counter()
        before = fingerprint(recipe.model)
        integrity_seconds += time.perf_counter() - t
        recipe.model.eval()
        try:
            with torch.no_grad():
                return evaluate(
                    recipe.logits,
                    val_tokens,
                    preset.eval_seq_len,
                    preset.eval_batch_size,
                    vocab_size,
                    device,
                    token_bytes,
                )
        finally:
            recipe.model.train()
            t = time.perf_counter()
            change = fingerprint_change(before, fingerprint(recipe.model))
            integrity_seconds += time.perf_counter() - t
            if change is not None and change not in violations:
                violations.append(f"evaluation changed the model: {change}")

    # Untimed warmup on its own data stream, then back to the initial state.
    t0 = time.perf_counter()
    initial = snapshot(recipe)
    warmup(recipe, open_split(data_name, "train", args.seed + 10_000, device), run_eval)
    restore(recipe, initial)
    # The restored model and optimizers must be exactly the initial ones (threat 5: no
    # warmup progress kept by, say, an overridden load_state_dict).
    t = time.perf_counter()
    violations += [f"restore after warmup: {p}" for p in restore_problems(recipe, initial)[:5]]
    integrity_seconds += time.perf_counter() - t
    warmup_seconds = time.perf_counter() - t0
    torch.manual_seed(args.seed)
    loader = open_split(data_name, "train", args.seed, device)

    budget = Budget(
        args.budget_tokens or (None if args.budget_seconds else preset.budget_tokens),
        args.budget_seconds,
    )
    target = args.target_loss
    max_loss = 3 * math.log(vocab_size)  # far above the initial ln(vocab): the run blew up
    clock = Clock(device)
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
        try:
            ev = run_eval()
        except FloatingPointError:  # a NaN reached the evaluation before the loss check
            return None
        eval_seconds += time.perf_counter() - t
        point = dict(tokens=tokens, seconds=clock.elapsed(), val_loss=ev.loss, val_bpb=ev.bpb)
        curve.append(point)
        print(
            f"eval   step {steps:5d} | tokens {tokens:>11,} | val loss {ev.loss:.4f} | "
            f"train time {point['seconds']:.2f}s",
            flush=True,
        )
        if was_running:
            clock.start()
        return point

    clock.start()
    while status == "ok":
        progress = budget.progress(tokens, clock)
        if progress >= 1.0:
            break
        batch_size, seq_len = recipe.batch_shape(progress)
        x, y = loader.next_batch(batch_size, seq_len)
        loss = recipe.train_step(x, y, progress)
        steps += 1
        tokens += batch_size * seq_len
        if steps % args.log_every == 0 or steps == 1:
            value = loss.item()
            if not math.isfinite(value) or value > max_loss:
                status = "diverged"
                print(f"diverged at step {steps}: train loss {value}", flush=True)
                break
            elapsed = clock.elapsed()
            print(
                f"train  step {steps:5d} | tokens {tokens:>11,} | loss {value:.4f} | "
                f"{tokens / max(elapsed, 1e-9):,.0f} tok/s | {elapsed:.1f}s",
                flush=True,
            )
        progress = budget.progress(tokens, clock)
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

    probe = None
    if status == "ok":
        recipe.model.eval()
        with torch.no_grad():
            probe = causality_probe(
                recipe.logits,
                vocab_size,
                preset.eval_seq_len,
                device,
                torch.Generator().manual_seed(secrets.randbits(63)),  # fresh probe every run
            )
        recipe.model.train()
        if not probe.causal:
            status = "integrity-violation"
            violations.append(
                f"causality probe: a change after position {probe.position} moved an earlier "
                f"log-probability by {probe.max_change:.3g} (tolerance {probe.tolerance:.3g})"
            )

    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    tokens_per_sec = tokens / train_seconds if train_seconds > 0 else 0.0
    result = {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "preset": args.preset,
        "seed": args.seed,
        "device": device.type,
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
        "causality": None if probe is None else probe.__dict__,
        "integrity": {
            "ok": not violations,
            "violations": violations,
            "seconds": integrity_seconds,  # what the harness's checks cost, outside the clock
        },
        "curve": curve,
    }
    code = {"ok": EXIT_OK, "diverged": EXIT_DIVERGED}.get(status, EXIT_INTEGRITY)
    return result, code


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result, code = run(args)
    except (UsageError, DataMissingError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    line = json.dumps(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(line, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
