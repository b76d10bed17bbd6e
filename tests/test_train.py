"""train.py end to end on cpu-tiny with the real embedded corpus, each budget mode, the
result schema, divergence, and bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train
from bench.curves import eval_points, interpolate_target

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {
    "schema_version", "status", "preset", "seed", "device", "gpu_name", "torch_version",
    "triton_version", "kernels", "compile", "data", "data_fingerprint", "tokens", "steps",
    "train_seconds", "tokens_per_sec", "val_loss", "val_bpb", "time_to_target", "mfu",
    "peak_memory_bytes", "curve", "causality", "flops_per_token", "n_params", "world_size",
}  # fmt: skip


def run_train(cache: Path, *args: str, out: Path | None = None) -> tuple[int, dict | None, str]:
    cmd = [sys.executable, "train.py", "--preset", "cpu-tiny", *args]
    if out is not None:
        cmd += ["--out", str(out)]
    env = {"SPEEDLOOP_DATA": str(cache), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if proc.returncode in (0, 3, 4) and lines else None
    return proc.returncode, result, proc.stdout + proc.stderr


@pytest.mark.slow
def test_default_budget_trains_and_reports_every_field(data_cache, tmp_path):
    code, result, log = run_train(data_cache, out=tmp_path / "r.json")
    assert code == 0, log
    assert FIELDS <= result.keys()
    assert json.loads((tmp_path / "r.json").read_text()) == result
    assert result["status"] == "ok" and result["device"] == "cpu" and result["mfu"] is None
    assert result["tokens"] >= train.PRESETS["cpu-tiny"].budget_tokens
    assert result["kernels"] == "torch" and result["compile"] is False
    curve = [row["val_loss"] for row in result["curve"]]
    assert len(curve) >= 5 and curve[-1] < curve[0]
    assert result["val_loss"] < math.log(4096) - 2  # well under the uniform prediction
    assert 0.5 < result["val_bpb"] < 3
    # The evaluator process's probes: look-ahead on random tokens and on real text, cross-row.
    assert [p["kind"] for p in result["causality"]] == ["look-ahead", "look-ahead", "cross-row"]
    assert all(p["causal"] for p in result["causality"]) and result["integrity"]["ok"]
    print(f"cpu-tiny: {result['tokens_per_sec']:.0f} tok/s, val loss {result['val_loss']:.3f}")


def test_token_budget_is_exact_in_steps(data_cache):
    code, result, log = run_train(data_cache, "--budget-tokens", "10000", "--seed", "3")
    assert code == 0, log
    # 2,048 tokens per step: the run stops at the first step that reaches the budget.
    assert result["tokens"] == 10240 and result["steps"] == 5 and result["seed"] == 3
    assert result["budget_tokens"] == 10000 and result["curve"][-1]["tokens"] == 10240


def test_time_budget_stops_on_time(data_cache):
    code, result, log = run_train(data_cache, "--budget-seconds", "2")
    assert code == 0, log
    assert result["budget_seconds"] == 2 and result["budget_tokens"] is None
    step_time = result["train_seconds"] / result["steps"]
    assert 2 <= result["train_seconds"] <= 2 + 2 * step_time + 0.5


def test_target_loss_stops_early_and_reports_the_crossing(data_cache):
    code, result, log = run_train(data_cache, "--target-loss", "7.5")
    assert code == 0, log
    assert result["time_to_target"] is not None
    assert result["tokens"] < train.PRESETS["cpu-tiny"].budget_tokens
    crossing = [row for row in result["curve"] if row["val_loss"] <= 7.5]
    assert crossing and result["time_to_target"] <= crossing[0]["seconds"]


def test_unreached_target_reports_null(data_cache):
    code, result, log = run_train(data_cache, "--budget-tokens", "4096", "--target-loss", "0.5")
    assert code == 0, log
    assert result["time_to_target"] is None and result["target_loss"] == 0.5


def test_evaluation_schedule_is_denser_at_the_end():
    points = eval_points(6)
    assert points == sorted(set(points)) and 0 < points[0] and points[-1] < 1
    gaps = [b - a for a, b in zip(points, points[1:])]
    assert max(gaps[-5:]) < min(gaps[:2])


def test_interpolated_crossing():
    curve = [
        dict(seconds=1.0, val_loss=6.0),
        dict(seconds=2.0, val_loss=5.0),
        dict(seconds=4.0, val_loss=3.0),
    ]
    assert interpolate_target(curve, 4.0) == pytest.approx(3.0)
    assert interpolate_target(curve, 6.5) == 1.0
    assert interpolate_target(curve, 2.0) is None


def test_exploding_loss_is_diverged(data_cache, monkeypatch, capsys):
    from dataclasses import replace

    import model.recipe

    hp = model.recipe.PRESETS["cpu-tiny"]
    monkeypatch.setitem(model.recipe.PRESETS, "cpu-tiny", replace(hp, head_lr=1e4, embed_lr=1e4))
    monkeypatch.setenv("SPEEDLOOP_DATA", str(data_cache))
    code = train.main(["--preset", "cpu-tiny", "--budget-tokens", "40960", "--log-every", "1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == train.EXIT_DIVERGED and result["status"] == "diverged"
    assert result["steps"] < 20


def test_unknown_preset_is_a_clear_error(data_cache):
    code, _, log = run_train(data_cache, "--preset", "gpu-huge")
    assert code == 2 and "unknown preset 'gpu-huge'" in log and "cpu-tiny" in log


def test_missing_data_names_the_prepare_command(tmp_path):
    code, _, log = run_train(tmp_path / "empty")
    assert code == 2 and "python -m data prepare embedded" in log


def test_corrupt_shard_names_the_file(data_cache, tmp_path):
    import shutil

    broken = tmp_path / "cache"
    shutil.copytree(data_cache, broken)
    shard = broken / "embedded" / "train_000.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    code, _, log = run_train(broken)
    assert code == 2 and str(shard) in log


def test_cuda_preset_without_gpu_is_a_clear_error(data_cache):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, log = run_train(data_cache, "--preset", "gpu-small")
    assert code == 2 and "no CUDA GPU" in log


def test_warmup_leaves_no_trace_in_the_timed_run(data_cache, monkeypatch, capsys):
    """A run with the untimed warmup and one without it give the same curve."""
    monkeypatch.setenv("SPEEDLOOP_DATA", str(data_cache))
    args = ["--preset", "cpu-tiny", "--budget-tokens", "8192", "--seed", "7"]
    curves = []
    for skip_warmup in (False, True):
        if skip_warmup:
            monkeypatch.setattr(train, "warmup", lambda *a, **k: None)
        assert train.main(args) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        curves.append([row["val_loss"] for row in result["curve"]])
    assert curves[0] == curves[1]
    assert np.isfinite(curves[0]).all()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "tpu"], "--device tpu: use cpu or cuda"),
        (["--kernels", "cutlass"], "unknown kernel backend 'cutlass'"),
        (["--budget-tokens", "0"], "--budget-tokens must be positive"),
        (["--data", "../elsewhere"], "not a plain directory name"),
    ],
)
def test_bad_flags_are_clear_errors(data_cache, flags, message):
    code, _, log = run_train(data_cache, *flags)
    assert code == 2 and message in log, log
