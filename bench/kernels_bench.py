"""Kernel benchmarks: each Triton kernel against its torch reference and `torch.compile` of
that reference, forward and forward+backward, at the shapes a preset's model trains on.

    python -m bench.kernels_bench [--preset gpu-small] [--json PATH] [--compare [NUM]]

runs the pytest-benchmark suite tests/bench_kernels.py (also `make bench`; `make
bench-compare` compares with the last saved run). Every run is saved under bench/results/
(pytest-benchmark's autosave: one JSON per run, with the GPU's name and the torch and
triton versions in its machine_info); --json writes one more copy there.

This module holds what the suite measures: the cases (inputs, the bytes a pass must move
at the least, the FLOPs of a matmul) and the timed step. Memory-bound ops report GB/s of
those bytes (the same count for the three implementations, so GB/s compare like time
does), matmuls TFLOP/s; X @ X.T counts the full product (2*M*M*K), so computing one
triangle shows as a higher rate.

Timing on CUDA: pytest-benchmark times the host with perf_counter, and a launch returns
before the GPU is done, so each timed call ends with torch.cuda.synchronize(). The suite
runs in pedantic mode with an untimed setup before every round that drops the inputs'
gradients, evicts the L2 cache (writing 256 MiB, as triton's do_bench does, so inputs come
from HBM as they do in training) and synchronises, so a round starts on an idle GPU and
times its own work only. A round thus includes one launch latency and one sync (~10 us).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

import kernels
from kernels import dispatch

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "tests" / "bench_kernels.py"
STORAGE = ROOT / "bench" / "results"
IMPLS = ("triton", "eager", "compile")
GPT2_VOCAB = 50304  # GPT-2's 50257 tokens padded to a multiple of 64, as the model pads
NO_PLUGIN = ("pytest-benchmark is not installed: the kernel benchmarks are skipped "
             "(pip install pytest-benchmark==5.3.1, or carry its wheel)")


@dataclass(frozen=True)
class Shapes:
    """The sizes one micro-batch of a preset's model gives each op."""

    batch: int  # sequences per forward/backward
    seq_len: int
    dim: int  # n_embd
    heads: int
    hidden: int  # the MLP's width
    vocab: int
    layers: int  # Muon orthogonalises each shape for all layers at once

    @property
    def rows(self) -> int:
        return self.batch * self.seq_len

    @property
    def label(self) -> str:
        return f"B{self.batch}xT{self.seq_len} d{self.dim} V{self.vocab}"


# The tiny shapes of the CPU subset (Triton's interpreter takes ~1 ms per program).
TINY = Shapes(batch=2, seq_len=8, dim=32, heads=2, hidden=64, vocab=96, layers=2)


def preset_shapes(preset: str) -> Shapes:
    """The shapes of `preset`'s model (model/recipe.py), with the GPT-2 vocabulary on GPU
    presets (FineWeb) and the embedded corpus's 4096 on cpu-tiny."""
    from model.recipe import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    hp = PRESETS[preset]
    m = hp.model
    vocab = 4096 if preset == "cpu-tiny" else GPT2_VOCAB
    return Shapes(hp.micro_batch_size, hp.seq_len, m.n_embd, m.n_head, m.mlp_ratio * m.n_embd,
                  vocab, m.n_layer)


@dataclass(frozen=True)
class Case:
    op: str  # the kernel's name in kernels/
    shape: str
    make_inputs: Callable[[torch.device, torch.dtype], tuple]  # fresh inputs
    kernel: Callable  # the functional entry, routed by kernels.dispatch
    reference: Callable  # its pure-torch reference
    fwd: float  # bytes (memory-bound ops) or FLOPs (matmuls) of the forward
    fwd_bwd: float | None  # the same for forward+backward; None: forward only
    unit: str = "GB/s"  # or "TFLOP/s"

    @property
    def passes(self) -> tuple[str, ...]:
        return ("fwd",) if self.fwd_bwd is None else ("fwd", "fwd+bwd")

    def amount(self, which: str) -> float:
        return self.fwd if which == "fwd" else self.fwd_bwd


