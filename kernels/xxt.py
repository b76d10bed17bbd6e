"""The symmetric product A = X @ X.T for Muon's Newton-Schulz iterations.

A is symmetric, so only the tiles on and above the diagonal are computed; each
off-diagonal tile is also stored transposed into its mirror position. That is about half
the FLOPs of a full matmul of the same shape. In Newton-Schulz, A @ A is xxt(A) too,
since A is symmetric.

Forward only (Muon runs under no_grad). Accumulates in fp32, stores in X's dtype. On a
GPU, fp32 inputs go through TF32 tensor cores (as torch does with allow_tf32); the
interpreter casts operands to fp32 because its bf16 tl.dot is wrong.
"""

import torch
import triton
import triton.language as tl

from . import dispatch
from .utils import INTERPRET, LIBRARY, autotune_configs, check_launchable, empty


@triton.autotune(
    configs=autotune_configs(
        gpu=[
            triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=5),
            # Small tiles: Muon's 768-row matrices give only 21 upper tiles of 128.
            triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
        ],
        interpret=triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}),
    ),
    key=["M", "K"],
)
@triton.jit
def _xxt_kernel(
    x_ptr,  # (batch, M, K) input
    x_stride_b,  # elements between matrices of x
    x_stride_m,  # elements between rows of x
    x_stride_k,  # elements between columns of x
    a_ptr,  # (batch, M, M) output X @ X.T, contiguous, x's dtype
    M,  # rows of X (and rows and columns of A)
    K,  # columns of X
    CAST_FP32: tl.constexpr,  # cast operands to fp32 before tl.dot (the interpreter needs it)
    BLOCK_M: tl.constexpr,  # rows and columns of an output tile (autotuned)
    BLOCK_K: tl.constexpr,  # reduction step (autotuned)
):
    tile_m = tl.program_id(0)
    tile_n = tl.program_id(1)
    if tile_n < tile_m:
        return  # below the diagonal: written as the mirror of tile (tile_n, tile_m)
    batch = tl.program_id(2).to(tl.int64)  # batch * stride can pass 2**31
    x_ptr += batch * x_stride_b
    a_ptr += batch * M * M

    rows_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = tile_n * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_mask = (k + ks) < K
        # x_m: (BLOCK_M, BLOCK_K) rows of X; x_nt: (BLOCK_K, BLOCK_M) rows of X, transposed.
        x_m = tl.load(x_ptr + rows_m[:, None] * x_stride_m + (k + ks)[None, :] * x_stride_k,
                      mask=(rows_m < M)[:, None] & k_mask[None, :], other=0.0)
        x_nt = tl.load(x_ptr + rows_n[None, :] * x_stride_m + (k + ks)[:, None] * x_stride_k,
                       mask=(rows_n < M)[None, :] & k_mask[:, None], other=0.0)
        if CAST_FP32:
            x_m = x_m.to(tl.float32)
            x_nt = x_nt.to(tl.float32)
        acc = tl.dot(x_m, x_nt, acc)

    out = acc.to(a_ptr.dtype.element_ty)
    mask = (rows_m < M)[:, None] & (rows_n < M)[None, :]
    tl.store(a_ptr + rows_m[:, None] * M + rows_n[None, :], out, mask=mask)
    if tile_m != tile_n:
        # Mirror: A[rows_n, rows_m] = tile.T, stored row-major like the tile itself.
        mirror_mask = (rows_n < M)[:, None] & (rows_m < M)[None, :]
        tl.store(a_ptr + rows_n[:, None] * M + rows_m[None, :], tl.trans(out), mask=mirror_mask)


@torch.library.custom_op(f"{LIBRARY}::xxt", mutates_args=())
def xxt_forward(x: torch.Tensor) -> torch.Tensor:
    """Launch the X @ X.T kernel.

    Args:
        x: (M, K) or (batch, M, K), fp32, bf16 or fp16, any strides.
    Returns:
        (M, M) or (batch, M, M) X @ X.T in x's dtype, contiguous.
    """
    if x.ndim not in (2, 3):
        raise ValueError(f"xxt: want X of (M, K) or (batch, M, K), got {tuple(x.shape)}")
    check_launchable(x)
    batch, m, k = x.shape if x.ndim == 3 else (1, *x.shape)
    stride_b, stride_m, stride_k = x.stride() if x.ndim == 3 else (0, *x.stride())
    # Offsets inside one matrix are int32 (cheaper in the inner loop); across the batch int64.
    if (m - 1) * stride_m + (k - 1) * stride_k >= 2**31 or m * m >= 2**31:
        raise ValueError(f"xxt: a {m}x{k} matrix is too large for the kernel's int32 offsets; "
                         "split it (kernels/xxt.py)")
    a = empty((*x.shape[:-1], m), x.dtype, x.device)

    def grid(meta):
        n_tiles = triton.cdiv(m, meta["BLOCK_M"])
        return (n_tiles, n_tiles, batch)

    _xxt_kernel[grid](x, stride_b, stride_m, stride_k, a, m, k, CAST_FP32=INTERPRET)
    return a


@xxt_forward.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], x.shape[-2]))


def xxt_reference(x: torch.Tensor) -> torch.Tensor:
    """X @ X.T in plain torch (the full product)."""
    return x @ x.mT


def xxt(x: torch.Tensor) -> torch.Tensor:
    """X @ X.T for X of (M, K) or (batch, M, K), forward only. The upper-triangle kernel
    (backend "triton") or `xxt_reference` (backend "torch")."""
    if dispatch.get_backend() == "triton":
        return xxt_forward(x)
    return xxt_reference(x)
