"""Cross-entropy kernels vs the fp32 reference: the fused loss over logits, and the chunked
linear + cross-entropy, with and without the soft-cap and ignored rows."""

import importlib

import pytest
import torch

from bench.kernel_testing import TOLERANCES, Tolerance, assert_runs_close, compare_backends
from kernels import cross_entropy, linear_cross_entropy, use

linear_ce_module = importlib.import_module("kernels.linear_cross_entropy")

DTYPES = [torch.float32, torch.bfloat16]
SOFTCAPS = [None, 15.0]


def _targets(n_rows, vocab_size, device, n_ignored=1):
    targets = torch.randint(0, vocab_size, (n_rows,), device=device)
    targets[torch.randperm(n_rows, device=device)[:n_ignored]] = -1
    return targets


@pytest.mark.parametrize("shape", [(1, 5), (7, 128), (13, 257), (10, 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", SOFTCAPS)
def test_cross_entropy_matches_reference(shape, dtype, softcap, device):
    n_rows, vocab_size = shape
    logits = (3 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    targets = _targets(n_rows, vocab_size, device, n_ignored=n_rows // 4)
    run, ref = compare_backends(cross_entropy, logits, targets, softcap)
    assert run.output.dtype == torch.float32 and run.output.ndim == 0
    # The loss is logsumexp(z) - z[target]: in fp32 its error scales with the logits, not
    # with the loss (a near-certain row's loss of 0.006 from logits near 15 is good to
    # ~1e-7, far more than 1e-5 of 0.006).
    # The same holds for the gradient softmax - onehot of a near-certain row (1 - p is a
    # difference of numbers near 1): it is good to ~1e-7 absolute, whatever its size.
    logit_scale = logits.detach().float().abs().max().item()
    loss_scale = max(ref.output.abs().item(), 1e-12)
    loss_tol = Tolerance(rtol=1e-5, atol=max(1e-5, 1e-6 * logit_scale / loss_scale))
    grad_tol = TOLERANCES[dtype]
    if dtype == torch.float32:
        grad_scale = max(ref.grads[0].abs().max().item(), 1e-12)
        grad_tol = Tolerance(rtol=grad_tol.rtol, atol=max(grad_tol.atol, 1e-6 / grad_scale))
    assert_runs_close(run, ref, tolerance=loss_tol, grad_tolerance=grad_tol)


def test_cross_entropy_large_logits_and_strided_rows(device):
    """Logits of size 100 stay finite (online logsumexp), and rows may be strided."""
    logits = (100 * torch.randn(9, 2 * 300, device=device))[:, :300].requires_grad_()
    targets = _targets(9, 300, device)
    run, ref = compare_backends(cross_entropy, logits, targets)
    assert_runs_close(run, ref)


def test_cross_entropy_ignore_index_other_than_default(device):
    logits = torch.randn(6, 50, device=device, requires_grad=True)
    targets = torch.randint(0, 50, (6,), device=device)
    targets[:2] = 7
    run, ref = compare_backends(lambda z, t: cross_entropy(z, t, ignore_index=7), logits, targets)
    assert_runs_close(run, ref)
    assert (run.grads[0][:2] == 0).all()


# The kernel path's logits are a bf16 matmul (rounded to bf16) while the reference's are
# exact fp32: the loss moves by about 2**-9 of the logits' size, and the gradients, built
# from bf16 logits and bf16 gradient-of-logits, by about 1% of their largest element.
LINEAR_BF16 = Tolerance(rtol=5e-3, atol=5e-3)
LINEAR_BF16_GRAD = Tolerance(rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", [(13, 24, 300), (8, 16, 50), (1, 8, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", SOFTCAPS)
def test_linear_cross_entropy_matches_reference(shape, dtype, softcap, device):
    n_rows, dim, vocab_size = shape
    x = torch.randn(n_rows, dim, dtype=dtype, device=device, requires_grad=True)
    weight = (torch.randn(vocab_size, dim, device=device) / dim**0.5).to(dtype).requires_grad_()
    targets = _targets(n_rows, vocab_size, device, n_ignored=n_rows // 4)
    fn = lambda x, w, t: linear_cross_entropy(x, w, t, softcap, chunk_size=4)  # noqa: E731
    run, ref = compare_backends(fn, x, weight, targets)
    if dtype == torch.bfloat16:
        assert_runs_close(run, ref, tolerance=LINEAR_BF16, grad_tolerance=LINEAR_BF16_GRAD)
    else:
        assert_runs_close(run, ref, tolerance=Tolerance(rtol=1e-5, atol=1e-5))


def test_linear_cross_entropy_fp32_weight_with_bf16_inputs(device):
    x = torch.randn(10, 32, dtype=torch.bfloat16, device=device, requires_grad=True)
    weight = (torch.randn(70, 32, device=device) / 32**0.5).requires_grad_()
    run, ref = compare_backends(linear_cross_entropy, x, weight, _targets(10, 70, device))
    assert run.grads[1].dtype == torch.float32
    assert_runs_close(run, ref, tolerance=LINEAR_BF16, grad_tolerance=LINEAR_BF16_GRAD)


def test_linear_cross_entropy_never_holds_full_logits(device, monkeypatch):
    n_rows, dim, vocab_size, chunk = 11, 16, 40, 4
    seen = []
    cross_entropy_rows = linear_ce_module.cross_entropy_rows

    def recording(logits, *args, **kwargs):
        seen.append(tuple(logits.shape))
        return cross_entropy_rows(logits, *args, **kwargs)

    monkeypatch.setattr(linear_ce_module, "cross_entropy_rows", recording)
    x = torch.randn(n_rows, dim, device=device, requires_grad=True)
    weight = torch.randn(vocab_size, dim, device=device, requires_grad=True)
    targets = _targets(n_rows, vocab_size, device)
    with use("triton"):
        linear_cross_entropy(x, weight, targets, None, chunk).backward()
    assert seen == [(4, vocab_size), (4, vocab_size), (3, vocab_size)]


def test_linear_cross_entropy_without_grad(device):
    x = torch.randn(9, 16, device=device)
    weight = torch.randn(30, 16, device=device)
    targets = _targets(9, 30, device)
    with use("triton"), torch.no_grad():
        loss = linear_cross_entropy(x, weight, targets, 10.0)
    expected = torch.nn.functional.cross_entropy(10 * torch.tanh(x @ weight.T / 10), targets,
                                                 ignore_index=-1)
    torch.testing.assert_close(loss, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", SOFTCAPS)
def test_cross_entropy_gpt2_vocab_on_gpu(softcap, device):
    logits = (3 * torch.randn(2048, 50304, device=device)).to(torch.bfloat16).requires_grad_()
    run, ref = compare_backends(cross_entropy, logits, _targets(2048, 50304, device, 100), softcap)
    assert_runs_close(run, ref)


@pytest.mark.gpu
def test_linear_cross_entropy_gpt2_sizes_on_gpu(device):
    x = torch.randn(4096, 768, dtype=torch.bfloat16, device=device, requires_grad=True)
    weight = (torch.randn(50304, 768, device=device) / 768**0.5).requires_grad_()
    run, ref = compare_backends(linear_cross_entropy, x, weight, _targets(4096, 50304, device, 100),
                                15.0)
    assert_runs_close(run, ref, tolerance=LINEAR_BF16, grad_tolerance=LINEAR_BF16_GRAD)
