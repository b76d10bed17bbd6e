"""The kernel benchmarks as pytest-benchmark tests: every op of kernels/ in triton, its torch
reference (eager) and torch.compile of the reference, forward and forward+backward.

Not collected by `make test` (the name is not test_*.py): run by `make bench` and `python
-m bench.kernels_bench`, which pass the options and save the JSON. On CUDA: bf16 at the
shapes of --bench-preset (default gpu-small). On the CPU (Triton's interpreter): fp32 (the
interpreter's bf16 dot is wrong) at tiny shapes, without torch.compile (~20 s a graph
there); tests/test_kernels_bench.py runs it so, to test this file. bench/kernels_bench.py
says how a round is timed.
"""

import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed "
                    "(pip install pytest-benchmark==5.3.1): kernel benchmarks skipped")

import torch  # noqa: E402

from bench import kernels_bench  # noqa: E402
from bench.kernels_bench import TINY, Shapes, cases, environment, prepare, preset_shapes  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
IMPLS = kernels_bench.IMPLS if CUDA else ("triton", "eager")


def shapes(config) -> Shapes:
    preset = config.getoption("--bench-preset") or ("gpu-small" if CUDA else "tiny")
    return TINY if preset == "tiny" else preset_shapes(preset)


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    s = shapes(metafunc.config)
    params, ids = [], []
    for case in cases(s, DTYPE.itemsize):
        for which in case.passes:
            for impl in IMPLS:
                params.append((case, which, impl))
                ids.append(f"{case.op}[{case.shape}]-{which}-{impl}")
    metafunc.parametrize(("case", "which", "impl"), params, ids=ids)


@pytest.fixture(scope="module", autouse=True)
def many_graphs():
    """One compiled reference per shape and grad mode: more than dynamo's default 8."""
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 64
    yield
    torch._dynamo.config.recompile_limit = limit


@pytest.fixture(autouse=True)
def release_memory():
    """Each benchmark's inputs go with it: the next one starts from an empty cache."""
    yield
    if CUDA:
        torch.cuda.empty_cache()


def test_kernel(benchmark, request, case, which, impl):
    rounds = request.config.getoption("--bench-rounds") or (25 if CUDA else 2)
    prepared = prepare(case, impl, which, DEVICE, DTYPE)
    benchmark.group = f"{case.op} {case.shape} {which}"
    benchmark.pedantic(prepared.step, setup=prepared.setup, rounds=rounds, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "op": case.op, "shape": case.shape, "pass": which, "impl": impl,
        "preset_shapes": shapes(request.config).label, "dtype": str(DTYPE).split(".")[-1],
        "first_call_s": prepared.first_call_s,  # for compile: the compile time
        "peak_mib": prepared.peak_mib, **kernels_bench.rates(case, which, median),
        **environment(DEVICE),
    })
    assert median > 0
