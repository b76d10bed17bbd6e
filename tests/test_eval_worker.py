"""The evaluator process (threat 3): train.py's evaluations come from it, and the loop's
check at acceptance reads a saved checkpoint with it on the validation and holdout slices."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_a_checkpoint_scores_the_same_in_the_standalone_evaluator(tmp_path, data_cache):
    env = {"SPEEDLOOP_DATA": str(data_cache), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    checkpoint = tmp_path / "final.pt"
    train = [sys.executable, "train.py", "--preset", "cpu-tiny", "--budget-tokens", "4096",
             "--seed", "5", "--out", str(tmp_path / "r.json"),
             "--checkpoint", str(checkpoint)]  # fmt: skip
    proc = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["checkpoint"] == str(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    assert (saved["preset"], saved["data"], saved["seed"]) == ("cpu-tiny", "embedded", 5)

    evaluate = [sys.executable, "-m", "bench.eval_worker", "--preset", "cpu-tiny",
                "--splits", "val,holdout", "--checkpoints", str(checkpoint)]  # fmt: skip
    proc = subprocess.run(evaluate, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout)  # stdout is the reply channel: one JSON line, nothing else
    assert row["val"]["loss"] == result["val_loss"]  # the same weights, slice and arithmetic
    assert row["val"]["tokens"] == row["holdout"]["tokens"] == 16_384
    assert row["holdout"]["loss"] != row["val"]["loss"] and 3 < row["holdout"]["loss"] < 9
