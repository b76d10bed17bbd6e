"""The backend switch: which implementation runs, errors for impossible requests, and the
custom-op wrapping that lets torch.compile call the kernels."""

import importlib

import pytest
import torch

import kernels
from bench.kernel_testing import counting_launches
from kernels import dispatch


def _inputs(device):
    """One small call of every op: (name of its module, function, inputs)."""
    x = torch.randn(2, 3, 4, 8, device=device, requires_grad=True)
    angles = torch.randn(3, 4, device=device)
    targets = torch.randint(0, 11, (6,), device=device)
    return [
        ("rms_norm", kernels.rms_norm, (x, torch.randn(8, device=device, requires_grad=True))),
        ("cross_entropy", kernels.cross_entropy,
         (torch.randn(6, 11, device=device, requires_grad=True), targets, 5.0)),
        ("cross_entropy", kernels.linear_cross_entropy,
         (torch.randn(6, 8, device=device, requires_grad=True),
          torch.randn(11, 8, device=device, requires_grad=True), targets)),
        ("rotary", kernels.apply_rotary, (x, angles.cos(), angles.sin())),
        ("relu_squared", kernels.relu_squared, (x,)),
        ("xxt", kernels.xxt, (torch.randn(5, 7, device=device),)),
    ]


# The kernels one forward and backward of each entry point launches.
KERNELS_RUN = {
    "rms_norm": {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"},
    "cross_entropy": {"_cross_entropy_fwd_kernel", "_cross_entropy_bwd_kernel"},
    "linear_cross_entropy": {"_cross_entropy_fwd_kernel"},  # gradients made in the forward
    "apply_rotary": {"_rotary_kernel"},  # forward and backward
    "relu_squared": {"_relu_squared_fwd_kernel", "_relu_squared_bwd_kernel"},
    "xxt": {"_xxt_kernel"},  # forward only
}
CASES = list(KERNELS_RUN)


def _case(name, device):
    return next(c for c in _inputs(device) if c[1].__name__ == name)


def _clone(inputs):
    return [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
            else t for t in inputs]


def _run(fn, inputs):
    out = fn(*inputs)
    if out.requires_grad:
        out.sum().backward()
    return out


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backend_chooses_the_implementation(name, backend, device):
    module_name, fn, inputs = _case(name, device)
    module = importlib.import_module(f"kernels.{module_name}")
    with dispatch.use(backend), counting_launches(module) as launches:
        _run(fn, inputs)
    assert set(launches) == (KERNELS_RUN[name] if backend == "triton" else set())


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown kernel backend"):
        dispatch.set_backend("cuda")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        dispatch.resolve("tritonn", "cpu")


def test_resolve(monkeypatch):
    assert dispatch.resolve("auto", "cpu") == "torch"
    assert dispatch.resolve("torch", "cpu") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve("triton", "cpu") == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="cannot run"):
        dispatch.resolve("triton", "cpu")


def test_use_restores_the_backend_after_an_error():
    before = dispatch.get_backend()
    with pytest.raises(KeyError), dispatch.use("triton"):
        raise KeyError
    assert dispatch.get_backend() == before


def test_triton_on_cpu_tensors_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("kernels.utils.INTERPRET", False)
    with dispatch.use("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.rms_norm(torch.randn(2, 8))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(name, backend, device):
    """Dynamo traces the entry points without graph breaks: the references directly, the
    kernels as opaque custom ops (their fake implementations give the shapes)."""
    _, fn, inputs = _case(name, device)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    eager_inputs = _clone(inputs)
    with dispatch.use(backend):
        expected = _run(fn, eager_inputs)
        actual = _run(compiled, inputs)
    torch.testing.assert_close(actual, expected)
    for t, e in zip(inputs, eager_inputs, strict=True):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            torch.testing.assert_close(t.grad, e.grad)


# Not "test_autograd_registration": autograd is the autograd.Functions' job, not the ops'.
CUSTOM_OP_CHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def test_custom_ops_pass_opcheck(device):
    """Schemas, fake (meta) implementations and autograd registration of every launcher."""
    x = torch.randn(3, 8, device=device)
    logits = torch.randn(4, 9, device=device)
    targets = torch.randint(0, 9, (4,), device=device)
    ops = torch.ops.speedloop
    for op, args in [
        (ops.rms_norm_fwd, (x, torch.randn(8, device=device), 1e-6)),
        (ops.rms_norm_bwd, (x, x, None, torch.rand(3, device=device) + 0.5)),
        (ops.cross_entropy_fwd, (logits, targets, 3.0, -1)),
        (ops.cross_entropy_bwd, (torch.tensor(1.0, device=device), logits, targets,
                                 torch.randn(4, device=device), None, -1)),
        (ops.linear_cross_entropy_fwd, (x[:, :4], logits[:, :4], targets[:3] % 4, None, -1, 2,
                                        True)),
        (ops.rotary, (x.view(1, 3, 2, 4), torch.randn(3, 2, device=device),
                      torch.randn(3, 2, device=device), False)),
        (ops.relu_squared_fwd, (x,)),
        (ops.relu_squared_bwd, (x, x.abs())),
        (ops.xxt, (x,)),
    ]:
        torch.library.opcheck(op, args, test_utils=CUSTOM_OP_CHECKS)


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_inductor_compile_on_gpu(name, device):
    _, fn, inputs = _case(name, device)
    compiled = torch.compile(fn, fullgraph=True)
    with dispatch.use("triton"):
        expected = _run(fn, _clone(inputs))
        actual = _run(compiled, inputs)
    torch.testing.assert_close(actual, expected)
