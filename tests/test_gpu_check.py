"""bench/gpu_check.py's parts that run without a GPU: its steps against a deadline (real
child processes), pytest's summary read back, and its refusal on a machine without CUDA."""

import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import Steps, pytest_summary

PY = sys.executable


def test_steps_record_ok_failed_timeout_and_cut_against_the_deadline(tmp_path):
    # Limits generous enough for a loaded machine's Python start-up: nothing here depends on
    # this machine's speed but the slow step, which sleeps far past its limit.
    steps = Steps(deadline_s=300.0, limits={"ok": 60, "bad": 60, "slow": 4.0, "late": 60},
                  min_s=0.1)
    assert steps.run("ok", [PY, "-c", "print('hi')"]).stdout == "hi\n"
    assert steps.run("bad", [PY, "-c", "import sys; sys.exit('broken input')"]) is None
    # A step whose own child outlives it: the timeout ends the whole process group.
    pid_file = tmp_path / "pid"
    slow = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
            f"'import time; time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); "
            "time.sleep(60)")
    assert steps.run("slow", [PY, "-c", slow]) is None
    assert pid_file.exists(), "the slow step was killed before it started its child"
    grandchild = Path(f"/proc/{pid_file.read_text()}")
    try:  # gone, a zombie, or its pid already reused by another process
        alive = ("time.sleep(60)" in (grandchild / "cmdline").read_text()
                 and "Z" not in (grandchild / "stat").read_text().split()[2])
    except OSError:
        alive = False
    assert not alive, "the slow step's child outlived the step's timeout"
    steps.end = 0.0  # the deadline has passed
    assert steps.run("late", [PY, "-c", "print('never')"]) is None
    assert [(r["name"], r["status"]) for r in steps.rows] == [
        ("ok", "ok"), ("bad", "failed"), ("slow", "timeout"), ("late", "cut")]
    assert steps.rows[1]["detail"] == "exit 1: broken input"
    assert 3.9 < steps.rows[2]["seconds"] < 30 and steps.rows[2]["detail"] == "killed after 4 s"


def test_pytest_summary_is_read_from_the_last_line():
    out = "....s.\n===== 5 passed, 1 skipped, 2 deselected in 3.21s =====\n"
    assert pytest_summary(out) == "5 passed, 1 skipped, 2 deselected"
    assert pytest_summary("") == "no summary"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_gpu_check_needs_a_gpu(capsys):
    assert gpu_check.main([]) == 2
    assert capsys.readouterr().err == "gpu-check needs a CUDA GPU; none is visible\n"