def _randn(device, dtype, *shape, grad=True, scale=1.0):
    x = torch.randn(shape, device=device) * scale
    return x.to(dtype).requires_grad_(grad)


def _rms_norm_inputs(rows, dim, device, dtype):
    return _randn(device, dtype, rows, dim), _randn(device, dtype, dim)


def _rotary_inputs(batch, seq_len, heads, head_dim, device, dtype):
    angles = torch.rand(seq_len, head_dim // 2, device=device) * 6.3
    return _randn(device, dtype, batch, seq_len, heads, head_dim), angles.cos(), angles.sin()


def _relu_squared_inputs(rows, dim, device, dtype):
    return (_randn(device, dtype, rows, dim),)


def _cross_entropy_inputs(rows, vocab, softcap, device, dtype):
    targets = torch.randint(0, vocab, (rows,), device=device)
    return _randn(device, dtype, rows, vocab, scale=3.0), targets, softcap


def _linear_cross_entropy_inputs(rows, dim, vocab, device, dtype):
    targets = torch.randint(0, vocab, (rows,), device=device)
    weight = _randn(device, dtype, vocab, dim, scale=dim**-0.5)
    return _randn(device, dtype, rows, dim), weight, targets, 15.0


def _xxt_inputs(layers, m, k, device, dtype):
    return (_randn(device, dtype, layers, m, k, grad=False),)


def cases(s: Shapes, itemsize: int = 2) -> list[Case]:
    """One case per op (two for cross_entropy: with and without the soft-cap) at shapes
    `s`; inputs are made when a case runs. `itemsize`: bytes per element (bf16: 2)."""
    e, rows, d = itemsize, s.rows, s.dim
    nd, nh, nv = rows * d, rows * s.hidden, rows * s.vocab
    head_dim = d // s.heads
    logits_flops = 2 * rows * s.vocab * d  # the backward has two more such matmuls
    return [
        Case("rms_norm", f"{rows}x{d}", partial(_rms_norm_inputs, rows, d),
             kernels.rms_norm, kernels.rms_norm_reference, fwd=2 * nd * e, fwd_bwd=5 * nd * e),
        Case("apply_rotary", f"{s.batch}x{s.seq_len}x{s.heads}x{head_dim}",
             partial(_rotary_inputs, s.batch, s.seq_len, s.heads, head_dim),
             kernels.apply_rotary, kernels.apply_rotary_reference,
             fwd=2 * nd * e, fwd_bwd=4 * nd * e),
        Case("relu_squared", f"{rows}x{s.hidden}", partial(_relu_squared_inputs, rows, s.hidden),
             kernels.relu_squared, kernels.relu_squared_reference,
             fwd=2 * nh * e, fwd_bwd=5 * nh * e),
        *(Case("cross_entropy", f"{rows}x{s.vocab} cap={cap}",
               partial(_cross_entropy_inputs, rows, s.vocab, cap),
               kernels.cross_entropy, kernels.cross_entropy_reference,
               fwd=nv * e, fwd_bwd=3 * nv * e) for cap in (None, 15.0)),
        Case("linear_cross_entropy", f"{rows}x{d} V={s.vocab} cap=15",
             partial(_linear_cross_entropy_inputs, rows, d, s.vocab),
             kernels.linear_cross_entropy, kernels.linear_cross_entropy_reference,
             fwd=logits_flops, fwd_bwd=3 * logits_flops, unit="TFLOP/s"),
        # Muon's largest batched shape: each layer's MLP matrix, rows <= columns.
        Case("xxt", f"{s.layers}x{d}x{s.hidden}", partial(_xxt_inputs, s.layers, d, s.hidden),
             kernels.xxt, kernels.xxt_reference,
             fwd=2 * s.layers * d * d * s.hidden, fwd_bwd=None, unit="TFLOP/s"),
    ]


def rates(case: Case, which: str, seconds: float) -> dict:
    """What goes into a benchmark's extra_info beside its time: the work and its rate."""
    amount = case.amount(which)
    if case.unit == "GB/s":
        return {"bytes": amount, "gb_per_s": amount / seconds / 1e9}
    return {"flops": amount, "tflop_per_s": amount / seconds / 1e12}


def environment(device: torch.device) -> dict:
    """Where the numbers come from: goes into machine_info and every extra_info."""
    import triton

    cuda = device.type == "cuda"
    return {"device": device.type,
            "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "cuda": torch.version.cuda if cuda else None,
            "torch": torch.__version__, "triton": triton.__version__}


_compiled: dict[str, Callable] = {}


def implementation(case: Case, impl: str) -> Callable:
    """The function an implementation runs: the kernel, the reference, or one compiled
    reference per case (shared by its passes: dynamo keeps a graph per grad mode)."""
    if impl == "triton":
        return case.kernel
    if impl == "eager":
        return case.reference
    if impl != "compile":
        raise ValueError(f"unknown implementation '{impl}': use one of {', '.join(IMPLS)}")
    key = f"{case.op} {case.shape}"
    if key not in _compiled:
        _compiled[key] = torch.compile(case.reference, dynamic=False)
    return _compiled[key]


@dataclass
class Prepared:
    step: Callable[[], None]  # the timed call
    setup: Callable[[], None]  # untimed, before every round
    first_call_s: float  # the first call's seconds (for compile: the compile time)
    peak_mib: float | None  # memory a call allocates beyond its inputs (CUDA only)


def prepare(case: Case, impl: str, which: str, device: torch.device,
            dtype: torch.dtype) -> Prepared:
    """The timed step of one case, implementation and pass, called once already (which
    compiles and autotunes), with the setup that goes before each round."""
    fn, inputs = implementation(case, impl), case.make_inputs(device, dtype)
    backend = "triton" if impl == "triton" else "torch"
    grads = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    if which == "fwd":
        def call():
            with dispatch.use(backend), torch.no_grad():
                fn(*inputs)
    else:
        with dispatch.use(backend), torch.no_grad():
            grad_out = torch.randn_like(fn(*inputs))

        def call():
            with dispatch.use(backend):
                fn(*inputs).backward(grad_out)

    def step():
        call()
        sync()  # the timer stops when the GPU has finished, not when the launch returns

    flush = torch.empty(2**26, dtype=torch.int32, device=device) if cuda else None

    def setup():
        for t in grads:
            t.grad = None
        if flush is not None:
            flush.zero_()  # 256 MiB written: the inputs leave the L2 cache
        sync()

    setup()
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    peak = None
    if cuda:
        setup()
        torch.cuda.reset_peak_memory_stats(device)
        live = torch.cuda.memory_allocated(device)
        step()
        peak = (torch.cuda.max_memory_allocated(device) - live) / 2**20
    return Prepared(step, setup, first, peak)


def missing_plugin() -> str | None:
    """Why the suite cannot run here (pytest-benchmark absent), or None."""
    return NO_PLUGIN if importlib.util.find_spec("pytest_benchmark") is None else None


def pytest_args(preset: str | None, json_path: Path | None, compare: str | None,
                storage: Path = STORAGE) -> list[str]:
    """The pytest command line of one run of the suite, saved under `storage`."""
    args = [str(SUITE), "-q", "-p", "no:cacheprovider", f"--benchmark-storage=file://{storage}",
            "--benchmark-autosave", "--benchmark-columns=median,iqr,rounds",
            "--benchmark-sort=name"]
    if preset:
        args.append(f"--bench-preset={preset}")
    if json_path is not None:
        args.append(f"--benchmark-json={json_path}")
    if compare is not None:
        args.append("--benchmark-compare" + (f"={compare}" if compare else ""))
    return args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", help="the shapes of this preset's model (default: gpu-small on "
                   "CUDA; tiny shapes, no torch.compile, on the CPU)")
    p.add_argument("--json", type=Path, help="also write pytest-benchmark's JSON here")
    p.add_argument("--compare", nargs="?", const="", metavar="NUM",
                   help="compare with a saved run in bench/results (default: the last)")
    args = p.parse_args(argv)
    reason = missing_plugin()
    if reason is not None:
        print(reason)
        return 0
    # A fresh process: tests/conftest.py sets TRITON_INTERPRET before triton loads on a CPU.
    cmd = [sys.executable, "-m", "pytest", *pytest_args(args.preset, args.json, args.compare)]
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
