"""The research surface's baseline: shapes, causality, initial loss, FLOPs, and our Muon
against torch.optim.Muon."""

import math

import pytest
import torch

import kernels
from model import build_recipe
from model.gpt import GPT, GPTConfig, padded_vocab
from model.optim import Muon, newton_schulz

SMALL = GPTConfig(vocab_size=100, seq_len=32, n_layer=2, n_head=2, n_embd=32)


def test_logits_shape_and_padded_vocab():
    model = GPT(SMALL)
    assert model.lm_head.out_features == padded_vocab(100) == 128
    logits = model(torch.randint(0, 100, (3, 17)))
    assert logits.shape == (3, 17, 100) and logits.dtype == torch.float32


def test_initial_loss_is_ln_vocab():
    model = GPT(SMALL)
    loss = model(torch.randint(0, 100, (4, 32)), torch.randint(0, 100, (4, 32)))
    # The zero-initialised head predicts uniformly over the padded vocabulary.
    assert loss.item() == pytest.approx(math.log(128), rel=1e-4)


def test_model_is_causal_after_training_steps():
    recipe = build_recipe("cpu-tiny", torch.device("cpu"), 100, compile=False)
    x = torch.randint(0, 100, (4, 64))
    for _ in range(3):
        recipe.train_step(x, torch.roll(x, -1, 1), 0.5)
    changed = x.clone()
    changed[:, 40:] = (changed[:, 40:] + 1) % 100
    before, after = recipe.logits(x), recipe.logits(changed)
    assert torch.equal(before[:, :40], after[:, :40])
    assert not torch.allclose(before[:, 40:], after[:, 40:])


def test_loss_falls_on_a_learnable_sequence():
    recipe = build_recipe("cpu-tiny", torch.device("cpu"), 100, compile=False)
    x = (torch.arange(64).repeat(8, 1) + torch.randint(0, 100, (8, 1))) % 100
    y = (x + 1) % 100
    first = recipe.train_step(x, y, 0.0).item()
    for i in range(1, 20):
        last = recipe.train_step(x, y, i / 20).item()
    assert last < 0.5 * first


def test_flops_per_token_counts_matmuls_and_attention():
    model = GPT(SMALL)
    c = SMALL
    per_layer = 4 * c.n_embd**2 + 2 * c.mlp_ratio * c.n_embd**2  # qkv + proj, fc + proj
    matmul_params = c.n_layer * per_layer + 128 * c.n_embd  # + head
    assert model.flops_per_token(32) == 6 * matmul_params + 12 * c.n_layer * c.n_embd * 32


def test_newton_schulz_orthogonalises():
    G = torch.randn(64, 16, dtype=torch.float64)
    X = newton_schulz(G, steps=5, dtype=torch.float32)
    singular = torch.linalg.svdvals(X.double())
    # The quintic iteration lands singular values in roughly [0.7, 1.2], not exactly 1.
    assert X.shape == G.shape
    assert singular.min() > 0.5 and singular.max() < 1.3


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")
@pytest.mark.parametrize("shape", [(32, 16), (16, 48), (24, 24)])
def test_muon_matches_torch_muon(shape):
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(shape))
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt_ours = Muon([ours], lr=0.02, weight_decay=0.01, momentum=0.9, ns_dtype=torch.bfloat16)
    opt_theirs = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.01, momentum=0.9)
    for _ in range(4):
        grad = torch.randn(shape)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        with kernels.use("torch"):
            opt_ours.step()
        opt_theirs.step()
    # Both orthogonalise in bf16: allow a few bf16 ulps of the update's scale.
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)
    assert not torch.equal(ours.detach(), torch.zeros(shape))


def test_muon_refuses_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.randn(5))])


def test_muon_momentum_warms_up_wherever_muon_is_in_the_list():
    """The schedule finds Muon by its type: a change that adds an optimizer in front of it
    must not warm up the wrong one's momentum (or fail on it)."""
    recipe = build_recipe("cpu-tiny", torch.device("cpu"), 64, compile=False)
    extra = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.5)
    recipe.optimizers.insert(0, extra)
    recipe._initial_lrs.insert(0, [0.1])
    recipe._set_schedules(0.0)
    (muon,) = [opt for opt in recipe.optimizers if isinstance(opt, Muon)]
    assert muon.param_groups[0]["momentum"] == pytest.approx(recipe.hp.muon_momentum[0])
    assert extra.param_groups[0]["momentum"] == 0.5
    recipe._set_schedules(1.0)
    assert muon.param_groups[0]["momentum"] == pytest.approx(recipe.hp.muon_momentum[1])
