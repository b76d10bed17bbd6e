"""Kernel benchmarks: each Triton kernel against torch eager and torch.compile of its
reference, forward and forward+backward, at sizes that fill an H100.

    python -m bench.kernels_bench [--ops rms_norm,xxt] [--quick] [--json PATH]

Prints a markdown table. Times are medians of device time from triton.testing.do_bench.
Memory-bound ops report GB/s of the bytes a pass must read and write at the least (the
same count for all three implementations, so GB/s compare like time does) and that as
a fraction of the measured copy bandwidth; X @ X.T reports TFLOP/s of the full product
(2*M*M*K, so computing one triangle shows as a higher effective rate) and the linear
cross-entropy TFLOP/s of its matmuls. Every row carries the GPU name and the torch and
triton versions. "fwd" runs under no_grad; "fwd+bwd" runs the forward with autograd and
the backward. Needs a CUDA GPU.
"""

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import triton
import triton.testing

import kernels
from kernels import dispatch

BF16 = torch.bfloat16  # every benchmark runs in bf16, as training does
IMPLS = ("triton", "eager", "compile")


@dataclass
class Case:
    op: str
    shape: str
    make_inputs: Callable[[], tuple]  # fresh inputs on the GPU
    kernel: Callable  # the functional entry, routed by kernels.dispatch
    reference: Callable  # its pure-torch reference
    fwd: float  # bytes (memory-bound ops) or FLOPs (matmul ops) of the forward
    fwd_bwd: float | None  # the same for forward+backward; None: forward only
    unit: str = "GB/s"  # or "TFLOP/s"


VOCAB = 50304  # GPT-2's vocabulary padded to a multiple of 64


def _randn(*shape, grad=True, scale=1.0):
    x = torch.randn(shape, device="cuda") * scale
    return x.to(BF16).requires_grad_(grad)


def _rms_norm_inputs(n_rows, dim):
    return _randn(n_rows, dim), _randn(dim)


