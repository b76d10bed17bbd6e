"""The trusted evaluator: loss and bits per byte on logits with a known answer, and the twin
rows against forward passes that look ahead, mix rows, change as they are used, or behave
differently on what they take for a probe."""

import math

import numpy as np
import pytest
import torch

from bench.evaluator import EvalSet, evaluate
from bench.hardware import mfu, peak_flops

V = 50
CPU = torch.device("cpu")


def evalset(tokens, seq_len=16, batch=4, max_targets=10_000, token_bytes=None) -> EvalSet:
    return EvalSet(np.asarray(tokens), seq_len, batch, max_targets, V, token_bytes)


def run(forward, es: EvalSet, seed: int = 0):
    return evaluate(lambda x: forward(torch.from_numpy(x)), es, CPU,
                    np.random.default_rng(seed))


def text(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, n)


def test_rows_are_whole_batches_and_no_target_is_ever_an_input():
    es = evalset(text(1000), seq_len=10, batch=4, max_targets=75)
    # 75 targets at most: 7 rows of 10, rounded down to whole batches of 4.
    assert es.n_rows == 4 and es.targets == 40 and es.rows.shape == (4, 11)
    seen = []
    run(lambda x: seen.append(x.clone()) or torch.zeros(*x.shape, V), es)
    assert all(x.shape == (4, 10) for x in seen) and len(seen) == 2  # one batch, one of twins
    real = {tuple(r) for r in es.rows[:, :-1].tolist()}
    assert {tuple(r) for r in seen[0].tolist()} == real
    # Rows lie back to back, 11 tokens each: a row's last target (its 11th token) is never
    # an input, not of its own row nor of the next, which starts after it.
    assert (es.rows == np.asarray(text(1000))[:44].reshape(4, 11)).all()


def test_uniform_logits_give_ln_vocab():
    ev = run(lambda x: torch.zeros(*x.shape, V), evalset(text(2000), max_targets=1000))
    assert ev.tokens == 960 and ev.loss == pytest.approx(math.log(V), rel=1e-6)
    assert ev.twins.ok and ev.twins.n == 4


def test_loss_of_a_known_predictor_and_bits_per_byte():
    # Probability p on the true next token, which this "model" knows: the text is the
    # progression t -> t + 1 (mod V), so a row's next token is its last input plus one.
    p = 0.9
    tokens = np.arange(2000) % V

    def predictor(x):
        logits = torch.full((*x.shape, V), math.log((1 - p) / (V - 1)))
        return logits.scatter(-1, ((x + 1) % V).unsqueeze(-1), math.log(p))

    byte_lengths = np.random.default_rng(1).integers(1, 5, size=V)
    es = evalset(tokens, seq_len=20, batch=3, max_targets=400, token_bytes=byte_lengths)
    ev = run(predictor, es)
    assert ev.loss == pytest.approx(-math.log(p), rel=1e-5)
    expected_bpb = -math.log(p) * es.targets / math.log(2) / byte_lengths[es.rows[:, 1:]].sum()
    assert ev.bpb == pytest.approx(expected_bpb, rel=1e-5)


def test_padded_vocabulary_is_cut_and_bad_shapes_are_refused():
    es = evalset(text(500))
    assert run(lambda x: torch.zeros(*x.shape, V + 14), es).loss == pytest.approx(math.log(V))
    with pytest.raises(ValueError, match="expected"):
        run(lambda x: torch.zeros(x.size(0), V), es)
    with pytest.raises(ValueError, match="expected"):
        run(lambda x: torch.zeros(*x.shape, V - 1), es)


def test_non_finite_loss_is_an_error():
    with pytest.raises(FloatingPointError):
        run(lambda x: torch.full((*x.shape, V), float("nan")), evalset(text(500)))


def test_a_split_too_short_or_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="not one evaluation row"):
        evalset(text(10), seq_len=16)
    bad = text(500)
    bad[123] = V + 3
    with pytest.raises(ValueError, match=f"token id {V + 3}, outside the vocabulary of {V}"):
        evalset(bad)


class Bigram(torch.nn.Module):
    """Logits at t from token t (causal) or, when peeking, from token t + peek too."""

    def __init__(self, peek: int = 0, every: int = 1):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(V, V)
        self.peek, self.every = peek, every

    def forward(self, x):
        logits = self.table(x)
        if self.peek:
            future = self.table(torch.roll(x, -self.peek, dims=1))
            cheat = torch.zeros(x.shape[1], 1)
            cheat[:: self.every] = 1.0  # only some positions look ahead
            logits = logits + cheat * future
        return logits


def caught(forward, runs: int = 5, **kw) -> int:
    """How many of `runs` evaluations (fresh twins each) the twins failed."""
    es = evalset(text(4000), seq_len=32, batch=8, **kw)
    return sum(not run(forward, es, seed).twins.ok for seed in range(runs))


def test_an_honest_model_passes_exactly_with_fresh_twins():
    es = evalset(text(4000), seq_len=32, batch=8)
    results = [run(Bigram(), es, seed).twins for seed in range(3)]
    assert all(t.ok and t.max_change == 0.0 and t.n == 8 for t in results)
    assert len({t.positions for t in results}) > 1  # fresh split points every evaluation


@pytest.mark.parametrize("peek, every", [(1, 1), (5, 1), (1, 4)])
def test_looking_ahead_is_caught(peek, every):
    assert caught(Bigram(peek, every)) == 5


def test_rows_that_see_each_other_are_caught():
    """Causal within a row, but every row hears the batch's mean: the twin's batch is a
    different set of rows, so its shared prefix scores differently."""
    honest = Bigram()
    assert caught(lambda x: honest(x) + 0.5 * honest(x).mean(0, keepdim=True)) == 5


def test_a_forward_pass_that_changes_as_it_is_used_is_caught():
    """One that learns from the rows it is shown (here: drifts a little with every call)."""
    honest, calls = Bigram(), [0]

    def learner(x):
        calls[0] += 1
        return honest(x) + 1e-3 * calls[0] * (x.unsqueeze(-1) == torch.arange(V)).float()

    assert caught(learner) == 5


def test_cheating_only_on_rows_it_has_not_seen_before_is_caught():
    """A forward pass that remembers rows and looks ahead only on the first sight of a
    prefix (so a repeat, which it may take for a probe, is honest): the twin repeats the
    original's prefix and so meets the honest branch."""
    honest, cheat, seen = Bigram(), Bigram(peek=1), set()

    def first_sight_cheater(x):
        out = []
        for row in x:
            key = tuple(row[:4].tolist())
            out.append((honest if key in seen else cheat)(row[None])[0])
            seen.add(key)
        return torch.stack(out)

    assert caught(first_sight_cheater) == 5


def test_the_twin_batch_cannot_be_told_by_its_shape():
    """A forward pass that looks ahead only on batches of the evaluation's shape (probes of
    another shape never saw it): twins have that shape, and at each twin's split the
    look-ahead sees another next token than the original did."""
    cheat, honest = Bigram(peek=1), Bigram()
    assert caught(lambda x: cheat(x) if x.shape == (8, 32) else honest(x)) == 5


def test_mfu_from_the_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("Some Unknown GPU") is None
    assert mfu(6e8, 1e6, "NVIDIA H100 80GB HBM3") == pytest.approx(6e14 / 989e12)
    assert mfu(6e8, 1e6, None) is None
