"""The kernel benchmark suite (tests/bench_kernels.py, bench/kernels_bench.py) and the
gpu-check table (bench/gpu_report.py), on the CPU: the work each case counts, the shapes
of the presets, a real run of the suite on tiny shapes in Triton's interpreter with its
saved JSON and a comparison against it, the table made from that JSON, and the one line
said when pytest-benchmark is missing."""

import json
import subprocess
import sys

import pytest

from bench import gpu_report, kernels_bench
from bench.kernels_bench import TINY, Shapes, cases, preset_shapes, pytest_args
from bench.telemetry import Telemetry


def test_cases_count_the_work_of_each_pass():
    by_op = {c.op: c for c in cases(TINY, itemsize=2)}
    assert set(by_op) == {"rms_norm", "apply_rotary", "relu_squared", "cross_entropy",
                          "linear_cross_entropy", "xxt"}
    rows = TINY.batch * TINY.seq_len
    assert by_op["rms_norm"].fwd == 2 * rows * TINY.dim * 2  # read x, write y, in bf16
    assert by_op["rms_norm"].passes == ("fwd", "fwd+bwd")
    xxt = by_op["xxt"]
    assert xxt.fwd == 2 * TINY.layers * TINY.dim**2 * TINY.hidden and xxt.passes == ("fwd",)
    assert kernels_bench.rates(xxt, "fwd", 1e-3) == {"flops": xxt.fwd,
                                                     "tflop_per_s": xxt.fwd / 1e-3 / 1e12}


def test_preset_shapes_are_the_recipes_micro_batch():
    assert preset_shapes("gpu-small") == Shapes(batch=64, seq_len=1024, dim=512, heads=8,
                                                hidden=2048, vocab=50304, layers=8)
    assert preset_shapes("cpu-tiny").rows == 16 * 128
    with pytest.raises(ValueError, match="unknown preset 'gpu-huge': choose one of cpu-tiny"):
        preset_shapes("gpu-huge")


def run_suite(tmp_path, *extra: str, only: str = "rms_norm") -> subprocess.CompletedProcess:
    """The suite as `make bench` runs it, at tiny shapes, rms_norm only (~4 s)."""
    args = pytest_args("tiny", tmp_path / "run.json", None, storage=tmp_path / "store")
    cmd = [sys.executable, "-m", "pytest", *args, "--bench-rounds=2", "-k", only, *extra]
    proc = subprocess.run(cmd, cwd=kernels_bench.ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def test_the_suite_saves_times_rates_and_versions_and_compares(tmp_path):
    run_suite(tmp_path)
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["machine_info"]["speedloop"]["torch"].startswith("2.")
    assert saved["machine_info"]["speedloop"]["triton_interpret"] is True
    infos = [b["extra_info"] for b in saved["benchmarks"]]
    assert sorted((i["pass"], i["impl"]) for i in infos) == [
        ("fwd", "eager"), ("fwd", "triton"), ("fwd+bwd", "eager"), ("fwd+bwd", "triton")]
    for b in saved["benchmarks"]:
        info, median = b["extra_info"], b["stats"]["median"]
        assert info["dtype"] == "float32" and info["device"] == "cpu" and b["stats"]["rounds"] == 2
        factor = 2 if info["pass"] == "fwd" else 5
        assert info["bytes"] == factor * TINY.batch * TINY.seq_len * TINY.dim * 4
        assert info["gb_per_s"] == pytest.approx(info["bytes"] / median / 1e9)
    (autosaved,) = (tmp_path / "store").glob("*/0001_*.json")
    assert json.loads(autosaved.read_text())["benchmarks"][0]["extra_info"]["op"] == "rms_norm"

    compared = run_suite(tmp_path, "--benchmark-compare=0001", only="rms_norm and eager")
    assert "0001_" in compared.stdout and "NOW" in compared.stdout  # the saved run beside it

    # The gpu-check table made from this real JSON and a result of the fields train.py writes.
    result = {"tokens_per_sec": 123456.0, "mfu": None, "val_loss": 5.4321, "steps": 40,
              "peak_memory_bytes": 2**31, "logits_via": "socket", "twins": [{"ok": True}],
              "untimed": {"startup": 41.5, "evaluation": 6.2, "other": 0.8},
              "telemetry": Telemetry.open("cpu").as_result()}
    check = {"machine": {"gpu": "cpu", "torch": "2.13.0", "triton": "3.7.1"},
             "steps": [{"name": "GPU tests", "status": "ok", "seconds": 61.0,
                        "detail": "212 passed"},
                       {"name": "gpu-small triton", "status": "ok", "seconds": 95.0},
                       {"name": "gpu-small torch", "status": "timeout", "seconds": 170.0,
                        "detail": "killed after 170 s"}],
             "runs": {"triton": result}, "kernels": saved}
    lines = gpu_report.table(check).splitlines()
    assert lines[2:4] == ["| check | result | s |", "| --- | --- | ---: |"]
    assert lines[4] == "| GPU tests | 212 passed | 61 |"
    assert lines[5].startswith("| gpu-small triton | 123,456 tok/s, MFU n/a, val loss 5.432, "
                               "40 steps, peak 2.0 GiB; untimed s: startup (build, compile, "
                               "warm-up) 41.5, eval 6.2, other 0.8;")
    assert "telemetry n/a (a cpu run: no GPU to read)" in lines[5]
    assert lines[6] == "| gpu-small torch | TIMEOUT: killed after 170 s | 170 |"
    kernel_lines = [line for line in lines if line.startswith("| rms_norm ")]
    assert len(kernel_lines) == 2 and "x eager" in kernel_lines[0] and "GB/s" in kernel_lines[0]
    assert lines[-1] == "| total | | 326 |"


def test_kernel_rows_refuse_a_json_of_another_suite():
    with pytest.raises(ValueError, match="'test_x' has no op/shape/pass/impl"):
        gpu_report.kernel_rows({"benchmarks": [{"name": "test_x", "extra_info": {}}]})


def test_without_pytest_benchmark_the_suite_is_skipped_with_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pytest_benchmark", None)  # not importable
    assert kernels_bench.main([]) == 0
    assert capsys.readouterr().out == kernels_bench.NO_PLUGIN + "\n"
