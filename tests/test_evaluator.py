"""The fixed evaluator: loss and bits per byte on logits with a known answer, and the
causality probe against a model that looks ahead."""

import math

import numpy as np
import pytest
import torch

from bench.evaluator import causality_probe, cross_row_probe, evaluate
from bench.hardware import mfu, peak_flops

V = 50


def uniform_logits(x):
    return torch.zeros(*x.shape, V)


def test_uniform_logits_give_ln_vocab():
    tokens = np.random.randint(0, V, size=1001)
    ev = evaluate(
        uniform_logits, tokens, seq_len=10, batch_size=7, vocab_size=V, device=torch.device("cpu")
    )
    assert ev.tokens == 1000
    assert ev.loss == pytest.approx(math.log(V), rel=1e-6)


def test_loss_of_a_known_predictor_and_bits_per_byte():
    # A "model" that puts probability p on the true next token, which it can know because
    # the sequence is the arithmetic progression t -> t + 1 (mod V).
    p = 0.9
    tokens = np.arange(401) % V

    def predictor(x):
        logits = torch.full((*x.shape, V), math.log((1 - p) / (V - 1)))
        logits.scatter_(-1, ((x + 1) % V).unsqueeze(-1), math.log(p))
        return logits

    byte_lengths = np.random.randint(1, 5, size=V)
    ev = evaluate(predictor, tokens, 20, 3, V, torch.device("cpu"), token_bytes=byte_lengths)
    assert ev.loss == pytest.approx(-math.log(p), rel=1e-5)
    targets = tokens[1:401]
    expected_bpb = -math.log(p) * len(targets) / math.log(2) / byte_lengths[targets].sum()
    assert ev.bpb == pytest.approx(expected_bpb, rel=1e-5)


def test_padded_vocabulary_is_cut_and_bad_shapes_are_refused():
    tokens = np.random.randint(0, V, size=101)
    padded = evaluate(
        lambda x: torch.zeros(*x.shape, V + 14), tokens, 10, 4, V, torch.device("cpu")
    )
    assert padded.loss == pytest.approx(math.log(V), rel=1e-6)
    with pytest.raises(ValueError, match="expected"):
        evaluate(lambda x: torch.zeros(x.size(0), V), tokens, 10, 4, V, torch.device("cpu"))


def test_non_finite_loss_is_an_error():
    tokens = np.random.randint(0, V, size=101)
    with pytest.raises(FloatingPointError):
        evaluate(
            lambda x: torch.full((*x.shape, V), float("nan")), tokens, 10, 4, V, torch.device("cpu")
        )


class Bigram(torch.nn.Module):
    """Logits at t from token t (causal) or, when peeking, from token t + 1 too."""

    def __init__(self, peek: int = 0):
        super().__init__()
        self.table = torch.nn.Embedding(V, V)
        self.peek = peek

    def forward(self, x):
        logits = self.table(x)
        if self.peek:
            future = torch.roll(x, -self.peek, dims=1)  # token t + peek at position t
            logits = logits + self.table(future)
        return logits


@pytest.mark.parametrize("peek", [1, 5])
def test_probe_catches_a_model_that_looks_ahead(peek):
    caught = sum(
        not causality_probe(
            Bigram(peek), V, 64, torch.device("cpu"), torch.Generator().manual_seed(s)
        ).causal
        for s in range(10)
    )
    # Look-ahead by `peek` escapes only when the changed tail starts too late to be seen.
    assert caught >= 8


def test_probe_passes_a_causal_model_and_draws_fresh_positions():
    model = Bigram(0)
    results = [
        causality_probe(model, V, 64, torch.device("cpu"), torch.Generator().manual_seed(s))
        for s in range(5)
    ]
    assert all(r.causal and r.max_change == 0.0 for r in results)
    assert len({r.position for r in results}) > 1


def test_mfu_from_the_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("Some Unknown GPU") is None
    assert mfu(6e8, 1e6, "NVIDIA H100 80GB HBM3") == pytest.approx(6e14 / 989e12)
    assert mfu(6e8, 1e6, None) is None


class BatchMixer(Bigram):
    """Causal within a row, but adds the batch's mean logits: rows see each other."""

    def forward(self, x):
        logits = self.table(x)
        return logits + 0.5 * logits.mean(0, keepdim=True)


def test_the_cross_row_probe_catches_rows_that_see_each_other():
    text = np.random.default_rng(0).integers(0, V, 4000).astype(np.uint16)
    cpu = torch.device("cpu")
    mixer, honest = BatchMixer(), Bigram(0)
    for s in range(5):
        # The look-ahead probe changes every row alike after a position: the mixer passes it.
        assert causality_probe(
            mixer, V, 64, cpu, torch.Generator().manual_seed(s), tokens=text
        ).causal
        caught = cross_row_probe(mixer, V, 64, cpu, torch.Generator().manual_seed(s), text)
        assert not caught.causal and caught.kind == "cross-row" and caught.max_change > 1e-3
        passed = cross_row_probe(honest, V, 64, cpu, torch.Generator().manual_seed(s), text)
        assert passed.causal and passed.max_change == 0.0


def test_the_probes_on_real_text_draw_fresh_windows():
    text = np.arange(5000, dtype=np.uint16) % V
    seen = []
    probe = lambda x: seen.append(x.clone()) or Bigram(0)(x)  # noqa: E731
    for s in range(3):
        causality_probe(probe, V, 32, torch.device("cpu"), torch.Generator().manual_seed(s),
                        tokens=text)  # fmt: skip
    firsts = {int(x[0, 0]) for x in seen[::2]}
    assert len(firsts) == 3  # a fresh offset into the text each call
    # Rows are consecutive windows of the text, as in an evaluation batch.
    assert torch.equal(seen[0][1, 0], (seen[0][0, -1] + 1) % V)
