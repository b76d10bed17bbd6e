"""ReLU² kernels vs the fp32 reference, forward and the gradient of x."""

import pytest
import torch

from bench.kernel_testing import TOLERANCES, Tolerance, assert_runs_close, compare_backends
from kernels import relu_squared, use

SHAPES = [(5, 13), (1023,), (3, 7, 256), (2, 1, 1)]
DTYPES = [torch.float32, torch.bfloat16]

# The backward takes relu(x) as sqrt(y) from the saved bf16 output: y's rounding (up to an
# ulp when the interpreter truncates) is halved by the sqrt, then dx is rounded once more.
BF16_GRAD = Tolerance(rtol=2**-7 + 2**-8 + 1e-4, atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_squared_matches_reference(shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device)
    x.view(-1)[0] = 0.0  # relu's kink: the gradient there is 0
    x.requires_grad_()
    run, ref = compare_backends(relu_squared, x)
    grad_tolerance = BF16_GRAD if dtype == torch.bfloat16 else TOLERANCES[dtype]
    assert_runs_close(run, ref, grad_tolerance=grad_tolerance)


def test_relu_squared_non_contiguous_input(device):
    x = torch.randn(16, 9, device=device).T.requires_grad_()
    run, ref = compare_backends(relu_squared, x)
    assert_runs_close(run, ref)


def test_relu_squared_saves_only_its_output(device):
    x = torch.randn(4, 8, device=device, requires_grad=True)
    with use("triton"):
        y = relu_squared(x * 1.0)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].data_ptr() == y.data_ptr()


def test_relu_squared_refuses_fp16(device):
    x = torch.randn(4, device=device, dtype=torch.float16)
    with use("triton"), pytest.raises(TypeError, match="fp16"):
        relu_squared(x)


@pytest.mark.gpu
def test_relu_squared_training_sizes_on_gpu(device):
    x = torch.randn(8192, 3072, dtype=torch.bfloat16, device=device, requires_grad=True)
    run, ref = compare_backends(relu_squared, x)
    assert_runs_close(run, ref, grad_tolerance=BF16_GRAD)
