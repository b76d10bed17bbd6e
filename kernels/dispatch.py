"""The one switch that chooses which implementation of the kernels runs.

Backends: "torch" (the pure-torch references, every device) and "triton" (the fused
kernels; CUDA, or CPU under TRITON_INTERPRET=1 for tests). The harness resolves the
backend once per run and records it in the result JSON, so every number says which
kernels produced it. Nothing here changes at import time, and a backend that was asked
for but cannot run is an error, never a silent fall back to the other one.
"""

import os
from contextlib import contextmanager

BACKENDS = ("torch", "triton")
_backend = "torch"


def triton_available(device_type: str) -> tuple[bool, str]:
    """Whether the triton backend can run on this device type, and if not, why."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    if device_type == "cuda":
        return True, ""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, f"triton kernels need CUDA or TRITON_INTERPRET=1, not device '{device_type}'"


def resolve(requested: str, device_type: str) -> str:
    """Turn a request ("auto", "torch" or "triton") into the backend that will run.

    "auto" is triton on CUDA when triton is installed, torch everywhere else (the
    interpreter is for correctness tests, far too slow to train with).
    """
    if requested == "auto":
        return "triton" if device_type == "cuda" and triton_available("cuda")[0] else "torch"
    if requested not in BACKENDS:
        raise ValueError(f"unknown kernel backend '{requested}': use auto, torch or triton")
    if requested == "triton":
        ok, why = triton_available(device_type)
        if not ok:
            raise RuntimeError(f"kernel backend 'triton' was asked for but cannot run: {why}")
    return requested


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend '{name}': use torch or triton")
    _backend = name


def get_backend() -> str:
    return _backend


@contextmanager
def use(name: str):
    """Run a block with one backend, restoring the previous one after (tests use this)."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)
