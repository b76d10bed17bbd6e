"""The fixed evaluator: validation loss and bits per byte from the model's logits, and a
causality probe.

The loss is computed here, in fp32, from the logits the surface returns; the surface's
own loss is never trusted. It must never be given a way to see the validation tokens
except as inputs, and never run the model in training mode or with gradients.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Evaluation:
    loss: float  # mean cross-entropy in nats per token
    bpb: float | None  # bits per byte of the target text, when the byte table is known
    tokens: int


def _check_logits(logits: torch.Tensor, x: torch.Tensor, vocab_size: int) -> None:
    if logits.shape[:2] != x.shape or logits.size(-1) < vocab_size:
        raise ValueError(
            f"recipe.logits returned shape {tuple(logits.shape)} for input {tuple(x.shape)}; "
            f"expected (B, T, >= {vocab_size})"
        )


@torch.no_grad()
def evaluate(
    logits_fn: LogitsFn,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    vocab_size: int,
    device: torch.device,
    token_bytes: np.ndarray | None = None,
) -> Evaluation:
    """Mean loss over non-overlapping windows of `tokens` (each seq_len + 1 long)."""
    n_seq = (len(tokens) - 1) // seq_len
    if n_seq < 1:
        raise ValueError(f"{len(tokens)} validation tokens cannot fill one sequence of {seq_len}")
    data = torch.from_numpy(tokens[: n_seq * seq_len + 1].astype(np.int64))
    byte_table = None if token_bytes is None else torch.from_numpy(token_bytes.astype(np.int64))
    loss_sum, byte_sum, count = 0.0, 0, 0
    for start in range(0, n_seq, batch_size):
        rows = range(start, min(start + batch_size, n_seq))
        window = torch.stack([data[r * seq_len : (r + 1) * seq_len + 1] for r in rows])
        x, y = window[:, :-1].to(device), window[:, 1:].to(device)
        logits = logits_fn(x)
        _check_logits(logits, x, vocab_size)
        logits = logits[..., :vocab_size].float()
        loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
        if byte_table is not None:
            byte_sum += int(byte_table[window[:, 1:]].sum())
    loss = loss_sum / count
    if not math.isfinite(loss):
        raise FloatingPointError(f"validation loss is {loss}")
    bpb = loss_sum / math.log(2) / byte_sum if byte_sum else None
    return Evaluation(loss=loss, bpb=bpb, tokens=count)


@dataclass
class ProbeResult:
    causal: bool
    position: int  # tokens after this position were changed
    max_change: float  # largest change of a log-probability (nats) at or before the position
    tolerance: float


@torch.no_grad()
def causality_probe(
    logits_fn: LogitsFn,
    vocab_size: int,
    seq_len: int,
    device: torch.device,
    generator: torch.Generator,
    batch_size: int = 2,
) -> ProbeResult:
    """Change the tokens after a random position; the logits at or before it must not move.

    Positions and tokens are fresh for every call (drawn from `generator`), so a model
    cannot special-case the probe. The tolerance, in nats of log-probability, allows for
    reduced-precision arithmetic on accelerators, where the same prefix can round
    differently; real look-ahead moves log-probabilities by far more.
    """
    x = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    position = int(torch.randint(0, seq_len - 1, (1,), generator=generator))
    changed = x.clone()
    tail = changed[:, position + 1 :]
    # Every later token differs from the original one.
    offset = torch.randint(1, vocab_size, tail.shape, generator=generator)
    changed[:, position + 1 :] = (tail + offset) % vocab_size
    # Compared as log-probabilities, in nats: a constant added to every logit changes
    # nothing there, so it cannot widen the tolerance.
    before = logits_fn(x.to(device))[:, : position + 1, :vocab_size].float().log_softmax(-1)
    after = logits_fn(changed.to(device))[:, : position + 1, :vocab_size].float().log_softmax(-1)
    tolerance = 1e-4 if device.type == "cpu" else 2e-2
    max_change = (before - after).abs().max().item()
    return ProbeResult(
        causal=max_change <= tolerance,
        position=position,
        max_change=max_change,
        tolerance=tolerance,
    )
