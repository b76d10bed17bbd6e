"""Checking a kernel against its reference: run both backends on the same inputs and
compare outputs and gradients with per-dtype tolerances.

On the fixed side, so that the tolerances the kernel tests hold a kernel to cannot be
loosened by the change under test.

The triton side runs on the inputs as given, with poisoned output buffers; the torch side
runs the reference on copies upcast to fp32 (or fp64), so bf16 kernels are checked against
an exact-enough answer, never against bf16 torch. Used by tests/test_kernels_*.py; use it
for every new kernel.
"""

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from triton.runtime import KernelInterface

from kernels import dispatch
from kernels.utils import poison_outputs


@dataclass(frozen=True)
class Tolerance:
    rtol: float  # relative to each expected element
    atol: float  # relative to the largest expected element (so gradients of 1/N scale pass)


TOLERANCES = {
    torch.float32: Tolerance(rtol=1e-5, atol=1e-5),
    # One bf16 ulp is at most 2**-7 of a value: the interpreter's fp32->bf16 casts
    # truncate, so a correctly computed result can be a whole ulp off.
    torch.bfloat16: Tolerance(rtol=2**-7 + 1e-4, atol=1e-3),
    torch.float16: Tolerance(rtol=2**-10 + 1e-4, atol=1e-4),
}


@dataclass
class Run:
    output: torch.Tensor
    grads: tuple[torch.Tensor | None, ...]  # gradient of each input; None where it has none


def _leaf(value, dtype: torch.dtype | None = None):
    """A new leaf for one run: the caller's tensor as is (same storage and strides, so the
    kernels see strided views as given), or a copy cast to `dtype` for the reference."""
    if not isinstance(value, torch.Tensor):
        return value
    leaf = value.detach()
    if dtype is not None and leaf.is_floating_point():
        leaf = leaf.to(dtype, copy=True)
    return leaf.requires_grad_(value.requires_grad)


def _grads(inputs) -> tuple[torch.Tensor | None, ...]:
    return tuple(t.grad if isinstance(t, torch.Tensor) else None for t in inputs)


def compare_backends(fn, *inputs, reference_dtype: torch.dtype = torch.float32) -> tuple[Run, Run]:
    """Run fn(*inputs) with the triton backend and with the torch backend.

    Floating inputs of the torch run are upcast to reference_dtype; inputs that require
    grad get gradients in both runs, from the same random output gradient (a scalar
    loss gets a random one too, which checks the grad_loss scaling). The triton run
    allocates every launcher output poisoned (kernels.utils.poison_outputs).

    Returns:
        (triton run, reference run), each with the output and the inputs' gradients.
    """
    triton_inputs = [_leaf(v) for v in inputs]
    reference_inputs = [_leaf(v, reference_dtype) for v in inputs]
    with dispatch.use("triton"), poison_outputs():
        output = fn(*triton_inputs)
    with dispatch.use("torch"):
        reference = fn(*reference_inputs)
    if output.requires_grad:
        grad_output = torch.randn(output.shape, device=output.device).to(output.dtype)
        with poison_outputs():
            output.backward(grad_output)
        reference.backward(grad_output.to(reference.dtype))
    return (
        Run(output.detach(), _grads(triton_inputs)),
        Run(reference.detach(), _grads(reference_inputs)),
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 tolerance: Tolerance | None = None, name: str = "output") -> None:
    """Assert |actual - expected| <= rtol * |expected| + atol * max|expected|, elementwise.

    dtype picks the tolerance from TOLERANCES (default: actual's dtype); `tolerance`
    overrides it. NaN anywhere in actual fails (an unwritten poisoned element).
    """
    tol = tolerance or TOLERANCES[dtype or actual.dtype]
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    actual, expected = actual.double(), expected.double()
    assert not actual.isnan().any(), f"{name}: NaN (an element the kernel did not write?)"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol.rtol, atol=tol.atol * scale + 1e-30,
                               msg=lambda m: f"{name}: {m}")


def assert_runs_close(run: Run, reference: Run, dtype: torch.dtype | None = None,
                      tolerance: Tolerance | None = None,
                      grad_tolerance: Tolerance | None = None) -> None:
    """assert_close on the output and on every gradient of a `compare_backends` result.

    dtype: the tolerance to use; default each tensor's own dtype (an fp32 loss of bf16
    logits is held to fp32 tolerance, their bf16 gradient to bf16 tolerance).
    """
    assert_close(run.output, reference.output, dtype, tolerance)
    for i, (grad, ref_grad) in enumerate(zip(run.grads, reference.grads, strict=True)):
        assert (grad is None) == (ref_grad is None), f"input {i}: gradient present in one run only"
        if grad is not None:
            assert_close(grad, ref_grad, dtype, grad_tolerance or tolerance, name=f"grad {i}")


@contextmanager
def counting_launches(module):
    """Count the launches of the kernels of `module` (its `*_kernel` globals) in this block.

    Yields a Counter of kernel name -> launches; shows which implementation really ran.
    """
    launches = Counter()
    originals = {name: obj for name, obj in vars(module).items()
                 if name.endswith("_kernel") and isinstance(obj, KernelInterface)}

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches[self.name] += 1
            return self.kernel[grid]

    for name, kernel in originals.items():
        setattr(module, name, Counting(name, kernel))
    try:
        yield launches
    finally:
        for name, kernel in originals.items():
            setattr(module, name, kernel)
