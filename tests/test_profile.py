"""bench/profile.py: the champion's profile for the LLM prompt, end to end on cpu-tiny (and on
gpu-small where a GPU is present), and its answers to bad input."""

import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from bench import profile

ROOT = Path(__file__).resolve().parent.parent
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")
ROW = re.compile(r"^(\S.*?)\s+(\d+)\s+(\d+\.\d\d)\s+(\d+\.\d)$")  # name, calls, total ms, %


def run_profile(cache: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bench.profile", *args]
    env = {"SPEEDLOOP_DATA": str(cache), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def op_rows(text: str) -> list[tuple[str, int, float, float]]:
    rows = [ROW.match(line) for line in text.splitlines()]
    return [(m[1], int(m[2]), float(m[3]), float(m[4])) for m in rows if m]


@pytest.mark.slow
def test_cpu_tiny_profile_lists_the_top_ops_and_fits_the_prompt(data_cache, tmp_path):
    out = tmp_path / "sub" / "profile.txt"
    t0 = time.perf_counter()
    proc = run_profile(data_cache, "--preset", "cpu-tiny", "--steps", "2", "--out", str(out))
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert out.read_text() == text
    assert len(text) < profile.MAX_CHARS
    assert "preset cpu-tiny" in text and "device cpu" in text
    assert "kernels torch" in text and "tokens per step 2,048" in text
    assert "data random tokens" in text  # the sandboxed part never sees the data cache
    rows = op_rows(text)
    assert len(rows) >= 5, text
    assert any(name in MATMULS for name, *_ in rows), text
    assert all(calls > 0 and ms > 0 and 0 <= pct <= 100 for _, calls, ms, pct in rows)
    assert [ms for _, _, ms, _ in rows] == sorted((ms for _, _, ms, _ in rows), reverse=True)
    print(f"profile of cpu-tiny, 2 steps: {seconds:.1f} s in all, {len(text)} characters")


def fake_event(key, count, cpu_us, device_us, on_gpu=False, annotation=False, old=False):
    """A stand-in for torch's FunctionEventAvg; old=True has only the pre-2.4 CUDA name."""
    times = {"self_cuda_time_total" if old else "self_device_time_total": device_us}
    return SimpleNamespace(
        key=key,
        count=count,
        self_cpu_time_total=0 if on_gpu else cpu_us,
        device_type=DeviceType.CUDA if on_gpu else DeviceType.CPU,
        is_user_annotation=annotation,
        **times,
    )


def test_cuda_report_ranks_ops_and_kernels_and_stays_short():
    """The CUDA layout without a GPU: CPU-side ops by their own kernels' time, then the
    kernels, annotations left out, long C++ names shortened, the whole under MAX_CHARS."""
    long = "void at::native::elementwise_kernel<128, 4, " + "x" * 300 + "{}>(int, float*)"
    events = [fake_event("ProfilerStep#1", 2, 9e6, 9e6, annotation=True)]
    events += [fake_event("gpu_user_annotation", 2, 0, 9e6, on_gpu=True, annotation=True)]
    events += [fake_event(f"aten::op{i}", 10 + i, 100.0, 1000.0 * i, old=i % 2) for i in range(30)]
    events += [fake_event(long.format(i), 5, 0, 500.0 * i, on_gpu=True) for i in range(30)]
    events += [fake_event("cudaLaunchKernel", 400, 5000.0, 0)]
    shapes = [(64, 1024), (64, 1024)]
    setup = "device cuda: NVIDIA H100 80GB HBM3 | kernels triton | torch.compile on"
    text = profile.format_report(events, "gpu-small", setup, "fineweb", shapes, 0.5, cuda=True)
    assert len(text) < profile.MAX_CHARS, len(text)
    ops_part, kernels_part = text.split("Top GPU kernels by CUDA time:")
    assert "Top operations by self CUDA time" in ops_part and "GPU busy per step" in ops_part
    assert "tokens per step 65,536 (batch 64 x seq 1024)" in ops_part
    assert "annotation" not in text and "ProfilerStep" not in text
    assert "cudaLaunchKernel" not in text  # no device time of its own
    ops, kernel_rows = op_rows(ops_part), op_rows(kernels_part)
    assert [name for name, *_ in ops[:3]] == ["aten::op29", "aten::op28", "aten::op27"]
    assert len(ops) >= 5 and len(kernel_rows) >= 5
    assert all(name.startswith("elementwise_kernel<128, 4, x") for name, *_ in kernel_rows)
    assert all(len(name) <= profile.NAME_CHARS for name, *_ in ops + kernel_rows)
    assert kernel_rows[0][0].endswith("x29>") and kernel_rows[0][1] == 5
    assert sum(pct for *_, pct in kernel_rows) <= 100


def test_missing_data_names_the_prepare_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPEEDLOOP_DATA", str(tmp_path))
    assert profile.main(["--preset", "cpu-tiny"]) == profile.EXIT_USAGE
    err = capsys.readouterr().err
    assert "not prepared" in err and "python -m data prepare embedded" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nope"], "unknown preset"),
        (["--preset", "cpu-tiny", "--steps", "0"], "--steps"),
        (["--preset", "cpu-tiny", "--device", "tpu"], "use cpu or cuda"),
        (["--preset", "cpu-tiny", "--device", "mps"], "use cpu or cuda"),
        (["--preset", "cpu-tiny", "--kernels", "cutlass"], "--kernels cutlass: use one of"),
        (["--preset", "cpu-tiny", "--data", "../x"], "not a plain directory name"),
    ],
)
def test_bad_input_exits_2_with_a_message(args, message, data_cache, monkeypatch, capsys):
    monkeypatch.setenv("SPEEDLOOP_DATA", str(data_cache))
    assert profile.main(args) == profile.EXIT_USAGE
    assert message in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_small_profile_lists_ops_and_kernels(data_cache):
    proc = run_profile(data_cache, "--preset", "gpu-small", "--data", "embedded", "--steps", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert len(text) < profile.MAX_CHARS
    assert "device cuda: " in text and "kernels triton" in text and "torch.compile on" in text
    assert "Top GPU kernels by CUDA time:" in text and "GPU busy per step" in text
    assert len(op_rows(text)) >= 10, text
