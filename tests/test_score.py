"""bench.score: a run's final weights scored afresh by a new sandboxed forward worker give
the val loss the run reported (what `eval-reproduce` checks at acceptance), and the
held-out slice beside it; bad input is one line."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_checkpoint_scores_what_its_run_reported(tmp_path, data_cache):
    env = {"SPEEDLOOP_DATA": str(data_cache), "PATH": "/usr/bin:/bin",
           "SPEEDLOOP_LOCKS": str(tmp_path / "locks")}
    checkpoint = tmp_path / "final.pt"
    train = [sys.executable, "train.py", "--preset", "cpu-tiny", "--budget-tokens", "4096",
             "--checkpoint", str(checkpoint)]
    proc = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["checkpoint"] == str(checkpoint) and checkpoint.is_file()

    score = [sys.executable, "-m", "bench.score", "--preset", "cpu-tiny", str(checkpoint),
             str(checkpoint)]
    proc = subprocess.run(score, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [row["checkpoint"] for row in rows] == [str(checkpoint)] * 2
    for row in rows:  # each by its own fresh worker, in another row order: the same loss
        assert abs(row["val"]["loss"] - result["val_loss"]) < 1e-5
        assert row["val"]["twins_ok"] and row["holdout"]["twins_ok"]
        assert row["holdout"]["loss"] > 0 and row["holdout"]["loss"] != row["val"]["loss"]

    missing = subprocess.run([*score[:5], str(tmp_path / "nope.pt")], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no checkpoint at" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
