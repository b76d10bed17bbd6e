"""The trusted evaluator: validation loss and bits per byte, computed here from the logits
that the candidate's forward pass returns for input batches, with twin rows that check the
forward pass could not see the future.

The evaluation slice is cut into rows of seq_len + 1 tokens, one after another: a row's
inputs are its first seq_len tokens and its targets its last seq_len, so the target of a
row's last position is a token that no row ever has as an input. Each evaluation sends the
rows in a fresh random order, in full batches of one shape, and then one more batch of
twins: rows that repeat a real row up to a random position p and continue with another
row's text. A forward pass that is a function of each row's past alone gives a twin the
same log-probabilities as its original at every position up to p; one that looks ahead,
mixes rows, learns from what it was shown, or behaves differently as the evaluation goes
on, does not. Twins come last, have the shape of every other batch and real text in them,
so nothing tells the forward pass which batches are scored and which are checked.

This module must never send a target to the forward pass, trust a loss it did not compute,
or let the forward pass choose which rows are scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

# (B, T) token ids -> float32 logits (B, T, >= vocab) on the evaluator's device
ForwardFn = Callable[[np.ndarray], torch.Tensor]
COMPARED_IDS = 31  # vocabulary ids compared per twin position, besides the true next token


@dataclass
class TwinCheck:
    n: int  # twin rows checked
    positions: int  # positions compared, over all twins
    max_change: float  # largest change of a compared log-probability (nats)
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_change <= self.tolerance

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


@dataclass
class Evaluation:
    loss: float  # mean cross-entropy in nats per target token
    bpb: float | None  # bits per byte of the target text, when the byte table is known
    tokens: int  # target tokens scored
    twins: TwinCheck


class EvalSet:
    """The rows of one split's evaluation slice, and what each target token is worth in
    bytes. Rows are fixed by the split and the preset alone; their order is drawn anew for
    every evaluation."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, max_targets: int,
                 vocab_size: int, token_bytes: np.ndarray | None = None, name: str = "val"):
        rows = min(max_targets // seq_len, len(tokens) // (seq_len + 1))
        if rows < 1:
            raise ValueError(
                f"the {name} split has {len(tokens)} tokens: not one evaluation row of "
                f"{seq_len + 1}; prepare a larger corpus"
            )
        self.batch_size = min(batch_size, rows)
        rows -= rows % self.batch_size
        data = np.asarray(tokens[: rows * (seq_len + 1)], dtype=np.int64)
        self.rows = data.reshape(rows, seq_len + 1)
        if self.rows.max() >= vocab_size or self.rows.min() < 0:
            bad = int(self.rows.max() if self.rows.max() >= vocab_size else self.rows.min())
            raise ValueError(f"the {name} split holds token id {bad}, outside the vocabulary "
                             f"of {vocab_size}: rebuild the dataset")
        self.seq_len, self.vocab_size, self.name = seq_len, vocab_size, name
        self.token_bytes = None if token_bytes is None else np.asarray(token_bytes, np.int64)

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    @property
    def targets(self) -> int:
        return self.n_rows * self.seq_len


def tolerance(device: torch.device) -> float:
    # The same row in another batch goes through the same kernels on the same shapes; on
    # accelerators reduced precision may still round a row differently. Real leaks move
    # log-probabilities by far more than either.
    return 1e-4 if device.type == "cpu" else 2e-2


@torch.no_grad()
def evaluate(forward: ForwardFn, evalset: EvalSet, device: torch.device,
             generator: np.random.Generator) -> Evaluation:
    """Score every row once through `forward`, then check the twins."""
    V, T, B = evalset.vocab_size, evalset.seq_len, evalset.batch_size
    order = generator.permutation(evalset.n_rows)
    n_twins = B if evalset.n_rows > 1 else 0
    sources = generator.choice(evalset.n_rows, size=n_twins, replace=False)
    splits = generator.integers(0, max(T - 1, 1), size=n_twins)  # p <= T - 2: a suffix differs
    compared = _compared_ids(evalset, sources, splits, generator)
    kept: dict[int, torch.Tensor] = {}  # source row -> its compared log-probs, up to p
    loss_sum, count = 0.0, 0
    for start in range(0, evalset.n_rows, B):
        rows = order[start : start + B]
        x = evalset.rows[rows, :-1]
        y = torch.from_numpy(evalset.rows[rows, 1:]).to(device)
        logits, lse = _scored(forward, x, V, device)
        loss_sum -= (logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse).sum().item()
        count += y.numel()
        for i, row in enumerate(rows):
            where = np.flatnonzero(sources == row)
            if where.size:
                k = int(where[0])
                p = int(splits[k])
                ids = compared[k][: p + 1].to(device)
                kept[k] = logits[i, : p + 1].gather(-1, ids) - lse[i, : p + 1, None]
    loss = loss_sum / count
    if not math.isfinite(loss):
        raise FloatingPointError(f"{evalset.name} loss is {loss}")
    bpb = None
    if evalset.token_bytes is not None:
        nbytes = int(evalset.token_bytes[evalset.rows[:, 1:]].sum())
        bpb = loss_sum / math.log(2) / nbytes if nbytes else None
    twins = _check_twins(forward, evalset, sources, splits, compared, kept, device, generator)
    return Evaluation(loss=loss, bpb=bpb, tokens=count, twins=twins)


def _compared_ids(evalset: EvalSet, sources, splits, g: np.random.Generator) -> list:
    """Per twin, per position up to its split: the true next token and COMPARED_IDS others."""
    out = []
    V = evalset.vocab_size
    for row, p in zip(sources, splits):
        nxt = evalset.rows[row, 1 : p + 2][:, None]
        others = g.integers(0, V, size=(p + 1, min(COMPARED_IDS, V)))
        out.append(torch.from_numpy(np.concatenate([nxt, others], axis=1)))
    return out


def _check_twins(forward, evalset, sources, splits, compared, kept, device, g) -> TwinCheck:
    tol = tolerance(device)
    if len(sources) == 0:
        return TwinCheck(0, 0, 0.0, tol)
    n = evalset.n_rows
    donors = (sources + g.integers(1, n, size=len(sources))) % n  # another row, never itself
    x = evalset.rows[sources, :-1].copy()
    for i, (p, donor) in enumerate(zip(splits, donors)):
        x[i, p + 1 :] = evalset.rows[donor, p + 1 : -1]
    logits, lse = _scored(forward, x, evalset.vocab_size, device)
    worst, positions = 0.0, 0
    for i, p in enumerate(splits):
        ids = compared[i][: p + 1].to(device)
        again = logits[i, : p + 1].gather(-1, ids) - lse[i, : p + 1, None]
        change = (again - kept[i]).abs().max().item()
        worst = max(worst, change) if math.isfinite(change) else math.inf
        positions += int(p) + 1
    return TwinCheck(len(sources), positions, worst, tol)


def _scored(forward: ForwardFn, x: np.ndarray, vocab_size: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of x cut to the vocabulary, in fp32, and their log-sum-exp per position:
    log-probabilities are logit - lse (in nats; a constant added to every logit changes
    nothing), without writing out a whole (B, T, V) log-softmax."""
    logits = forward(x)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != x.shape or logits.size(-1) < vocab_size:
        raise ValueError(
            f"the forward pass returned logits of shape {tuple(logits.shape)} for input "
            f"{x.shape}; expected (B, T, >= {vocab_size})"
        )
    logits = logits[..., :vocab_size].to(device, torch.float32)
    return logits, torch.logsumexp(logits, dim=-1)
