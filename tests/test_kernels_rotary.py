"""Rotary kernel vs its fp32 reference, forward and the gradient of x."""

import pytest
import torch

from bench.kernel_testing import assert_runs_close, compare_backends
from kernels import apply_rotary, use

# (B, T, H, Dh): single element, odd T and H, a half head dim that is not a power of two.
SHAPES = [(1, 1, 1, 2), (2, 5, 3, 16), (3, 7, 2, 6), (2, 9, 4, 64)]
DTYPES = [torch.float32, torch.bfloat16]


def _tables(seq_len, head_dim, device):
    angles = torch.randn(seq_len, head_dim // 2, device=device) * 3
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_reference(shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    cos, sin = _tables(shape[1], shape[-1], device)
    run, ref = compare_backends(apply_rotary, x, cos, sin)
    assert_runs_close(run, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_on_q_sliced_from_fused_qkv(dtype, device):
    """q is a strided view of a (B, T, 3, H, Dh) projection; cos and sin rows of a longer
    table are strided too."""
    batch, seq_len, n_heads, head_dim = 2, 6, 3, 8
    qkv = torch.randn(batch, seq_len, 3, n_heads, head_dim, dtype=dtype, device=device)
    q = qkv[:, :, 0].requires_grad_()
    angles = torch.randn(seq_len, head_dim, device=device)[:, : head_dim // 2]
    run, ref = compare_backends(apply_rotary, q, angles.cos(), angles.sin())
    assert_runs_close(run, ref)


def test_rotary_backward_undoes_forward(device):
    """The rotation is orthogonal: the gradient of sum(y * y) is 2x."""
    x = torch.randn(2, 4, 3, 10, device=device, requires_grad=True)
    cos, sin = _tables(4, 10, device)
    with use("triton"):
        apply_rotary(x, cos, sin).square().sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())


def test_rotary_rejects_wrong_tables(device):
    x = torch.randn(1, 4, 2, 8, device=device)
    cos, sin = _tables(5, 8, device)
    with use("triton"), pytest.raises(ValueError, match="slice the tables"):
        apply_rotary(x, cos, sin)


@pytest.mark.gpu
def test_rotary_training_sizes_on_gpu(device):
    x = torch.randn(8, 1024, 12, 64, dtype=torch.bfloat16, device=device, requires_grad=True)
    cos, sin = _tables(1024, 64, device)
    run, ref = compare_backends(apply_rotary, x, cos, sin)
    assert_runs_close(run, ref)
