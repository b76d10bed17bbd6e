"""Linear layer + cross-entropy that never holds the full (N, V) logits.

    loss = cross_entropy(x @ weight.T, targets, softcap)

The forward walks the rows of x in chunks. Per chunk: logits = x_chunk @ weight.T with a
torch matmul (cuBLAS is hard to beat), the cross-entropy kernel turns those logits in
place into their gradient (kernels/cross_entropy.py), and two more matmuls accumulate
grad_x and grad_weight. So the forward computes the gradients (as Liger-Kernel's fused
linear cross-entropy does) and the backward only scales them by grad_loss. Peak extra
memory is one (chunk, V) logits buffer (CHUNK_LOGITS_BYTES by default) plus an fp32
(V, D) grad_weight accumulator.

The matmuls run in x's dtype (weight is cast to it: an fp32 master weight with bf16
activations works); grad_weight is accumulated in fp32 and returned in weight's dtype.
"""

import torch

from . import dispatch
from .cross_entropy import cross_entropy_reference, cross_entropy_rows
from .utils import LIBRARY

# Default chunk: its logits take at most this many bytes. Each chunk also costs a pass over
# the fp32 (V, D) grad_weight accumulator, so fewer, larger chunks are faster; 1 GiB is
# 8192 rows of a 50304-token vocabulary in bf16, a quarter of the logits of 32k tokens.
CHUNK_LOGITS_BYTES = 2**30


def default_chunk_size(n_rows: int, vocab_size: int, itemsize: int) -> int:
    """Rows per chunk: a power of two whose logits fit CHUNK_LOGITS_BYTES, at most n_rows."""
    rows = max(1, CHUNK_LOGITS_BYTES // (vocab_size * itemsize))
    return min(n_rows, 2 ** (rows.bit_length() - 1))


@torch.library.custom_op(f"{LIBRARY}::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None,
    ignore_index: int,
    chunk_size: int | None,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and, if compute_grad, the gradients of x and weight for a grad_loss of 1.

    Args:
        x: (N, D) inputs.
        weight: (V, D) classifier weight.
        targets: (N,) integer targets in [0, V), or ignore_index.
        softcap: cap of the tanh soft-cap on the logits, or None.
        ignore_index: target value of rows without a loss.
        chunk_size: rows per chunk; None picks `default_chunk_size`.
        compute_grad: also compute the gradients (False under no_grad saves two matmuls).
    Returns:
        loss: () fp32 mean loss over non-ignored rows.
        grad_x: (N, D) in x's dtype; empty when not compute_grad.
        grad_weight: (V, D) in weight's dtype; empty when not compute_grad.
    """
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: want x (N, D) and weight (V, D), got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    n_rows, vocab_size = x.shape[0], weight.shape[0]
    chunk_size = chunk_size or default_chunk_size(n_rows, vocab_size, x.element_size())
    w = weight.to(x.dtype)
    n_valid = (targets != ignore_index).sum()
    grad_scale = 1.0 / n_valid.float()  # d(mean loss)/d(row loss), stays on the device
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if compute_grad:
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)

    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        x_chunk = x[start:end]
        logits = x_chunk @ w.T  # (chunk, V)
        loss, _ = cross_entropy_rows(logits, targets[start:end], softcap, ignore_index,
                                     grad_scale=grad_scale if compute_grad else None)
        row_loss[start:end] = loss
        if compute_grad:  # `logits` now holds d(loss)/d(logits)
            torch.mm(logits, w, out=grad_x[start:end])
            grad_w += logits.T @ x_chunk

    loss = row_loss.sum() / n_valid
    if not compute_grad:
        return loss, x.new_empty(0), weight.new_empty(0)
    return loss, grad_x, grad_w.to(weight.dtype)


@linear_cross_entropy_forward.register_fake
def _(x, weight, targets, softcap, ignore_index, chunk_size, compute_grad):
    loss = x.new_empty((), dtype=torch.float32)
    if not compute_grad:
        return loss, x.new_empty(0), weight.new_empty(0)
    return loss, torch.empty_like(x), torch.empty_like(weight)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, softcap, ignore_index, chunk_size):
        compute_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, grad_x, grad_w = linear_cross_entropy_forward(
            x, weight, targets, softcap, ignore_index, chunk_size, compute_grad
        )
        ctx.save_for_backward(grad_x, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        grad_x = grad_x * grad_loss if ctx.needs_input_grad[0] else None
        grad_w = grad_w * grad_loss if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None, None, None


def linear_cross_entropy_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -1,
) -> torch.Tensor:
    """The full-logits definition: cross_entropy_reference(x @ weight.T, ...). chunk_size is
    accepted for the same signature and unused."""
    return cross_entropy_reference(x @ weight.to(x.dtype).T, targets, softcap, ignore_index)


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -1,
) -> torch.Tensor:
    """Mean cross-entropy of the logits x @ weight.T against targets, a () fp32 tensor.

    x: (N, D); weight: (V, D); targets: (N,). softcap and ignore_index as in
    kernels.cross_entropy. The chunked kernel path (backend "triton") never holds the
    (N, V) logits; `linear_cross_entropy_reference` (backend "torch") does.
    """
    if dispatch.get_backend() == "triton":
        return LinearCrossEntropyFunction.apply(x, weight, targets, softcap, ignore_index,
                                                chunk_size)
    return linear_cross_entropy_reference(x, weight, targets, softcap, chunk_size, ignore_index)