def _rotary_inputs(batch, seq_len, n_heads, head_dim):
    angles = torch.rand(seq_len, head_dim // 2, device="cuda") * 6.3
    return _randn(batch, seq_len, n_heads, head_dim), angles.cos(), angles.sin()


def _relu_squared_inputs(n_rows, dim):
    return (_randn(n_rows, dim),)


def _cross_entropy_inputs(n_rows, softcap):
    targets = torch.randint(0, VOCAB, (n_rows,), device="cuda")
    return _randn(n_rows, VOCAB, scale=3.0), targets, softcap


def _linear_cross_entropy_inputs(n_rows, dim):
    targets = torch.randint(0, VOCAB, (n_rows,), device="cuda")
    return _randn(n_rows, dim), _randn(VOCAB, dim, scale=dim**-0.5), targets, 15.0


def _xxt_inputs(m, k):
    return (_randn(m, k, grad=False),)


def cases(quick: bool) -> list[Case]:
    """The benchmark sizes (inputs are made lazily); --quick keeps one size per op."""
    rows, e = 32768, 2  # tokens per step, bytes per bf16 element
    out = []
    for d in (1024,) if quick else (768, 1024, 4096):
        n = rows * d
        out.append(Case("rms_norm", f"{rows}x{d}", partial(_rms_norm_inputs, rows, d),
                        kernels.rms_norm, kernels.rms_norm_reference,
                        fwd=2 * n * e, fwd_bwd=5 * n * e))
        shape = (rows // 2048, 2048, d // 64, 64)  # (B, T, H, Dh)
        out.append(Case("apply_rotary", "x".join(map(str, shape)), partial(_rotary_inputs, *shape),
                        kernels.apply_rotary, kernels.apply_rotary_reference,
                        fwd=2 * n * e, fwd_bwd=4 * n * e))
    for d in (3072,) if quick else (1024, 3072, 4096):
        n = rows * d
        out.append(Case("relu_squared", f"{rows}x{d}", partial(_relu_squared_inputs, rows, d),
                        kernels.relu_squared, kernels.relu_squared_reference,
                        fwd=2 * n * e, fwd_bwd=5 * n * e))
    for n_rows in (16384,) if quick else (16384, 32768):
        for softcap in (None, 15.0):
            nv = n_rows * VOCAB
            out.append(Case("cross_entropy", f"{n_rows}x{VOCAB} cap={softcap}",
                            partial(_cross_entropy_inputs, n_rows, softcap),
                            kernels.cross_entropy, kernels.cross_entropy_reference,
                            fwd=nv * e, fwd_bwd=3 * nv * e))
    for dim in (768,) if quick else (768, 1024):
        n_rows = 16384
        flops = 2 * n_rows * VOCAB * dim  # of the logits matmul; the backward has two more
        out.append(Case("linear_cross_entropy", f"{n_rows}x{dim} V={VOCAB} cap=15",
                        partial(_linear_cross_entropy_inputs, n_rows, dim),
                        kernels.linear_cross_entropy, kernels.linear_cross_entropy_reference,
                        fwd=flops, fwd_bwd=3 * flops, unit="TFLOP/s"))
    for m, k in [(768, 3072)] if quick else [(768, 3072), (1024, 4096), (4096, 4096)]:
        out.append(Case("xxt", f"{m}x{k}", partial(_xxt_inputs, m, k),
                        kernels.xxt, kernels.xxt_reference,
                        fwd=2 * m * m * k, fwd_bwd=None, unit="TFLOP/s"))
    return out


def _step(fn: Callable, inputs: tuple, backward: bool) -> Callable[[], None]:
    """One timed call: the forward under no_grad, or forward and backward."""
    if not backward:
        def forward():
            with torch.no_grad():
                fn(*inputs)
        return forward
    grad = torch.randn_like(fn(*inputs))

    def forward_backward():
        fn(*inputs).backward(grad)
    return forward_backward


def _measure(step: Callable[[], None], inputs: tuple) -> tuple[float, float]:
    """(median ms, peak MiB allocated above what was live before the call)."""
    grads = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    ms = triton.testing.do_bench(step, grad_to_none=grads, return_mode="median")
    for t in grads:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    live = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - live) / 2**20


def copy_bandwidth() -> float:
    """GB/s of a 256 MiB bf16 device-to-device copy (read + write): the roofline the
    memory-bound kernels are held to."""
    x = torch.randn(2**27, device="cuda").to(BF16)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() * x.element_size() / ms / 1e6


def bench_case(case: Case, copy_gbps: float, env: dict) -> list[dict]:
    impls = {
        "triton": case.kernel,
        "eager": case.reference,
        "compile": torch.compile(case.reference, dynamic=False),
    }
    rows = []
    for backward in (False, True) if case.fwd_bwd is not None else (False,):
        amount = case.fwd_bwd if backward else case.fwd
        timed = {}
        for impl, fn in impls.items():
            inputs = case.make_inputs()
            with dispatch.use("triton" if impl == "triton" else "torch"):
                ms, peak = _measure(_step(fn, inputs, backward), inputs)
            scale = 1e6 if case.unit == "GB/s" else 1e9
            timed[impl] = ms
            rows.append({
                "op": case.op, "shape": case.shape, "pass": "fwd+bwd" if backward else "fwd",
                "impl": impl, "ms": ms, "rate": amount / ms / scale, "unit": case.unit,
                "of_copy": amount / ms / 1e6 / copy_gbps if case.unit == "GB/s" else None,
                "peak_mib": peak, **env,
            })
        for row in rows[-len(impls):]:
            row["vs_eager"] = timed["eager"] / row["ms"]
            row["vs_compile"] = timed["compile"] / row["ms"]
    return rows


def markdown(rows: list[dict], copy_gbps: float) -> str:
    env = rows[0]
    lines = [
        f"GPU {env['gpu']}, torch {env['torch']}, triton {env['triton']}; "
        f"copy bandwidth {copy_gbps:.0f} GB/s (read + write).",
        "",
        "| op | shape | pass | impl | ms | rate | of copy | x eager | x compile | peak MiB "
        "| gpu | torch | triton |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|---|---|---|",
    ]
    for r in rows:
        of_copy = "" if r["of_copy"] is None else f"{r['of_copy']:.0%}"
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['pass']} | {r['impl']} | {r['ms']:.3f} "
            f"| {r['rate']:.0f} {r['unit']} | {of_copy} | {r['vs_eager']:.2f} "
            f"| {r['vs_compile']:.2f} | {r['peak_mib']:.0f} | {r['gpu']} | {r['torch']} "
            f"| {r['triton']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default="", help="comma-separated ops to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="one size per op")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.kernels_bench needs a CUDA GPU (none is visible); the kernels' CPU "
                 "correctness tests are `pytest tests/test_kernels_*.py`")

    # One compiled reference per shape and grad mode: more than dynamo's default 8.
    torch._dynamo.config.recompile_limit = 64
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__}
    wanted = {op for op in args.ops.split(",") if op}
    selected = [c for c in cases(args.quick) if not wanted or c.op in wanted]
    if not selected:
        sys.exit(f"bench.kernels_bench: no op matches --ops {args.ops}")
    copy_gbps = copy_bandwidth()
    rows = []
    for case in selected:
        rows += bench_case(case, copy_gbps, env)
        torch.cuda.empty_cache()
    print(markdown(rows, copy_gbps))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_gbps": copy_gbps, **env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
