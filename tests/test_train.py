"""train.py end to end on cpu-tiny with the real embedded corpus: each budget mode, the
result schema, the sandboxed workers, divergence, the device lock, and bad input."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fakes.repo import working_tree_repo

import train
from bench import protocol
from bench.curves import eval_points, interpolate_target

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {
    "schema_version", "status", "sandbox", "preset", "seed", "device", "gpu_name",
    "torch_version", "kernels", "compile", "data", "data_fingerprint", "tokens", "steps",
    "train_seconds", "eval_seconds", "wall_seconds", "untimed", "tokens_per_sec", "val_loss",
    "val_bpb", "time_to_target", "mfu", "curve", "twins", "integrity", "flops_per_token",
    "n_params", "init_fingerprint", "world_size", "telemetry",
}  # fmt: skip


def run_train(cache: Path, *args: str, out: Path | None = None, cwd: Path = ROOT,
              locks: Path | None = None) -> tuple[int, dict | None, str]:
    cmd = [sys.executable, "train.py", "--preset", "cpu-tiny", *args]
    if out is not None:
        cmd += ["--out", str(out)]
    env = {"SPEEDLOOP_DATA": str(cache), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1",
           "SPEEDLOOP_LOCKS": str(locks or cache / "locks")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
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
    assert result["telemetry"] == {"source": "nvml", "unavailable": "a cpu run: no GPU to read",
                                   "start": [], "end": [], "throttled": []}
    curve = [row["val_loss"] for row in result["curve"]]
    assert len(curve) >= 5 and curve[-1] < curve[0]
    assert result["val_loss"] < math.log(4096) - 2  # well under the uniform prediction
    assert 0.5 < result["val_bpb"] < 3
    # The surface ran sandboxed; every evaluation checked a batch of twin rows, exactly equal
    # to their originals up to their split on the CPU.
    assert result["sandbox"] is True and result["integrity"] == {"ok": True, "violations": []}
    assert len(result["twins"]) == len(result["curve"])
    assert all(t["ok"] and t["n"] == 64 and t["max_change"] == 0.0 for t in result["twins"])
    assert result["n_params"] > 1e6 and len(result["init_fingerprint"]) == 64
    untimed = result["untimed"]
    assert result["wall_seconds"] == pytest.approx(result["train_seconds"] + sum(untimed.values()))
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


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A copy of this working tree, for runs of an edited surface."""
    return working_tree_repo(tmp_path_factory.mktemp("tree") / "repo")


