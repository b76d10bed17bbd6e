"""RMSNorm kernel vs its fp32 reference: outputs and the gradients of x and weight."""

import pytest
import torch

from bench.kernel_testing import assert_runs_close, compare_backends
from kernels import rms_norm, use
from kernels.rms_norm import MAX_FUSED_SIZE_BYTES, _as_rows

SHAPES = [(1, 1, 1023), (3, 7, 256), (5, 13), (2, 3, 5, 64), (17, 100)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_matches_reference(shape, dtype, with_weight, device):
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    weight = None
    if with_weight:
        weight = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype).requires_grad_()
    run, ref = compare_backends(rms_norm, x, weight, 1e-6)
    assert_runs_close(run, ref)


def test_rms_norm_strided_rows_and_fp32_weight(device):
    """Rows that are not adjacent in memory, bf16 x with an fp32 weight (mixed precision)."""
    x = torch.randn(6, 2 * 96, dtype=torch.bfloat16, device=device)[:, :96].requires_grad_()
    weight = torch.randn(96, device=device, requires_grad=True)
    run, ref = compare_backends(rms_norm, x, weight, 1e-5)
    assert run.output.dtype == torch.bfloat16 and run.grads[1].dtype == torch.float32
    assert_runs_close(run, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_on_q_sliced_from_fused_qkv(dtype, device):
    """QK-norm: q is a (B, T, H, Dh) view of a (B, T, 3, H, Dh) projection, read in place."""
    qkv = torch.randn(2, 5, 3, 4, 16, dtype=dtype, device=device)
    q = qkv.unbind(2)[0].requires_grad_()
    assert _as_rows(q).data_ptr() == q.data_ptr()  # no copy
    run, ref = compare_backends(rms_norm, q)
    assert_runs_close(run, ref)


def test_rms_norm_rejects_rows_over_the_tile_limit(device):
    x = torch.randn(1, MAX_FUSED_SIZE_BYTES // 4 + 1, device=device)
    with use("triton"), pytest.raises(ValueError, match="MAX_FUSED_SIZE_BYTES"):
        rms_norm(x)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [768, 1024, 4096])
def test_rms_norm_training_sizes_on_gpu(dim, device):
    x = torch.randn(4096, dim, dtype=torch.bfloat16, device=device, requires_grad=True)
    weight = torch.randn(dim, device=device, requires_grad=True)
    run, ref = compare_backends(rms_norm, x, weight, 1e-6)
    assert_runs_close(run, ref)
