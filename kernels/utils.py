"""Helpers shared by the kernel files: interpreter detection, autotune configs, launch checks
and output allocation.

Nothing here chooses an implementation (that is kernels.dispatch) and nothing here runs
at import time beyond reading TRITON_INTERPRET, which must be set before this module is
imported (tests/conftest.py does it on machines without CUDA).
"""

import os
from contextlib import contextmanager

import torch
import triton

# Under the interpreter, kernels run on CPU tensors with numpy: correct but slow, no
# autotuning (it needs GPU timers) and bf16 tl.dot gives wrong results.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The torch.library namespace of every launcher: torch.ops.speedloop.<name>.
LIBRARY = "speedloop"


def autotune_configs(gpu: list[triton.Config], interpret: triton.Config) -> list[triton.Config]:
    """The configs to autotune over: the list on a GPU, one fixed config in the interpreter.

    The interpreter config is chosen for test speed (few, small programs), not for speed on
    a GPU, and it is the only config the CPU tests run: keep it small enough that the test
    shapes exercise every masked edge and every loop.
    """
    return [interpret] if INTERPRET else gpu


def prune_row_tiles(max_elements: int):
    """An `early_config_prune` that drops configs whose (BLOCK_M, BLOCK_N) tile is too big.

    For row kernels whose host launcher passes BLOCK_N (a whole row) and whose configs set
    BLOCK_M (rows per program): more than `max_elements` fp32 values per program spill
    registers.
    """

    def prune(configs, named_args, **kwargs):
        kept = [c for c in configs if c.kwargs["BLOCK_M"] * kwargs["BLOCK_N"] <= max_elements]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]

    return prune


def check_launchable(*tensors: torch.Tensor) -> None:
    """Fail clearly when a triton kernel is about to get tensors it cannot read."""
    for t in tensors:
        if t.device.type != "cuda" and not INTERPRET:
            raise RuntimeError(
                f"kernels: the triton backend got a tensor on '{t.device}'; triton kernels "
                "need CUDA tensors, or TRITON_INTERPRET=1 set before `kernels` is imported "
                "(CPU tests). Use kernels.dispatch.set_backend('torch') on CPU."
            )


def persistent_programs(device: torch.device, n_blocks: int) -> int:
    """How many programs a persistent (grid-stride) kernel launches for `n_blocks` of work.

    Two per SM on a GPU keeps every SM busy while bounding the per-program partial
    results (e.g. RMSNorm's weight gradient); the interpreter runs programs one by one,
    so there a few programs are fastest.
    """
    if device.type == "cuda":
        n_sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_blocks, 2 * n_sms))
    return max(1, min(n_blocks, 4))


_poison = False


@contextmanager
def poison_outputs():
    """Fill every launcher output buffer with NaN (floats) or -1 (integers) in this block.

    Tests run the kernels inside this, so an element a kernel forgot to write fails the
    comparison instead of passing by luck of what `torch.empty` returned.
    """
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for launcher outputs: poisoned inside `poison_outputs()`."""
    if not _poison:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)
