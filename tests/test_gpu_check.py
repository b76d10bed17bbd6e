"""bench/gpu_check.py's parts that run without a GPU: its steps against a deadline (real
child processes), pytest's summary read back, and its refusal on a machine without CUDA."""

import sys

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import Steps, pytest_summary

PY = sys.executable


def test_steps_record_ok_failed_timeout_and_cut_against_the_deadline():
    steps = Steps(deadline_s=5.0, limits={"ok": 30, "bad": 30, "slow": 0.5, "late": 30},
                  min_s=0.1)
    assert steps.run("ok", [PY, "-c", "print('hi')"]).stdout == "hi\n"
    assert steps.run("bad", [PY, "-c", "import sys; sys.exit('broken input')"]) is None
    assert steps.run("slow", [PY, "-c", "import time; time.sleep(30)"]) is None
    steps.end = 0.0  # the deadline has passed
    assert steps.run("late", [PY, "-c", "print('never')"]) is None
    assert [(r["name"], r["status"]) for r in steps.rows] == [
        ("ok", "ok"), ("bad", "failed"), ("slow", "timeout"), ("late", "cut")]
    assert steps.rows[1]["detail"] == "exit 1: broken input"
    assert 0.4 < steps.rows[2]["seconds"] < 5 and steps.rows[2]["detail"] == "killed after 0 s"


def test_pytest_summary_is_read_from_the_last_line():
    out = "....s.\n===== 5 passed, 1 skipped, 2 deselected in 3.21s =====\n"
    assert pytest_summary(out) == "5 passed, 1 skipped, 2 deselected"
    assert pytest_summary("") == "no summary"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_gpu_check_needs_a_gpu(capsys):
    assert gpu_check.main([]) == 2
    assert capsys.readouterr().err == "gpu-check needs a CUDA GPU; none is visible\n"
