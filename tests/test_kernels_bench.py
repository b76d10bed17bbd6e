"""The kernel benchmark: it imports and fails clearly on CPU, formats its table, and on a
GPU runs end to end (quick sizes)."""

import json

import pytest
import torch

from bench import kernels_bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_kernels_bench_needs_a_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        kernels_bench.main([])


def test_cases_count_the_full_product_for_xxt():
    """Building the cases allocates nothing (inputs are made lazily, on the GPU)."""
    cases = kernels_bench.cases(quick=False)
    assert {c.op for c in cases} == {"rms_norm", "apply_rotary", "relu_squared", "cross_entropy",
                                     "linear_cross_entropy", "xxt"}
    xxt = next(c for c in cases if c.op == "xxt" and c.shape == "4096x4096")
    assert xxt.fwd == 2 * 4096**3 and xxt.fwd_bwd is None and xxt.unit == "TFLOP/s"


def test_markdown_rows_carry_gpu_and_versions():
    row = {"op": "xxt", "shape": "8x8", "pass": "fwd", "impl": "triton", "ms": 0.5, "rate": 1.0,
           "unit": "TFLOP/s", "of_copy": None, "vs_eager": 2.0, "vs_compile": 1.5,
           "peak_mib": 3.0, "gpu": "NVIDIA H100", "torch": "2.13.0", "triton": "3.7.1"}
    table = kernels_bench.markdown([row], copy_gbps=3000.0)
    assert "| xxt | 8x8 | fwd | triton | 0.500 | 1 TFLOP/s |  | 2.00 | 1.50 | 3 " in table
    assert table.splitlines()[-1].endswith("| NVIDIA H100 | 2.13.0 | 3.7.1 |")


@pytest.mark.gpu
def test_kernels_bench_quick_on_gpu(tmp_path):
    out = tmp_path / "kernels.json"
    kernels_bench.main(["--quick", "--ops", "rms_norm,xxt", "--json", str(out)])
    result = json.loads(out.read_text())
    assert {r["impl"] for r in result["rows"]} == {"triton", "eager", "compile"}
    assert all(r["ms"] > 0 for r in result["rows"])
