"""The fixed-side kernel check (a kernel must match its reference): every kernel entry
point against its fixed definition on fresh random shapes, outputs and gradients, on both
backends."""

import pytest
import torch
import torch.nn.functional as F

import kernels
from bench.kernel_check import check_kernels

CPU = torch.device("cpu")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_honest_kernels_pass_on_fresh_inputs(backend):
    seeds = range(20) if backend == "torch" else range(2)  # the interpreter is slow
    with kernels.use(backend):
        for s in seeds:
            g = torch.Generator().manual_seed(s)
            assert check_kernels(kernels, CPU, g, full=backend == "torch") == [], s


class Patched:
    """The kernels package with one entry point replaced, as a cheating surface would."""

    def __init__(self, **replaced):
        self.replaced = replaced

    def __getattr__(self, name):
        return self.replaced.get(name, getattr(kernels, name))


def rms_of_a_prefix(x, weight=None, eps=1e-6):  # "cheaper": the rms of 64 features only
    y = x * torch.rsqrt(x[..., :64].pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def upper_triangle(x):  # half the work of X·Xᵀ, and wrong below the diagonal
    return torch.triu(x @ x.mT)


def bf16_cross_entropy(logits, targets, softcap=None, ignore_index=-1):
    z = logits.bfloat16()  # a precision downgrade of the loss
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z.float().round(decimals=1), targets, ignore_index=ignore_index)


def detached_relu_squared(x):  # the right output, but no gradient flows back
    return F.relu(x).square().detach()


@pytest.mark.parametrize(
    "replaced, name",
    [
        ({"rms_norm": rms_of_a_prefix}, "rms_norm"),
        ({"xxt": upper_triangle}, "xxt"),
        ({"cross_entropy": bf16_cross_entropy}, "cross_entropy"),
        ({"relu_squared": detached_relu_squared}, "relu_squared"),
        ({"apply_rotary": lambda x, cos, sin: x}, "apply_rotary"),
    ],
    ids=["rms-of-a-prefix", "xxt-upper-triangle", "lossy-cross-entropy", "no-gradient",
         "rotary-skipped"],
)  # fmt: skip
def test_a_kernel_wrong_on_some_inputs_is_caught(replaced, name):
    for s in range(5):  # on every draw: the sizes always include ones that expose it
        problems = check_kernels(Patched(**replaced), CPU, torch.Generator().manual_seed(s))
        assert problems and all(p.startswith(f"kernel-check: kernels.{name}(") for p in problems)
