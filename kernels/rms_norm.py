"""RMSNorm over the last dimension, with or without a weight.

    y = x / sqrt(mean(x**2) + eps) * weight

computed in fp32 and stored in x's dtype. The forward saves x and one fp32 `rstd` per row;
the backward recomputes everything else from them. A whole row must fit one tile
(MAX_FUSED_SIZE_BYTES).

Layers, as in every op file here: Triton kernels; launchers, registered as torch custom
ops so that torch.compile calls them as opaque ops instead of tracing into Triton; an
autograd.Function; the functional entry `rms_norm` that the model calls, which routes on
kernels.dispatch; and `rms_norm_reference`, the pure-torch definition tests compare with.
"""

import torch
import triton
import triton.language as tl

from . import dispatch
from .utils import (
    LIBRARY,
    autotune_configs,
    check_launchable,
    empty,
    persistent_programs,
    prune_row_tiles,
)

# A row is one tile: beyond 64 KiB of input per row the tile spills registers.
MAX_FUSED_SIZE_BYTES = 65536
# Rows per program times padded row length: larger tiles spill registers.
MAX_TILE_ELEMENTS = 16384

_CONFIGS = autotune_configs(
    gpu=[
        triton.Config({"BLOCK_M": m}, num_warps=w)
        for m in (1, 2, 4, 8, 16)
        for w in (4, 8)
    ],
    interpret=triton.Config({"BLOCK_M": 4}),
)


@triton.jit
def _row_offsets(rows, n_inner, stride_outer, stride_inner):
    """Offsets of rows of a tensor seen as (outer, inner, n_cols): row r is (r // n_inner,
    r % n_inner). Two strides cover views such as q sliced out of a fused qkv projection."""
    return (rows // n_inner) * stride_outer + (rows % n_inner) * stride_inner


@triton.autotune(
    configs=_CONFIGS, key=["n_cols", "HAS_WEIGHT"],
    prune_configs_by={"early_config_prune": prune_row_tiles(MAX_TILE_ELEMENTS)},
)
@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,  # (n_outer, n_inner, n_cols) input, last dim contiguous
    x_stride_outer,  # elements between outer indices of x
    x_stride_inner,  # elements between inner indices of x
    n_inner,  # rows per outer index
    w_ptr,  # (n_cols,) weight; not read when HAS_WEIGHT is False
    y_ptr,  # (n_rows, n_cols) output, contiguous, x's dtype
    rstd_ptr,  # (n_rows,) fp32 output: 1 / sqrt(mean(x**2) + eps), saved for the backward
    n_rows,  # number of rows
    n_cols,  # normalized size (the last dim)
    eps,  # added to the mean square before the square root
    HAS_WEIGHT: tl.constexpr,  # multiply by w
    BLOCK_N: tl.constexpr,  # power of two >= n_cols: a whole row in one tile
    BLOCK_M: tl.constexpr,  # rows per program (autotuned)
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    rows = rows.to(tl.int64)  # rows * stride can pass 2**31 on large activations

    x_rows = _row_offsets(rows, n_inner, x_stride_outer, x_stride_inner)
    x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        y = y * w[None, :]
    y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * n_cols + cols[None, :], y, mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.autotune(
    configs=_CONFIGS, key=["n_cols", "HAS_WEIGHT"],
    prune_configs_by={"early_config_prune": prune_row_tiles(MAX_TILE_ELEMENTS)},
)
@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,  # (n_rows, n_cols) gradient of y, contiguous
    x_ptr,  # (n_outer, n_inner, n_cols) the forward's input, last dim contiguous
    x_stride_outer,  # elements between outer indices of x
    x_stride_inner,  # elements between inner indices of x
    n_inner,  # rows per outer index
    w_ptr,  # (n_cols,) weight; not read when HAS_WEIGHT is False
    rstd_ptr,  # (n_rows,) fp32 rstd saved by the forward
    dx_ptr,  # (n_rows, n_cols) output: gradient of x, contiguous, x's dtype
    dw_partial_ptr,  # (num_programs, n_cols) fp32 output: this program's part of dw
    n_rows,  # number of rows
    n_cols,  # normalized size (the last dim)
    HAS_WEIGHT: tl.constexpr,  # a weight was used (and needs a gradient)
    BLOCK_N: tl.constexpr,  # power of two >= n_cols: a whole row in one tile
    BLOCK_M: tl.constexpr,  # rows per step of the loop (autotuned)
):
    # Persistent: each program walks row blocks pid, pid + num_programs, ... and sums its
    # share of dw = sum_rows(dy * x * rstd) in registers, so dw costs one small reduction on
    # the host instead of atomics.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)

    for block in range(pid, tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0)):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)
        x_rows = _row_offsets(rows, n_inner, x_stride_outer, x_stride_inner)
        x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)

        # y = w * x * rstd, rstd = (mean(x^2) + eps)^-1/2 gives, with g = dy * w,
        # dx = rstd * g - x * rstd^3 * mean(g * x).
        g = dy
        if HAS_WEIGHT:
            g = dy * w[None, :]
        mean_gx = tl.sum(g * x, axis=1) / n_cols
        dx = rstd[:, None] * g - x * (rstd * rstd * rstd * mean_gx)[:, None]
        tl.store(dx_ptr + rows[:, None] * n_cols + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)
        if HAS_WEIGHT:
            dw += tl.sum(dy * x * rstd[:, None], axis=0)

    if HAS_WEIGHT:
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=col_mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (outer, inner, n) with a contiguous last dim, copying only when the
    leading dims cannot be seen that way (q of (B, T, H, Dh) from a qkv view needs no copy)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, 1, t.shape[-1]) if t.ndim < 3 else t.reshape(-1, *t.shape[-2:])


