"""The kernels' public functions checked against fixed definitions, on fresh random inputs.

Threat 6 of bench/INTEGRITY.md: a kernel that is right on the shapes its own tests use
and wrong elsewhere, or an entry point that quietly computes something cheaper. train.py
runs `check_kernels` on the run's device and backend before the clock starts; any
mismatch fails the run as an integrity violation. The definitions here are the fixed
meaning of each name in `kernels/__init__.py`: a surface that wants a different operation
adds a new function rather than changing what an existing name computes.

Shapes and values are drawn fresh for every run (the caller passes a generator seeded from
the OS), odd sizes included, so a kernel cannot special-case the check. Everything runs in
fp32, outputs and gradients, with tolerances far below what a real error moves.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rms_norm(x, weight=None, eps=1e-6):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def cross_entropy(logits, targets, softcap=None, ignore_index=-1):
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


def linear_cross_entropy(x, weight, targets, softcap=None, chunk_size=None, ignore_index=-1):
    return cross_entropy(x @ weight.T, targets, softcap, ignore_index)


def apply_rotary(x, cos, sin):  # x: (B, T, H, D); cos, sin: (T, D/2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def relu_squared(x):
    return F.relu(x).square()


def xxt(x):
    return x @ x.mT


@dataclass
class Case:
    name: str  # the function's name in kernels/
    args: tuple  # positional arguments; float tensors that need a gradient have requires_grad
    kwargs: dict


# Sizes are drawn from fixed pools of odd and round numbers (values are fresh every run):
# a kernel that autotunes per size then meets the same few sizes in every run.
ROWS = (1, 3, 7, 13, 16, 37, 64, 129, 300, 512)
COLS = (5, 31, 67, 128, 257, 1000, 1024, 2049, 4096)  # not 1: rms_norm of one element is its sign


def _cases(g: torch.Generator, device: torch.device, full: bool) -> list[Case]:
    """Three sizes per function: small and odd, medium, and large (up to 512 x 4096);
    only the small one when not `full`."""

    def pick(pool: tuple[int, ...], lo: int, hi: int) -> int:
        choices = [n for n in pool if lo <= n <= hi]
        return choices[int(torch.randint(0, len(choices), (1,), generator=g))]

    def size(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    def randn(*shape, grad=True, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(device)
        return t.requires_grad_(grad)

    sizes = [
        (pick(ROWS, 1, 17), pick(COLS, 5, 67)),
        (pick(ROWS, 16, 129), pick(COLS, 128, 1024)),
        (pick(ROWS, 64, 512), pick(COLS, 1024, 4096)),
    ]
    cases = []
    for rows, cols in sizes if full else sizes[:1]:
        cases.append(Case("rms_norm", (randn(rows, cols),), {}))
        cases.append(Case("rms_norm", (randn(rows, cols), randn(cols)), {}))
        cases.append(Case("relu_squared", (randn(rows, cols),), {}))
        vocab = cols
        targets = torch.randint(0, vocab, (rows,), generator=g).to(device)
        if rows > 1:
            targets[0] = -1  # one ignored row (not the only one: a mean over none is NaN)
        cases.append(Case("cross_entropy", (randn(rows, vocab, scale=3.0), targets), {}))
        cases.append(
            Case("cross_entropy", (randn(rows, vocab, scale=30.0), targets), {"softcap": 15.0})
        )
        dim = pick(COLS, 5, 128)
        cases.append(
            Case(
                "linear_cross_entropy",
                (randn(rows, dim), randn(vocab, dim, scale=dim**-0.5), targets),
                {"softcap": 30.0},
            )
        )
        cases.append(Case("xxt", (randn(size(1, 4), pick(ROWS, 1, 129), cols, grad=False),), {}))
    for _ in range(2):
        T, H, half = pick(ROWS, 1, 64), size(1, 6), pick(COLS, 5, 67)
        angles = torch.rand(T, half, generator=g).to(device) * 6.3
        x = randn(size(1, 3), T, H, 2 * half)
        cases.append(Case("apply_rotary", (x, angles.cos(), angles.sin()), {}))
    return cases


REFERENCES: dict[str, Callable] = {
    "rms_norm": rms_norm,
    "cross_entropy": cross_entropy,
    "linear_cross_entropy": linear_cross_entropy,
    "apply_rotary": apply_rotary,
    "relu_squared": relu_squared,
    "xxt": xxt,
}
TOLERANCE = 2e-3  # of the reference's largest element, for outputs and gradients
# Matmuls on CUDA may run in TF32 (10-bit mantissa: ~1e-3 relative per product, more
# summed), in the kernels and in torch under `float32_matmul_precision("high")`.
MATMUL_OPS, CUDA_MATMUL_TOLERANCE = ("xxt", "linear_cross_entropy"), 1e-2


def _error(got, want: torch.Tensor) -> float:
    """The largest error relative to the reference's scale (inf for a wrong shape)."""
    if not torch.is_tensor(got) or got.shape != want.shape:
        return float("inf")
    got, want = got.detach().double(), want.detach()
    return (got - want).abs().max().item() / (want.abs().max().item() + 1e-6)


def _check(fn, case: Case, generator: torch.Generator, tolerance: float) -> str | None:
    """What is wrong with fn on one case, or None."""

    def copies(dtype):
        return [
            a.detach().to(dtype).requires_grad_(a.requires_grad) if a.is_floating_point() else a
            for a in case.args
        ]

    exact, mine = copies(torch.float64), copies(torch.float32)
    want = REFERENCES[case.name](*exact, **case.kwargs)  # in float64
    got = fn(*mine, **case.kwargs)
    err = _error(got, want)
    if err > tolerance:
        return f"output off by {err:.3g} of its scale"
    if not want.requires_grad:
        return None
    if not got.requires_grad:
        return "no gradient flows through it"
    upstream = torch.randn(want.shape, generator=generator).to(want.device)
    grads_want = torch.autograd.grad(want, [a for a in exact if a.requires_grad], upstream)
    grads_got = torch.autograd.grad(
        got, [a for a in mine if a.requires_grad], upstream.float(), allow_unused=True
    )
    for i, (gw, gg) in enumerate(zip(grads_want, grads_got)):
        err = float("inf") if gg is None else _error(gg, gw)
        if err > tolerance:
            return f"gradient of argument {i} off by {err:.3g} of its scale"
    return None


def check_kernels(
    module, device: torch.device, generator: torch.Generator, full: bool = True
) -> list[str]:
    """Problems with the kernel entry points of `module` (the surface's `kernels` package),
    at its current backend, each starting with "kernel-check: "; empty when all agree.
    full=False checks only small shapes (for Triton's CPU interpreter, ~1 ms a program)."""
    problems = []
    for case in _cases(generator, device, full):
        fn = getattr(module, case.name, None)
        if fn is None:  # the surface no longer has this function: nothing to check
            continue
        shapes = ", ".join(str(tuple(a.shape)) for a in case.args if torch.is_tensor(a))
        where = f"kernel-check: kernels.{case.name}({shapes}, {case.kwargs or ''})".replace(
            ", )", ")"
        )
        matmul = device.type == "cuda" and case.name in MATMUL_OPS
        try:
            problem = _check(fn, case, generator, CUDA_MATMUL_TOLERANCE if matmul else TOLERANCE)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run is a finding too
            problem = f"raised {type(e).__name__}: {e}"
        if problem is not None:
            problems.append(f"{where}: {problem}")
    return problems
