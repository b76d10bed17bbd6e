"""Cross-entropy over logits, with an optional tanh soft-cap, fused forward and backward.

    z = softcap * tanh(logits / softcap)          (when softcap is given)
    loss = mean over rows with target != ignore_index of (logsumexp(z) - z[target])

The forward streams each row once (online logsumexp) and saves one fp32 logsumexp per
row; the backward streams the row again and writes

    dlogits = (softmax(z) - onehot(target)) * dz/dlogits * grad_loss / n_valid

so softmax is never a tensor of its own. The same row pass can also run in place inside
the forward (`cross_entropy_rows(..., grad_scale=...)`), turning a logits buffer into its
own gradient: that is what the chunked linear + cross-entropy (kernels/linear_cross_entropy.py)
does, as in Liger-Kernel. Rows are streamed in BLOCK_SIZE pieces, so any vocabulary fits.

tanh is computed as 2 * sigmoid(2u) - 1 (no libdevice, for triton 3.6 to 3.9).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import dispatch
from .utils import LIBRARY, autotune_configs, check_launchable, empty

_CONFIGS = autotune_configs(
    gpu=[
        triton.Config({"BLOCK_SIZE": 2048}, num_warps=8),
        triton.Config({"BLOCK_SIZE": 4096}, num_warps=8),
        triton.Config({"BLOCK_SIZE": 8192}, num_warps=16),
        triton.Config({"BLOCK_SIZE": 16384}, num_warps=32),
    ],
    interpret=triton.Config({"BLOCK_SIZE": 128}),
)


@triton.jit
def _softcap(z, softcap):
    """softcap * tanh(z / softcap), with tanh(u) = 2 * sigmoid(2u) - 1."""
    return softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)


@triton.jit
def _write_grad_row(
    logits_row_ptr,  # (n_cols,) this row's logits
    grad_row_ptr,  # (n_cols,) this row's gradient out; may equal logits_row_ptr (in place)
    target,  # this row's target class
    lse,  # fp32 logsumexp of this row's (capped) logits
    scale,  # fp32 d(loss)/d(row loss); 0 for an ignored row, which writes zeros
    n_cols,  # row length (vocabulary size)
    softcap,  # cap of the tanh soft-cap; not read when HAS_SOFTCAP is False
    HAS_SOFTCAP: tl.constexpr,  # apply the soft-cap
    BLOCK_SIZE: tl.constexpr,  # columns per step
):
    # Each element is read then written by the same step, so in place is safe.
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        z = tl.load(logits_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = _softcap(z, softcap)
        grad = (tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
        if HAS_SOFTCAP:
            tanh = z / softcap
            grad = grad * (1.0 - tanh * tanh)
        tl.store(grad_row_ptr + cols, grad.to(grad_row_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_CONFIGS, key=["n_cols", "HAS_SOFTCAP", "WRITE_GRAD"],
                 restore_value=["logits_ptr"])
@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr,  # (n_rows, n_cols) logits, any float dtype; overwritten when WRITE_GRAD
    logits_row_stride,  # elements between the starts of two rows of logits
    targets_ptr,  # (n_rows,) integer targets
    loss_ptr,  # (n_rows,) fp32 output: loss of each row, 0 for ignored rows
    lse_ptr,  # (n_rows,) fp32 output: logsumexp of each row's (capped) logits
    grad_scale_ptr,  # () fp32: d(loss)/d(row loss); only read when WRITE_GRAD
    n_cols,  # row length (vocabulary size)
    ignore_index,  # target value of rows without a loss
    softcap,  # cap of the tanh soft-cap; not read when HAS_SOFTCAP is False
    HAS_SOFTCAP: tl.constexpr,  # apply the soft-cap
    WRITE_GRAD: tl.constexpr,  # then overwrite the logits with their gradient
    BLOCK_SIZE: tl.constexpr,  # columns per step (autotuned)
):
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2**31 for large batches
    row_ptr = logits_ptr + row * logits_row_stride
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index

    # Online logsumexp: running max m and sum s of exp(z - m), one read of the row.
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            z = tl.where(mask, _softcap(z, softcap), float("-inf"))  # the cap maps -inf to -cap
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    # Targets outside [0, n_cols) other than ignore_index are the caller's bug (torch raises);
    # the mask only keeps this read inside the row.
    in_row = (target >= 0) & (target < n_cols)
    z_target = tl.load(row_ptr + target, mask=in_row, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z_target = _softcap(z_target, softcap)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - z_target))
    tl.store(lse_ptr + row, lse)

    if WRITE_GRAD:
        scale = tl.where(ignored, 0.0, tl.load(grad_scale_ptr))
        _write_grad_row(row_ptr, row_ptr, target, lse, scale, n_cols, softcap,
                        HAS_SOFTCAP, BLOCK_SIZE)


@triton.autotune(configs=_CONFIGS, key=["n_cols", "HAS_SOFTCAP"])
@triton.jit
def _cross_entropy_bwd_kernel(
    logits_ptr,  # (n_rows, n_cols) the forward's logits
    logits_row_stride,  # elements between the starts of two rows of logits
    targets_ptr,  # (n_rows,) integer targets
    lse_ptr,  # (n_rows,) fp32 logsumexp saved by the forward
    grad_scale_ptr,  # () fp32: grad_loss / n_valid
    grad_ptr,  # (n_rows, n_cols) output: gradient of the logits, contiguous
    n_cols,  # row length (vocabulary size)
    ignore_index,  # target value of rows without a loss
    softcap,  # cap of the tanh soft-cap; not read when HAS_SOFTCAP is False
    HAS_SOFTCAP: tl.constexpr,  # the forward applied the soft-cap
    BLOCK_SIZE: tl.constexpr,  # columns per step (autotuned)
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    scale = tl.where(target == ignore_index, 0.0, tl.load(grad_scale_ptr))
    _write_grad_row(logits_ptr + row * logits_row_stride, grad_ptr + row * n_cols, target,
                    tl.load(lse_ptr + row), scale, n_cols, softcap, HAS_SOFTCAP, BLOCK_SIZE)


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy: want logits (N, V) and targets (N,), got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}; flatten the batch and time dims first"
        )
    if logits.stride(-1) != 1:
        raise ValueError("cross_entropy: the last dim of logits must be contiguous")
    check_launchable(logits, targets)


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None,
    ignore_index: int,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: the loss of every row, optionally its gradient in place.

    Args:
        logits: (N, V) logits, any float dtype, last dim contiguous.
        targets: (N,) integer targets in [0, V), or ignore_index.
        softcap: cap of the tanh soft-cap, or None.
        ignore_index: target value of rows that have no loss (and a zero gradient).
        grad_scale: None, or a () fp32 tensor s: then logits is overwritten with
            s * d(row loss)/d(logits), in its own dtype.
    Returns:
        loss: (N,) fp32 loss per row, 0 on ignored rows.
        lse: (N,) fp32 logsumexp per row of the (capped) logits.
    """
    _check(logits, targets)
    n_rows, n_cols = logits.shape
    loss = empty((n_rows,), torch.float32, logits.device)
    lse = empty((n_rows,), torch.float32, logits.device)
    _cross_entropy_fwd_kernel[(n_rows,)](
        logits, logits.stride(0), targets, loss, lse,
        lse if grad_scale is None else grad_scale,
        n_cols, ignore_index, 1.0 if softcap is None else softcap,
        HAS_SOFTCAP=softcap is not None, WRITE_GRAD=grad_scale is not None,
    )
    return loss, lse


