"""The fixed presets, and the checked settings of one run: preset, device, data, kernels.

Shared by the harness (train.py), the checkpoint scorer (bench/score.py), the profiler and
the engine, so every tool builds a run from the same definition. This module never imports
the research surface (model/, kernels/): which kernel backend can run is the sandboxed
worker's answer, not a guess made here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from data.cache import load_meta

KERNEL_BACKENDS = ("auto", "torch", "triton")


class UsageError(Exception):
    """Bad input from the user: printed as one line without a traceback, exit code 2."""


@dataclass(frozen=True)
class Preset:
    device: str  # where it runs: "cpu" or "cuda"
    data: str  # default dataset (a name under the data cache)
    budget_tokens: int  # default budget; also the schedule's horizon under --target-loss
    eval_tokens: int  # validation targets per evaluation (rows of eval_seq_len from the split)
    eval_seq_len: int
    eval_batch_size: int
    n_evals: int  # the curve's resolution: see bench/curves.py eval_points
    target_loss: float | None  # the preset's default target for time-to-loss


PRESETS = {
    "cpu-tiny": Preset("cpu", "embedded", 180_224, 16_384, 128, 64, 4, None),
    "gpu-small": Preset("cuda", "fineweb", 200_000_000, 2_097_152, 1024, 32, 20, None),
    "gpt2-124m": Preset("cuda", "fineweb", 4_000_000_000, 10_485_760, 1024, 32, 16, 3.28),
}


@dataclass
class Setup:
    """What a run is: the preset, the device, the data and the kernels, all checked."""

    name: str
    preset: Preset
    device: torch.device
    data: str
    meta: dict  # the dataset's meta.json
    kernels: str  # the backend asked for: auto, torch or triton (the worker resolves auto)
    compile: bool


def add_setup_arguments(p: argparse.ArgumentParser) -> None:
    """The flags resolve_setup takes, for train.py and the tools that build the surface
    exactly as it does (bench/profile.py, bench/score.py)."""
    p.add_argument("--data", help="dataset name in the data cache (default: the preset's)")
    p.add_argument("--device", help="cpu or cuda (default: the preset's)")
    p.add_argument(
        "--kernels", default="auto", help="kernel backend: auto (triton on CUDA), torch, triton"
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model (default: on for CUDA, off for CPU)",
    )


def resolve_setup(
    preset: str,
    device: str | None = None,
    data: str | None = None,
    kernel_backend: str = "auto",
    compile: bool | None = None,
) -> Setup:
    """Check a run's settings; UsageError (or DataMissingError) names what is wrong."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    config = PRESETS[preset]
    try:
        dev = torch.device(device or config.device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"preset '{preset}' runs on CUDA but no CUDA GPU is visible; "
            "use --preset cpu-tiny, or --device cpu to force it onto the CPU"
        )
    if kernel_backend not in KERNEL_BACKENDS:
        raise UsageError(f"--kernels {kernel_backend}: use one of {', '.join(KERNEL_BACKENDS)}")
    data_name = data or config.data
    try:
        meta = load_meta(data_name)
    except ValueError as e:  # a bad dataset name
        raise UsageError(str(e)) from None
    compile_model = dev.type == "cuda" if compile is None else compile
    return Setup(preset, config, dev, data_name, meta, kernel_backend, compile_model)
