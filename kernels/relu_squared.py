"""ReLU squared, y = relu(x)**2, the MLP activation of the modded-nanogpt speedrun.

What is fused: the forward is one elementwise pass (relu, square, cast); the backward
is one elementwise pass (dx = 2 * relu(x) * dy). The backward needs relu(x), and it
recovers it as sqrt(y) from the saved *output*, so the op saves nothing of its own:
in an MLP, y = relu(h)**2 is the input of the next linear layer, which saves y for its
own backward anyway, and h (4x the model width) is freed right after the forward.
Saving x instead would keep a second activation of the same size alive per layer.

sqrt(y) equals relu(x) up to the rounding of y, whose relative error the sqrt halves:
well inside one ulp of the gradient in bf16 and fp32. fp16 is refused: there x**2
overflows above 256 and underflows below about 2e-4.
"""

import torch
import triton
import triton.language as tl

from . import dispatch
from .utils import LIBRARY, autotune_configs, check_launchable, empty

_CONFIGS = autotune_configs(
    gpu=[
        triton.Config({"BLOCK_SIZE": 1024}, num_warps=4),
        triton.Config({"BLOCK_SIZE": 2048}, num_warps=8),
        triton.Config({"BLOCK_SIZE": 4096}, num_warps=8),
    ],
    interpret=triton.Config({"BLOCK_SIZE": 256}),
)


@triton.autotune(configs=_CONFIGS, key=["n_elements"])
@triton.jit
def _relu_squared_fwd_kernel(
    x_ptr,  # (n,) input, contiguous
    y_ptr,  # (n,) output relu(x)**2, x's dtype
    n_elements,  # number of elements
    BLOCK_SIZE: tl.constexpr,  # elements per program (autotuned)
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    r = tl.maximum(x, 0.0)
    tl.store(y_ptr + offsets, (r * r).to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_CONFIGS, key=["n_elements"])
@triton.jit
def _relu_squared_bwd_kernel(
    dy_ptr,  # (n,) gradient of y, contiguous
    y_ptr,  # (n,) the forward's output relu(x)**2, contiguous
    dx_ptr,  # (n,) output: gradient of x, y's dtype
    n_elements,  # number of elements
    BLOCK_SIZE: tl.constexpr,  # elements per program (autotuned)
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dx = 2.0 * tl.sqrt(y) * dy  # sqrt(y) = relu(x)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _grid(n_elements: int):
    return lambda meta: (triton.cdiv(n_elements, meta["BLOCK_SIZE"]),)


@torch.library.custom_op(f"{LIBRARY}::relu_squared_fwd", mutates_args=())
def relu_squared_forward(x: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel.

    Args:
        x: any shape, any float dtype (copied if not contiguous).
    Returns:
        relu(x)**2, x's shape and dtype, contiguous.
    """
    check_launchable(x)
    if x.dtype == torch.float16:
        raise TypeError("relu_squared: the kernel saves relu(x)**2, which overflows in fp16; "
                        "use bf16 or fp32 (or the torch backend)")
    x = x.contiguous()
    y = empty(x.shape, x.dtype, x.device)
    _relu_squared_fwd_kernel[_grid(x.numel())](x, y, x.numel())
    return y


@relu_squared_forward.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op(f"{LIBRARY}::relu_squared_bwd", mutates_args=())
def relu_squared_backward(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Launch the backward kernel.

    Args:
        dy: gradient of y, y's shape.
        y: the forward's output relu(x)**2.
    Returns:
        gradient of x, y's shape and dtype, contiguous.
    """
    check_launchable(dy, y)
    dy, y = dy.contiguous(), y.contiguous()
    dx = empty(y.shape, y.dtype, y.device)
    _relu_squared_bwd_kernel[_grid(y.numel())](dy, y, dx, y.numel())
    return dx


@relu_squared_backward.register_fake
def _(dy, y):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


class ReLUSquaredFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = relu_squared_forward(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return relu_squared_backward(dy, y)


def relu_squared_reference(x: torch.Tensor) -> torch.Tensor:
    """relu(x)**2 in plain torch."""
    return torch.relu(x).square()


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x)**2, elementwise. The kernels (backend "triton"), saving only the output, or
    `relu_squared_reference` (backend "torch")."""
    if dispatch.get_backend() == "triton":
        return ReLUSquaredFunction.apply(x)
    return relu_squared_reference(x)