def _block_n(n_cols: int, dtype: torch.dtype) -> int:
    max_cols = MAX_FUSED_SIZE_BYTES // dtype.itemsize
    if n_cols > max_cols:
        raise ValueError(
            f"rms_norm: rows of {n_cols} {dtype} elements do not fit one tile (at most "
            f"{max_cols}, MAX_FUSED_SIZE_BYTES in kernels/rms_norm.py); use the torch backend "
            "or split the row over several tiles"
        )
    return triton.next_power_of_2(n_cols)


@torch.library.custom_op(f"{LIBRARY}::rms_norm_fwd", mutates_args=())
def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the RMSNorm forward kernel.

    Args:
        x: (..., n) input, any float dtype.
        weight: (n,) weight, or None for no weight.
        eps: added to the mean square.
    Returns:
        y: (..., n) normalized x, x's dtype, contiguous.
        rstd: (rows,) fp32 reciprocal root mean square per row, for the backward.
    """
    check_launchable(x)
    x3 = _as_rows(x)
    n_outer, n_inner, n_cols = x3.shape
    n_rows = n_outer * n_inner
    y = empty(x.shape, x.dtype, x.device)
    rstd = empty((n_rows,), torch.float32, x.device)
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]),)  # noqa: E731
    _rms_norm_fwd_kernel[grid](
        x3, x3.stride(0), x3.stride(1), n_inner, x if weight is None else weight, y, rstd,
        n_rows, n_cols, eps, HAS_WEIGHT=weight is not None, BLOCK_N=_block_n(n_cols, x.dtype),
    )
    return y, rstd


@rms_norm_forward.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(
        (x.numel() // x.shape[-1],), dtype=torch.float32
    )


@torch.library.custom_op(f"{LIBRARY}::rms_norm_bwd", mutates_args=())
def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the RMSNorm backward kernel.

    Args:
        dy: (..., n) gradient of the forward's output.
        x: (..., n) the forward's input.
        weight: (n,) the forward's weight, or None.
        rstd: (rows,) fp32, from `rms_norm_forward`.
    Returns:
        dx: (..., n) gradient of x, x's dtype.
        dw: (n,) gradient of weight in weight's dtype; an empty tensor when weight is None.
    """
    check_launchable(dy, x)
    x3, dy = _as_rows(x), dy.contiguous()
    n_outer, n_inner, n_cols = x3.shape
    n_rows = n_outer * n_inner
    block_n = _block_n(n_cols, x.dtype)
    # One program per row block at most; the kernel's loop needs only an upper bound.
    n_programs = persistent_programs(x.device, n_rows)
    dx = empty(x.shape, x.dtype, x.device)
    dw_partial = empty((n_programs, n_cols) if weight is not None else (0,), torch.float32,
                       x.device)
    _rms_norm_bwd_kernel[(n_programs,)](
        dy, x3, x3.stride(0), x3.stride(1), n_inner, x if weight is None else weight, rstd,
        dx, dw_partial, n_rows, n_cols, HAS_WEIGHT=weight is not None, BLOCK_N=block_n,
    )
    if weight is None:
        return dx, x.new_empty(0)
    return dx, dw_partial.sum(0).to(weight.dtype)


@rms_norm_backward.register_fake
def _(dy, x, weight, rstd):
    dw = x.new_empty(0) if weight is None else torch.empty_like(weight)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, weight, rstd)
        return dx, (dw if weight is not None else None), None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6):
    """RMSNorm in plain torch, computed in fp32, returned in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6):
    """RMSNorm of x over its last dim, times weight if given: (..., n) -> (..., n).

    The kernel (backend "triton") or `rms_norm_reference` (backend "torch"), chosen by
    kernels.dispatch.
    """
    if dispatch.get_backend() == "triton":
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