@torch.library.custom_op(f"{LIBRARY}::cross_entropy_fwd", mutates_args=())
def cross_entropy_forward(
    logits: torch.Tensor, targets: torch.Tensor, softcap: float | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the rows whose target is not ignore_index.

    Args: as `cross_entropy_rows`, without grad_scale.
    Returns:
        loss: () fp32 mean loss (nan when every row is ignored, as in torch).
        lse: (N,) fp32 logsumexp per row, for `cross_entropy_backward`.
    """
    row_loss, lse = cross_entropy_rows(logits, targets, softcap, ignore_index)
    return row_loss.sum() / (targets != ignore_index).sum(), lse


@cross_entropy_forward.register_fake
def _(logits, targets, softcap, ignore_index):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty(
        logits.shape[:1], dtype=torch.float32
    )


@torch.library.custom_op(f"{LIBRARY}::cross_entropy_bwd", mutates_args=())
def cross_entropy_backward(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    softcap: float | None,
    ignore_index: int,
) -> torch.Tensor:
    """Launch the backward kernel.

    Args:
        grad_loss: () gradient of the mean loss.
        logits, targets, softcap, ignore_index: as given to `cross_entropy_forward`.
        lse: (N,) fp32, from `cross_entropy_forward`.
    Returns:
        (N, V) gradient of the logits, in their dtype, contiguous.
    """
    _check(logits, targets)
    n_rows, n_cols = logits.shape
    grad_scale = grad_loss.float() / (targets != ignore_index).sum()
    grad = empty((n_rows, n_cols), logits.dtype, logits.device)
    _cross_entropy_bwd_kernel[(n_rows,)](
        logits, logits.stride(0), targets, lse, grad_scale, grad,
        n_cols, ignore_index, 1.0 if softcap is None else softcap,
        HAS_SOFTCAP=softcap is not None,
    )
    return grad


@cross_entropy_backward.register_fake
def _(grad_loss, logits, targets, lse, softcap, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, softcap, ignore_index):
        loss, lse = cross_entropy_forward(logits, targets, softcap, ignore_index)
        ctx.save_for_backward(logits, targets, lse)
        ctx.softcap, ctx.ignore_index = softcap, ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        grad = cross_entropy_backward(grad_loss, logits, targets, lse, ctx.softcap,
                                      ctx.ignore_index)
        return grad, None, None, None


def cross_entropy_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = None,
    ignore_index: int = -1,
) -> torch.Tensor:
    """Cross-entropy in plain torch, in fp32: the definition the kernels are checked against."""
    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, targets, ignore_index=ignore_index)


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = None,
    ignore_index: int = -1,
) -> torch.Tensor:
    """Mean cross-entropy of (N, V) logits against (N,) targets, as a () fp32 tensor.

    softcap: if given, logits are first capped to softcap * tanh(logits / softcap).
    Rows whose target is ignore_index count neither in the loss nor in the mean.
    The kernels (backend "triton") or `cross_entropy_reference` (backend "torch").
    """
    if dispatch.get_backend() == "triton":
        return CrossEntropyFunction.apply(logits, targets, softcap, ignore_index)
    return cross_entropy_reference(logits, targets, softcap, ignore_index)
