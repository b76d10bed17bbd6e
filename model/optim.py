"""Optimizers of the research surface: Muon for the hidden matrices, AdamW for the rest.

Muon (Keller Jordan et al., 2024) takes SGD-momentum's update and replaces it by the
nearest semi-orthogonal matrix, computed with a few Newton-Schulz iterations. The
iterations spend their time in X·Xᵀ products, which `kernels.xxt` computes as one
triangle mirrored. This Muon follows torch.optim.Muon's arithmetic (tests compare them),
so a change here is a deliberate experiment, not drift.
"""

import math

import torch

import kernels

# The quintic iteration's coefficients, chosen to maximise the slope at zero
# (Keller Jordan's Muon; also torch.optim.Muon's defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@torch.no_grad()
def newton_schulz(
    G: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Approximately orthogonalise G (..., rows, cols): returns ~U S' Vᵀ with S' near 1.

    Leading dimensions are a batch: same-shaped matrices are orthogonalised together.
    """
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide side: X Xᵀ is then the smaller Gram matrix
        X = X.mT
    # Spectral norm <= Frobenius norm: dividing by it puts every singular value in [0, 1].
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        A = kernels.xxt(X)  # (..., rows, rows), symmetric
        B = b * A + c * kernels.xxt(A)  # A @ A == A Aᵀ because A is symmetric
        X = a * X + B @ X
    return X.mT if transposed else X


class Muon(torch.optim.Optimizer):
    """Momentum, then orthogonalisation, for 2-D weights only.

    Args mirror torch.optim.Muon: lr, weight_decay (decoupled), momentum, nesterov,
    ns_steps; ns_dtype is the precision of the Newton-Schulz iterations.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D weights only, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                updates.append(p.grad.lerp(buf, momentum) if group["nesterov"] else buf)
            # Same-shaped matrices (every layer's qkv, say) share one batched iteration:
            # fewer, larger matmuls.
            by_shape: dict[torch.Size, list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault(p.shape, []).append(i)
            for shape, indices in by_shape.items():
                stacked = torch.stack([updates[i] for i in indices])
                ortho = newton_schulz(stacked, group["ns_steps"], dtype=group["ns_dtype"])
                # Tall matrices get a larger step so every shape moves at a similar RMS.
                scale = math.sqrt(max(1.0, shape[0] / shape[1]))
                for i, update in zip(indices, ortho):
                    p = params[i]
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(update.to(p.dtype), alpha=-lr * scale)
