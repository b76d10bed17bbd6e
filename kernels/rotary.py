"""Rotary position embedding, rotate-halves convention, for q and k of shape (B, T, H, Dh).

With d = Dh / 2, x1 = x[..., :d], x2 = x[..., d:] and angle tables cos, sin of (T, d):

    y1 = x1 * cos + x2 * sin
    y2 = -x1 * sin + x2 * cos

A rotation, so the backward is the same kernel with the angle negated (sin -> -sin), and
nothing but cos and sin is saved. Computed in fp32, stored in x's dtype. x may be a view
(e.g. q sliced out of a fused qkv projection): only its last dim must be contiguous.
The kernel treats every (b, t, h) as a row of Dh values and each program rotates BLOCK_M
rows, so small heads still make large tiles.
"""

import torch
import triton
import triton.language as tl

from . import dispatch
from .utils import LIBRARY, autotune_configs, check_launchable, empty, prune_row_tiles

# A program's tile is BLOCK_M rows x BLOCK_N half-rows, each loaded twice (x1 and x2).
MAX_HEAD_DIM = 1024
MAX_TILE_ELEMENTS = 8192


@triton.autotune(
    configs=autotune_configs(
        gpu=[
            triton.Config({"BLOCK_M": m}, num_warps=w)
            for m in (4, 8, 16, 32)
            for w in (4, 8)
        ],
        interpret=triton.Config({"BLOCK_M": 8}),
    ),
    key=["n_heads", "half", "INVERSE"],
    prune_configs_by={"early_config_prune": prune_row_tiles(MAX_TILE_ELEMENTS)},
)
@triton.jit
def _rotary_kernel(
    x_ptr,  # (B, T, H, Dh) input, last dim contiguous, other dims any stride
    x_stride_b,  # elements between batches of x
    x_stride_t,  # elements between time steps of x
    x_stride_h,  # elements between heads of x
    cos_ptr,  # (T, half) cosines of the angles, last dim contiguous
    sin_ptr,  # (T, half) sines of the angles, last dim contiguous
    cos_stride_t,  # elements between time steps of cos
    sin_stride_t,  # elements between time steps of sin
    y_ptr,  # (B, T, H, Dh) output, contiguous, x's dtype
    n_rows,  # B * T * H
    seq_len,  # T
    n_heads,  # H
    half,  # Dh / 2
    INVERSE: tl.constexpr,  # rotate by -angle (the backward)
    BLOCK_N: tl.constexpr,  # power of two >= half
    BLOCK_M: tl.constexpr,  # (b, t, h) rows per program (autotuned)
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < half
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)  # offsets pass 2**31 for large activations
    h = rows % n_heads
    t = (rows // n_heads) % seq_len
    b = rows // (n_heads * seq_len)

    # cos/sin rows repeat across b and h: these loads hit the cache, not memory.
    cos = tl.load(cos_ptr + t[:, None] * cos_stride_t + cols[None, :], mask=mask, other=0.0)
    sin = tl.load(sin_ptr + t[:, None] * sin_stride_t + cols[None, :], mask=mask, other=0.0)
    cos = cos.to(tl.float32)
    sin = sin.to(tl.float32)
    if INVERSE:
        sin = -sin

    x_offsets = (b * x_stride_b + t * x_stride_t + h * x_stride_h)[:, None] + cols[None, :]
    x1 = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_offsets + half, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin

    y_offsets = rows[:, None] * (2 * half) + cols[None, :]
    tl.store(y_ptr + y_offsets, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + y_offsets + half, y2.to(y_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[-1] % 2:
        raise ValueError(f"apply_rotary: want x (B, T, H, Dh) with Dh even, got {tuple(x.shape)}")
    want = (x.shape[1], x.shape[-1] // 2)
    if tuple(cos.shape) != want or tuple(sin.shape) != want:
        raise ValueError(
            f"apply_rotary: want cos and sin of (T, Dh/2) = {want}, got {tuple(cos.shape)} and "
            f"{tuple(sin.shape)}; slice the tables to the sequence length"
        )


@torch.library.custom_op(f"{LIBRARY}::rotary", mutates_args=())
def rotary_forward(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> torch.Tensor:
    """Launch the rotary kernel.

    Args:
        x: (B, T, H, Dh) input, any float dtype, last dim contiguous (else copied).
        cos, sin: (T, Dh/2) angle tables, fp32 recommended.
        inverse: rotate by -angle (the backward of the forward rotation).
    Returns:
        (B, T, H, Dh) rotated x, x's dtype, contiguous.
    """
    _check(x, cos, sin)
    check_launchable(x, cos, sin)
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    batch, seq_len, n_heads, head_dim = x.shape
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"apply_rotary: head dim {head_dim} > MAX_HEAD_DIM = {MAX_HEAD_DIM} "
                         "(kernels/rotary.py)")
    n_rows = batch * seq_len * n_heads
    y = empty(x.shape, x.dtype, x.device)
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]),)  # noqa: E731
    _rotary_kernel[grid](
        x, x.stride(0), x.stride(1), x.stride(2), cos, sin, cos.stride(0), sin.stride(0), y,
        n_rows, seq_len, n_heads, head_dim // 2,
        INVERSE=inverse, BLOCK_N=triton.next_power_of_2(head_dim // 2),
    )
    return y


@rotary_forward.register_fake
def _(x, cos, sin, inverse):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotary_forward(x, cos, sin, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rotary_forward(dy, cos, sin, True), None, None


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding in plain torch, in fp32, returned in x's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos.float()[None, :, None, :], sin.float()[None, :, None, :]  # (1, T, 1, half)
    y = torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)
    return y.to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, Dh) by the angles whose cos and sin are (T, Dh/2) tables.

    No gradient flows to cos and sin (they are fixed tables). The kernel (backend
    "triton") or `apply_rotary_reference` (backend "torch").
    """
    if dispatch.get_backend() == "triton":
        return RotaryFunction.apply(x, cos, sin)
    return apply_rotary_reference(x, cos, sin)
