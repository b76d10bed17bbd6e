"""X @ X.T kernel (upper triangle, mirrored) vs the full fp32 product."""

import pytest
import torch

from bench.kernel_testing import TOLERANCES, Tolerance, assert_runs_close, compare_backends
from kernels import xxt

# (M, K) and batched (B, M, K): below one tile, several tiles with ragged edges, exactly
# two tiles (the interpreter's tiles are 16 wide).
SHAPES = [(5, 13), (37, 29), (32, 64), (3, 37, 29), (2, 1, 7)]
DTYPES = [torch.float32, torch.bfloat16]


def _tolerance(dtype, device):
    if dtype == torch.float32 and device.type == "cuda":
        return Tolerance(rtol=1e-2, atol=1e-3)  # tl.dot takes fp32 through TF32 on a GPU
    return TOLERANCES[dtype]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_xxt_matches_full_product(shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device)
    run, ref = compare_backends(xxt, x)
    assert_runs_close(run, ref, tolerance=_tolerance(dtype, device))


def test_xxt_strided_input_and_symmetry(device):
    x = torch.randn(40, 35, device=device).T  # (35, 40), column-major
    run, ref = compare_backends(xxt, x)
    assert_runs_close(run, ref, tolerance=_tolerance(torch.float32, device))
    if device.type == "cpu":  # the interpreter's 16-wide tiles: (0, 1) is mirrored to (1, 0)
        a = run.output
        assert torch.equal(a[16:32, :16], a[:16, 16:32].T)


def test_xxt_of_symmetric_matrix_is_its_square(device):
    """Newton-Schulz uses xxt(A) for A @ A when A = X X^T."""
    x = torch.randn(20, 24, device=device)
    a = x @ x.T
    run, ref = compare_backends(xxt, a)
    torch.testing.assert_close(run.output, a @ a, rtol=1e-4, atol=1e-3 * (a @ a).abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(768, 3072), (1024, 4096), (4, 768, 768)])
def test_xxt_muon_sizes_on_gpu(shape, device):
    x = torch.randn(shape, dtype=torch.bfloat16, device=device)
    run, ref = compare_backends(xxt, x)
    assert_runs_close(run, ref)
