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
    causal: bool  # no information reached where it must not
    position: int  # look-ahead: tokens after this position were changed; cross-row: this row
    max_change: float  # largest change of a log-probability (nats) where none may happen
    tolerance: float
    kind: str = "look-ahead"  # or "cross-row"


def _tolerance(device: torch.device) -> float:
    # Reduced-precision arithmetic on accelerators can round the same prefix differently;
    # real leaks move log-probabilities by far more.
    return 1e-4 if device.type == "cpu" else 2e-2


def _windows(tokens: np.ndarray, batch_size: int, seq_len: int, g: torch.Generator):
    """batch_size consecutive windows of real text from a fresh random offset, as evaluation
    batches are made (so neighbouring rows continue each other's text)."""
    span = batch_size * seq_len
    if len(tokens) < span:
        raise ValueError(f"{len(tokens)} tokens cannot fill a probe batch of {span}")
    start = int(torch.randint(0, len(tokens) - span + 1, (1,), generator=g))
    window = torch.from_numpy(tokens[start : start + span].astype(np.int64))
    return window.view(batch_size, seq_len)


def _changed(x: torch.Tensor, vocab_size: int, g: torch.Generator) -> torch.Tensor:
    """Every token of x replaced by a different one."""
    return (x + torch.randint(1, vocab_size, x.shape, generator=g)) % vocab_size


def _log_probs(logits_fn: LogitsFn, x: torch.Tensor, vocab_size: int, device) -> torch.Tensor:
    # Compared as log-probabilities, in nats: a constant added to every logit changes
    # nothing there, so it cannot widen the tolerance.
    return logits_fn(x.to(device))[..., :vocab_size].float().log_softmax(-1)


@torch.no_grad()
def causality_probe(
    logits_fn: LogitsFn,
    vocab_size: int,
    seq_len: int,
    device: torch.device,
    generator: torch.Generator,
    batch_size: int = 2,
    tokens: np.ndarray | None = None,
) -> ProbeResult:
    """Change the tokens after a random position; the logits at or before it must not move.

    The batch is random tokens, or real text from `tokens` (a fresh offset). Positions and
    tokens are fresh for every call (drawn from `generator`), so a model cannot
    special-case the probe.
    """
    if tokens is None:
        x = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    else:
        x = _windows(tokens, batch_size, seq_len, generator)
    position = int(torch.randint(0, seq_len - 1, (1,), generator=generator))
    changed = x.clone()
    changed[:, position + 1 :] = _changed(x[:, position + 1 :], vocab_size, generator)
    before = _log_probs(logits_fn, x, vocab_size, device)[:, : position + 1]
    after = _log_probs(logits_fn, changed, vocab_size, device)[:, : position + 1]
    tolerance = _tolerance(device)
    max_change = (before - after).abs().max().item()
    return ProbeResult(max_change <= tolerance, position, max_change, tolerance)


@torch.no_grad()
def cross_row_probe(
    logits_fn: LogitsFn,
    vocab_size: int,
    seq_len: int,
    device: torch.device,
    generator: torch.Generator,
    tokens: np.ndarray,
    batch_size: int = 4,
) -> ProbeResult:
    """Change one row of a real evaluation batch entirely; no other row may notice.

    Rows of an evaluation batch are consecutive windows of the same text, so a model that
    mixes rows (a batch statistic, attention across the batch) sees the future of one row
    in the next: the look-ahead probe, which changes every row the same way, can miss it.
    """
    x = _windows(tokens, batch_size, seq_len, generator)
    row = int(torch.randint(0, batch_size, (1,), generator=generator))
    changed = x.clone()
    changed[row] = _changed(x[row], vocab_size, generator)
    others = [r for r in range(batch_size) if r != row]
    before = _log_probs(logits_fn, x, vocab_size, device)[others]
    after = _log_probs(logits_fn, changed, vocab_size, device)[others]
    tolerance = _tolerance(device)
    max_change = (before - after).abs().max().item()
    return ProbeResult(max_change <= tolerance, row, max_change, tolerance, "cross-row")
