"""`make gpu-check`: a GPU machine's health check in one short loan, as one table.

    python -m bench.gpu_check [--seconds 30] [--deadline 450] [--out-dir bench/results]

Steps, each in a child process with the time left: the GPU tests (kernels, model,
evaluator, natively); gpu-small runs with the triton kernels and with the torch references
(tokens/s, MFU, val loss, the untimed startup/evaluation/other seconds, the GPU's
telemetry); the pytest-benchmark kernel suite (tests/bench_kernels.py: triton against
eager and torch.compile, with compile times). A step that would pass the deadline is cut
and shown as such, so the whole check ends within it (450 s: under 8 minutes with the
start). The table (bench/gpu_report.py) is printed at the end and written with the
collected JSON to --out-dir as gpu-check-<date>.{md,json}; record it in bench/RESULTS.md.

Runs with the Python already on a GPU machine and installs nothing: it needs torch,
triton, numpy, tiktoken and pytest (pytest-benchmark for the kernel step, which is skipped
with its reason without it), never wandb, anthropic or rustbpe. Uses FineWeb when it is
prepared, else the embedded corpus (prepare it elsewhere and carry the cache folder,
pointing SPEEDLOOP_DATA at it). Must never be part of a result the judge sees.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import gpu_report
from bench.kernels_bench import STORAGE, missing_plugin, pytest_args
from bench.sandbox import SandboxError, available
from data.cache import dataset_dir

ROOT = Path(__file__).resolve().parent.parent
GPU_TESTS = ["tests/test_kernels_cross_entropy.py", "tests/test_kernels_dispatch.py",
             "tests/test_kernels_relu_squared.py", "tests/test_kernels_rms_norm.py",
             "tests/test_kernels_rotary.py", "tests/test_kernels_xxt.py",
             "tests/test_kernels_sm90_compile.py",
             "tests/test_model.py", "tests/test_evaluator.py"]
# Seconds each step may take at most; the deadline can cut them shorter.
STEP_LIMITS = {"GPU tests": 150, "gpu-small triton": 170, "gpu-small torch": 170,
               "kernel benchmarks": 200}


class Steps:
    """The check's steps: each one's status, seconds and a short detail, against a deadline."""

    def __init__(self, deadline_s: float, limits: dict[str, float] = STEP_LIMITS,
                 min_s: float = 10.0):
        self.end = time.monotonic() + deadline_s
        self.limits, self.min_s = limits, min_s  # a step with less time left is cut
        self.rows: list[dict] = []

    def run(self, name: str, cmd: list[str]) -> subprocess.CompletedProcess | None:
        """Run one step's command; None when it failed, timed out or had no time left."""
        limit = min(self.limits[name], self.end - time.monotonic())
        if limit < self.min_s:
            self.add(name, "cut", 0.0, "no time left before the deadline")
            return None
        t = time.monotonic()
        # Its own process group, so a step cut at its limit takes its children with it.
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True)
        try:
            stdout, stderr = child.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            _end_group(child)
            self.add(name, "timeout", time.monotonic() - t, f"killed after {limit:.0f} s")
            return None
        proc = subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
        seconds = time.monotonic() - t
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
            self.add(name, "failed", seconds, f"exit {proc.returncode}: {tail[0][:200]}")
            print((proc.stdout + proc.stderr)[-3000:], file=sys.stderr)
            return None
        self.add(name, "ok", seconds, "")
        return proc

    def add(self, name: str, status: str, seconds: float, detail: str) -> None:
        self.rows.append({"name": name, "status": status, "seconds": seconds, "detail": detail})
        print(f"[gpu-check] {name}: {status} in {seconds:.0f} s {detail}", flush=True)


def _end_group(child: subprocess.Popen) -> None:
    """SIGTERM to the child's process group (train.py unwinds its workers on it), SIGKILL
    to what is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.communicate(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def pytest_summary(output: str) -> str:
    """`212 passed, 3 skipped` from pytest's last line."""
    found = re.findall(r"(\d+ (?:passed|failed|skipped|errors?|xfailed|xpassed|deselected))",
                       output.strip().splitlines()[-1] if output.strip() else "")
    return ", ".join(found) or "no summary"


def train_cmd(data: str, kernels: str, seconds: float, sandbox: bool) -> list[str]:
    cmd = [sys.executable, "train.py", "--preset", "gpu-small", "--data", data,
           "--budget-seconds", str(seconds), "--kernels", kernels, "--log-every", "50"]
    return cmd + ([] if sandbox else ["--no-sandbox"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=30, help="timed seconds per training run")
    p.add_argument("--deadline", type=float, default=450, help="seconds for the whole check")
    p.add_argument("--out-dir", type=Path, default=STORAGE, help="where the table and JSON go")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    import triton

    data = "fineweb" if (dataset_dir("fineweb") / "meta.json").is_file() else "embedded"
    try:
        available()
        sandbox = True
    except SandboxError as e:
        print(f"no sandbox on this machine ({e}): the runs below are unconfined", flush=True)
        sandbox = False
    steps = Steps(args.deadline)
    check = {"machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "triton": triton.__version__, "sandbox": sandbox, "data": data},
             "steps": steps.rows, "runs": {}, "kernels": None}

    proc = steps.run("GPU tests", [sys.executable, "-m", "pytest", "-q", "-p",
                                   "no:cacheprovider", *GPU_TESTS])
    if proc is not None:
        steps.rows[-1]["detail"] = pytest_summary(proc.stdout)
    for kernels in ("triton", "torch"):
        proc = steps.run(f"gpu-small {kernels}", train_cmd(data, kernels, args.seconds, sandbox))
        if proc is not None:
            check["runs"][kernels] = json.loads(proc.stdout.strip().splitlines()[-1])

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bench_json = args.out_dir / f"kernels-{stamp}.json"
    reason = missing_plugin()
    if reason is not None:
        steps.add("kernel benchmarks", "skipped", 0.0, reason)
    elif steps.run("kernel benchmarks", [sys.executable, "-m", "pytest",
                                         *pytest_args(None, bench_json, None)]) is not None:
        check["kernels"] = json.loads(bench_json.read_text())
        bench_json.unlink()  # its autosaved copy is in bench/results/<machine>/

    text = gpu_report.table(check)
    print("\n" + text)
    (args.out_dir / f"gpu-check-{stamp}.json").write_text(json.dumps(check, indent=1))
    (args.out_dir / f"gpu-check-{stamp}.md").write_text(text + "\n")
    print(f"\nwritten to {args.out_dir}/gpu-check-{stamp}.{{md,json}}: record it in "
          "bench/RESULTS.md")
    return 0 if all(s["status"] in ("ok", "skipped") for s in steps.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
