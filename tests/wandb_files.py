"""Offline W&B runs read back with W&B's own reader of .wandb files (`wandb leet inspect
--json`), for the tests of tracking: every record, or the run's state at its last write."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _inspect(run_dir: Path, *flags: str) -> str:
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags,
                           str(run_dir)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def records(run_dir: Path) -> list[dict]:
    """Every record of the run's transaction log, in order."""
    return [json.loads(line) for line in _inspect(run_dir).splitlines() if line.strip()]


def history(run_dir: Path) -> list[dict]:
    return [r["history"]["item"] for r in records(run_dir) if r["type"] == "history"]


def state(run_dir: Path) -> dict:
    """The run's config, tags, summary and state as its file has them."""
    return json.loads(_inspect(run_dir, "--summary"))


def runs(wandb_dir: Path) -> dict[str, Path]:
    """The offline run folders under `wandb_dir`, by the run id's last part ("session",
    "run3"): the latest folder of each."""
    return {d.name.rsplit("-", 1)[-1]: d for d in sorted(wandb_dir.glob("offline-run-*"))}
