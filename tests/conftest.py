"""Test set-up shared by every test file.

TRITON_INTERPRET must be set before any kernel module is imported, so it is set here,
at the very top, whenever no CUDA GPU is present. On a GPU machine the same kernel tests
run natively.
"""

import os

# isort: off
import agent  # noqa: F401  (first: the engine's BLAS setting must precede numpy's load)
import torch
# isort: on

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by `make gpu-check`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """The device kernel and model tests run on: CUDA when present, else CPU."""
    return DEVICE


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """A data cache holding the real embedded dataset, prepared once per test session (about
    5 s). Tests only read it; one that must break it copies it first."""
    from data.prepare import prepare_embedded

    cache = tmp_path_factory.mktemp("speedloop-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPEEDLOOP_DATA", str(cache))
        prepare_embedded()
    return cache


@pytest.fixture(scope="session")
def fake_repo(tmp_path_factory) -> Path:
    """This working tree as a repository whose harness is the fast fake of
    tests/fakes/harness.py, for tests that run whole sessions. Sessions add their branches
    and worktrees to it; a test that needs a repository of its own makes one."""
    from fakes.harness import fake_harness_repo

    return fake_harness_repo(tmp_path_factory.mktemp("fake-harness") / "repo")


def pytest_addoption(parser):
    group = parser.getgroup("speedloop kernel benchmarks (tests/bench_kernels.py)")
    group.addoption("--bench-preset", help="benchmark at this preset's shapes, or 'tiny' "
                    "(default: gpu-small on CUDA, tiny on the CPU)")
    group.addoption("--bench-rounds", type=int, help="timed rounds per benchmark")


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    """Every saved benchmark run says which GPU and which torch and triton made it."""
    import triton

    machine_info["speedloop"] = {
        "gpu": torch.cuda.get_device_name() if HAS_CUDA else None,
        "cuda": torch.version.cuda, "torch": torch.__version__, "triton": triton.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }


@pytest.fixture(scope="session")
def killed_session(fake_repo, tmp_path_factory) -> Path:
    """A session on the fake harness with W&B offline, killed with SIGKILL right after its
    fourth decision (tests/fakes/killed_session.py): the baseline, then an accept, a
    refusal, a reject and a step held for review. Returns its run directory, whose wandb/
    holds the offline runs. Tests only read it."""
    import signal
    import subprocess
    import sys

    from fakes.harness import patch_of

    root = tmp_path_factory.mktemp("killed-session")
    patches = root / "patches"
    patches.mkdir()
    speed = lambda old, new: patch_of(fake_repo, {"model/speed.txt": new}).replace(  # noqa: E731
        "-1.0", f"-{old}")
    for name, old, new in (("01-faster", "1.0", "1.3\n"), ("02-stale", "0.7", "0.5\n"),
                           ("03-slower", "1.3", "1.2\n"), ("04-implausible", "1.3", "4.0\n")):
        (patches / f"{name}.patch").write_text(speed(old, new))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PYTHONPATH": str(fake_repo), "SPEEDLOOP_LOCKS": str(root / "locks")}
    for name in ("WANDB_API_KEY", "WANDB_DIR", "SPEEDLOOP_FAULT_AT", "SPEEDLOOP_FAULT_TRACE"):
        env.pop(name, None)
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[name] = str(root / name)
    script = Path(__file__).parent / "fakes" / "killed_session.py"
    run_dir = root / "session"
    done = subprocess.run([sys.executable, str(script), str(fake_repo), str(run_dir),
                           str(patches), "4"], cwd=fake_repo, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    return run_dir