def edited(template: Path, dest: Path, path: str, old: str, new: str) -> Path:
    shutil.copytree(template, dest, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    text = (dest / path).read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {path}"
    (dest / path).write_text(text.replace(old, new))
    return dest


def test_exploding_loss_is_diverged(data_cache, template, tmp_path):
    tree = edited(template, tmp_path / "tree", "model/recipe.py",
                  "    head_lr: float = 0.008", "    head_lr: float = 1e4")
    code, result, log = run_train(data_cache, "--budget-tokens", "40960", "--log-every", "1",
                                  cwd=tree)
    assert code == protocol.EXIT_DIVERGED and result["status"] == "diverged", log
    assert result["steps"] < 20


def test_same_seed_same_curve_and_seeds_start_apart(data_cache):
    """The harness owns the data order and the worker seeds its init: one seed gives one
    run (so the untimed warm-up left no trace), another seed another start."""
    runs = [run_train(data_cache, "--budget-tokens", "4096", "--seed", seed)
            for seed in ("7", "7", "8")]
    assert all(code == 0 for code, _, _ in runs), runs[0][2]
    a, b, c = (result for _, result, _ in runs)
    # Equal to float rounding (threads may sum in another order), far from what kept
    # warm-up progress or another data order would move.
    assert [p["val_loss"] for p in a["curve"]] == pytest.approx(
        [p["val_loss"] for p in b["curve"]], abs=1e-4)
    assert a["init_fingerprint"] == b["init_fingerprint"] != c["init_fingerprint"]


def test_a_worker_crash_is_exit_1_with_its_traceback(data_cache, template, tmp_path):
    tree = edited(template, tmp_path / "tree", "model/recipe.py",
                  "        self._set_schedules(progress)\n",
                  "        self._set_schedules(progress)\n        raise KeyError('boom')\n")
    code, result, log = run_train(data_cache, "--budget-tokens", "4096", cwd=tree)
    assert code == protocol.EXIT_CRASH and result is None
    assert "[train] " in log and "KeyError: 'boom'" in log


def test_a_run_by_hand_waits_for_the_device_lock(data_cache, tmp_path, monkeypatch):
    """train.py started by hand takes the device lock a session's runner holds, and says
    whose lock it waits for, instead of distorting that session's clock."""
    from bench.locks import device_lock

    locks = tmp_path / "locks"
    monkeypatch.setenv("SPEEDLOOP_LOCKS", str(locks))
    cmd = [sys.executable, "train.py", "--preset", "cpu-tiny", "--budget-tokens", "2048"]
    env = {"SPEEDLOOP_DATA": str(data_cache), "PATH": "/usr/bin:/bin",
           "SPEEDLOOP_LOCKS": str(locks), "PYTHONUNBUFFERED": "1"}
    with device_lock("cpu"):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        line = proc.stderr.readline()
        assert "waiting for the cpu lock (held by pid" in line
        assert proc.poll() is None  # still waiting while we hold it
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["status"] == "ok"


def test_unknown_preset_is_a_clear_error(data_cache):
    code, _, log = run_train(data_cache, "--preset", "gpu-huge")
    assert code == 2 and "unknown preset 'gpu-huge'" in log and "cpu-tiny" in log


def test_missing_data_names_the_prepare_command(tmp_path):
    code, _, log = run_train(tmp_path / "empty")
    assert code == 2 and "python -m data prepare embedded" in log


def test_corrupt_shard_names_the_file(data_cache, tmp_path):
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


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "tpu"], "--device tpu: use cpu or cuda"),
        (["--kernels", "cutlass"], "--kernels cutlass: use one of auto, torch, triton"),
        (["--kernels", "triton"], "kernel backend 'triton' was asked for but cannot run"),
        (["--budget-tokens", "0"], "--budget-tokens must be a positive number"),
        (["--budget-seconds", "nan"], "--budget-seconds must be a positive number"),
        (["--data", "../elsewhere"], "not a plain directory name"),
        (["--log-every", "0"], "--log-every must be at least 1, got 0"),
        (["--seed", "-1"], "--seed must be in [0, 2^63), got -1"),
        (["--target-loss", "inf"], "--target-loss must be a positive finite number, got inf"),
        (["--target-loss", "nan"], "--target-loss must be a positive finite number, got nan"),
        (["--target-loss", "-2"], "--target-loss must be a positive finite number, got -2"),
        (["--out", "/dev/null/x.json"], "--out /dev/null/x.json: cannot write there"),
        (["--checkpoint", "/proc/x.pt"], "--checkpoint /proc/x.pt: cannot write there"),
        (["--nproc", "0"], "--nproc must be at least 1"),
    ],
)
def test_bad_flags_are_one_line_errors(data_cache, flags, message):
    code, _, log = run_train(data_cache, *flags)
    assert code == 2 and message in log, log
    assert "Traceback" not in log and len(log.strip().splitlines()) == 1, log


def _broken_cache(data_cache: Path, tmp_path: Path) -> Path:
    broken = tmp_path / "cache"
    shutil.copytree(data_cache, broken, ignore=shutil.ignore_patterns("locks"))
    return broken


def test_a_truncated_val_shard_is_one_line(data_cache, tmp_path):
    cache = _broken_cache(data_cache, tmp_path)
    shard = cache / "embedded" / "val_000.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    code, _, log = run_train(cache)
    assert code == 2 and str(shard) in log and "Traceback" not in log, log


def test_a_missing_byte_table_is_one_line(data_cache, tmp_path):
    cache = _broken_cache(data_cache, tmp_path)
    (cache / "embedded" / "token_bytes.npy").unlink()
    code, _, log = run_train(cache)
    assert code == 2 and "token_bytes.npy" in log and "--force" in log, log
    assert "Traceback" not in log


def test_token_ids_outside_the_vocabulary_are_one_line(data_cache, tmp_path):
    """A corrupt train shard (ids past the vocabulary) is bad input, named before the
    candidate's embedding sees it, not an IndexError from inside the model."""
    from data.shards import read_shard, write_shard

    cache = _broken_cache(data_cache, tmp_path)
    shard = cache / "embedded" / "train_000.bin"
    tokens = read_shard(shard).copy()
    tokens[::97] = 65535
    write_shard(shard, tokens)
    code, _, log = run_train(cache, "--budget-tokens", "4096")
    assert code == 2 and "outside the vocabulary" in log and "Traceback" not in log, log
