"""A profile of the champion: where a train step spends its time, as compact text for the LLM.

    python -m bench.profile --preset P [--steps N] [--data NAME] [--device cpu|cuda]
                            [--kernels auto|torch|triton] [--[no-]compile] [--out PATH]

Run from a worktree root: it profiles that worktree's model/ and kernels/. The surface is
candidate code, so this command checks its arguments and then runs itself again inside the
sandbox (bench/sandbox.py; `--no-sandbox` to skip), where the surface is built as the
sandboxed trainer builds it (bench/worker.py), warmed up on random tokens, and N train
steps on random tokens run under torch.profiler (CPU activity always, CUDA activity on a
GPU); the tokens' values do not change where the time goes. The report names the preset, the device,
the kernel backend and the tokens per step, then lists the top operations by self device
time (CUDA time on a GPU, with a second table of the top kernels; CPU time on the CPU).
It stays under MAX_CHARS characters, because it goes into the LLM's prompt
(agent/context.py). The text goes to stdout and, with --out, to a file.

What this must never do: affect a timed result. It runs in its own process, measures
nothing that the judge uses, writes nothing of its own but --out (from the trusted side),
and its sandboxed part sees neither the ledger, nor the data cache, nor a writable file.
Its numbers carry the profiler's overhead: they show where time goes and are never a speed
measurement. Exit codes: 0 ok, 2 bad input
or missing data (the message says how to prepare it), 1 anything else (a surface crash).
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

from bench.presets import PRESETS, UsageError, add_setup_arguments, resolve_setup
from bench.sandbox import Sandbox, SandboxError, available
from data.cache import DataMissingError

MAX_CHARS = 3_000  # the whole report: it goes into an LLM prompt
TOP_OPS = 15  # rows of the operations table (fewer when the text would be too long)
TOP_KERNELS = 10  # rows of the kernels table (CUDA only)
NAME_CHARS = 56
SEED = 0

EXIT_OK, EXIT_USAGE = 0, 2
REPO = Path(__file__).resolve().parent.parent


def _self_us(evt, device: bool) -> float:
    """Self time of a profiler event (or average) in microseconds, across torch versions."""
    names = (
        ("self_device_time_total", "self_cuda_time_total") if device else ("self_cpu_time_total",)
    )
    for name in names:
        value = getattr(evt, name, None)
        if value is not None:
            return float(value)
    return 0.0


def _is_annotation(evt) -> bool:
    key = str(getattr(evt, "key", ""))
    return bool(getattr(evt, "is_user_annotation", False)) or key.startswith("ProfilerStep")


def _on_device(evt) -> bool:
    """A kernel, memcpy or memset on the GPU (not a CPU-side operation)."""
    return getattr(evt, "device_type", DeviceType.CPU) != DeviceType.CPU


_NOISE = re.compile(r"(?<![\w:])(?:at::native::|at::|c10::|std::|\(anonymous namespace\)::)+")


def _short(name: str) -> str:
    """A name that fits its column: no C++ argument list or common namespaces, elided in
    the middle (the start says what it is, the end which variant) when still too long."""
    name = " ".join(name.split())
    name = name.removeprefix("void ").replace("autograd::engine::evaluate_function: ", "autograd: ")
    if name.endswith(")"):  # `kernel<...>(float*, int, ...)`, not `Memcpy HtoD (...)`
        depth = 0
        for i in range(len(name) - 1, 0, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                if name[i - 1] != " ":
                    name = name[:i]
                break
    name = _NOISE.sub("", name)
    if len(name) <= NAME_CHARS:
        return name
    head = (NAME_CHARS - 1) * 2 // 3
    return name[:head] + "…" + name[len(name) - (NAME_CHARS - 1 - head) :]


def _table(title: str, rows: list[tuple[str, int, float]], total_us: float) -> list[str]:
    lines = [title, f"{'name':<{NAME_CHARS}} {'calls':>6} {'total ms':>9} {'%':>5}"]
    for name, calls, us in rows:
        pct = 100 * us / total_us if total_us > 0 else 0.0
        lines.append(f"{_short(name):<{NAME_CHARS}} {calls:>6} {us / 1e3:>9.2f} {pct:>5.1f}")
    return lines


def _rank(events, device: bool, on_device: bool) -> list[tuple[str, int, float]]:
    rows = [
        (str(e.key), int(e.count), _self_us(e, device))
        for e in events
        if not _is_annotation(e) and _on_device(e) == on_device
    ]
    return sorted((r for r in rows if r[2] > 0), key=lambda r: r[2], reverse=True)


def _report(header: list[str], sections: list[tuple[str, list, float, int]]) -> str:
    """Header plus tables, with rows dropped from the longest table until it fits."""
    limits = [limit for *_, limit in sections]
    while True:
        lines = list(header)
        for (title, rows, total, _), limit in zip(sections, limits):
            lines += [""] + _table(title, rows[:limit], total)
        text = "\n".join(lines) + "\n"
        if len(text) <= MAX_CHARS or max(limits) <= 3:
            return text
        limits[limits.index(max(limits))] -= 1


def profile_text(preset: str, device: str, vocab: int, kernels: str = "auto",
                 compile: bool = False, steps: int = 5) -> str:
    """Profile `steps` train steps of the current directory's surface; the report as text.
    Imports the surface: the sandboxed side of `main`, never the trusted one."""
    import kernels as surface_kernels
    from bench.worker import warmup
    from model import build_recipe

    dev = torch.device(device)
    backend = surface_kernels.resolve(kernels, dev.type)
    with surface_kernels.use(backend):  # restores the previous backend after
        torch.manual_seed(SEED)
        recipe = build_recipe(preset, dev, vocab, compile)
        warmup(recipe, vocab, dev, world=1)  # untimed: compiles, fills caches
        g = torch.Generator().manual_seed(SEED)
        shapes = [recipe.batch_shape((i + 0.5) / steps) for i in range(steps)]
        batches = []
        for batch_size, seq_len in shapes:
            tokens = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g).to(dev)
            batches.append((tokens[:, :-1], tokens[:, 1:]))
        cuda = dev.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(dev)
        with torch.profiler.profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for i, (x, y) in enumerate(batches):
                recipe.train_step(x, y, (i + 0.5) / steps)
            if cuda:
                torch.cuda.synchronize(dev)
            wall = time.perf_counter() - t0
    if cuda:
        where = f"cuda: {torch.cuda.get_device_name(dev)}"
    else:
        where = f"cpu: {platform.processor() or platform.machine()}, "
        where += f"{torch.get_num_threads()} threads"
    setup = f"device {where} | kernels {backend} | torch.compile "
    setup += f"{'on' if compile else 'off'} | torch {torch.__version__}"
    return format_report(prof.key_averages(), preset, setup, "random tokens", shapes, wall, cuda)


def format_report(
    events, preset: str, setup: str, data: str, shapes: list, wall: float, cuda: bool
) -> str:
    """The report from the profiler's key_averages() over len(shapes) steps of wall seconds.

    setup is the line that names device, kernels and compile; shapes the (batch, seq) of
    each profiled step. On CUDA the tables rank by device time, else by CPU time.
    """
    steps = len(shapes)
    tokens = [b * t for b, t in shapes]
    if len(set(shapes)) == 1:
        per_step = f"{tokens[0]:,} (batch {shapes[0][0]} x seq {shapes[0][1]})"
    else:
        kinds = ", ".join(f"{b}x{t}" for b, t in dict.fromkeys(shapes))
        per_step = f"{sum(tokens) // steps:,} on average (batch x seq: {kinds})"
    cpu_total = sum(_self_us(e, False) for e in events if not _is_annotation(e))
    header = [
        f"Profile of the champion: preset {preset}, {steps} train steps after an untimed "
        "warmup (torch.profiler; times include its overhead)",
        setup,
        f"data {data} | tokens per step {per_step}",
        f"wall time per step {1e3 * wall / steps:.1f} ms | "
        f"self CPU time per step {cpu_total / 1e3 / steps:.1f} ms",
    ]
    if cuda:
        kernel_rows = _rank(events, device=True, on_device=True)
        gpu_total = sum(us for *_, us in kernel_rows)
        busy = 100 * gpu_total / 1e6 / wall if wall > 0 else 0.0
        header.append(
            f"GPU busy per step {gpu_total / 1e3 / steps:.1f} ms ({busy:.0f}% of wall time; "
            "well under 100% means launch- or host-bound)"
        )
        sections = [
            (
                f"Top operations by self CUDA time (over all {steps} steps):",
                _rank(events, device=True, on_device=False),
                gpu_total,
                TOP_OPS,
            ),
            ("Top GPU kernels by CUDA time:", kernel_rows, gpu_total, TOP_KERNELS),
        ]
    else:
        sections = [
            (
                f"Top operations by self CPU time (over all {steps} steps):",
                _rank(events, device=False, on_device=False),
                cpu_total,
                TOP_OPS,
            )
        ]
    return _report(header, sections)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--steps", type=int, default=5, help="profiled train steps (default 5)")
    add_setup_arguments(p)  # the run's settings, checked as train.py checks them
    p.add_argument("--out", type=Path, help="also write the report here")
    p.add_argument("--timeout", type=float, default=900, help="seconds for the sandboxed part")
    p.add_argument("--no-sandbox", action="store_true", help="run the surface unconfined")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.inside:  # the sandboxed part: build the surface and profile it
        print(profile_text(args.preset, args.device, args.vocab, args.kernels,
                           bool(args.compile), args.steps), end="", flush=True)
        return EXIT_OK
    try:
        if args.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {args.steps}")
        setup = resolve_setup(args.preset, args.device, args.data, args.kernels, args.compile)
        sandbox = Sandbox(None) if args.no_sandbox else available()
    except (UsageError, DataMissingError, SandboxError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    inner = [sys.executable, "-m", "bench.profile", "--inside", "--preset", args.preset,
             "--device", setup.device.type, "--vocab", str(setup.meta["vocab_size"]),
             "--kernels", setup.kernels, "--steps", str(args.steps),
             "--compile" if setup.compile else "--no-compile"]
    proc = sandbox.popen(inner, REPO, gpu=setup.device.type == "cuda", text=True)
    try:
        text, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        print(f"error: the profile took over {args.timeout:g} s", file=sys.stderr)
        return 1
    if proc.returncode != 0:
        print(err, end="", file=sys.stderr)
        return 1
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text, end="", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
