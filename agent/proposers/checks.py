"""The quick checks of an edited surface, run before a candidate is taken: a CPU smoke of the
recipe (two train steps, the logits' contract, the twin rows of the evaluator, the session
preset's recipe built on the meta device) and, when asked, the kernel unit tests.

They import the edited surface, so they run as supervised children (agent/child.py), in
the sandbox, with a timeout; a failure comes back as CheckFailed with the output's tail.
What this module must never do: import the surface in the engine's process.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from agent import child
from bench.sandbox import Sandbox, SandboxError, available

MAX_OUTPUT_CHARS = 6000  # tail of a check's output sent back to the model

# The quick CPU smoke (argv[1]: the session's preset): two train steps of the cpu-tiny
# recipe on random tokens, finite losses, fp32 logits of the right shape, the evaluator's
# twin rows on random text (a look at the future or across rows shows there), and the
# session preset's recipe built on the meta device (its shapes and optimizers, without
# memory or time). It runs sandboxed like every process that imports the surface.
SMOKE = r"""
import math, sys
import numpy as np
import torch
import kernels
from bench.evaluator import EvalSet, evaluate
from model import build_recipe

preset, vocab, cpu = sys.argv[1], 256, torch.device("cpu")
kernels.set_backend("torch")
torch.manual_seed(0)
recipe = build_recipe("cpu-tiny", cpu, vocab, compile=False)
for step in range(2):
    _, T = recipe.batch_shape(step / 2)
    x = torch.randint(0, vocab, (2, T))
    loss = float(recipe.train_step(x, torch.roll(x, -1, 1), step / 2))
    if not math.isfinite(loss):
        sys.exit(f"cpu-tiny train step {step}: the loss is {loss}")
    print(f"cpu-tiny train step {step}: loss {loss:.4f}")
logits = recipe.logits(x)
if tuple(logits.shape) != (2, T, vocab) or logits.dtype != torch.float32:
    sys.exit(f"recipe.logits gave {logits.dtype} {tuple(logits.shape)}, "
             f"expected float32 {(2, T, vocab)}")
text = np.random.default_rng(0).integers(0, vocab, 8 * (T + 1))
rows = EvalSet(text, T, 4, 8 * T, vocab)
with torch.no_grad():
    ev = evaluate(lambda x: recipe.logits(torch.from_numpy(x)), rows, cpu,
                  np.random.default_rng(0))
if not ev.twins.ok:
    sys.exit(f"the model is not causal: a row's log-probabilities moved by "
             f"{ev.twins.max_change:.3g} when later tokens or other rows changed")
print(f"twin rows: ok (max change {ev.twins.max_change:.2g})")
if preset != "cpu-tiny":
    build_recipe(preset, torch.device("meta"), 50257, compile=False)
    print(f"{preset}: the recipe builds (meta device)")
print("smoke: ok")
"""


@dataclass
class CheckSettings:
    timeout_s: float = 300.0  # per check command
    device: str = "cpu"  # "cpu": hide GPUs, so checks never disturb a benchmark running there
    kernel_tests: bool = True  # whether the run_checks tool may run the kernel tests
    require_checks: bool = True  # submit needs passing checks after the last edit
    sandbox: bool = True  # the checks import the surface: they run sandboxed


class CheckFailed(Exception):
    """A check that did not pass; the message says which, how, and its output's tail."""


def run_command(cmd: list[str] | str, cwd: Path, timeout_s: float, env: dict | None = None,
                stdin: str | None = None, sandbox: Sandbox | None = None,
                **confine) -> tuple[int | None, str]:
    """Run a command (a shell line when a string) as a supervised child (agent/child.py);
    (exit code, or None on timeout; its output). With `sandbox`, inside it (`confine`:
    Sandbox.command's keywords; `env` is then what the sandboxed process may see besides
    the allow-list)."""
    argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else cmd
    popen = None
    if sandbox is not None:
        def popen(argv, **streams):
            return sandbox.popen(argv, cwd, env=env or {}, **confine, **streams)
    done = child.run_tool(argv, cwd, timeout_s, env=env, stdin=stdin, merge=True, popen=popen)
    return done.code, done.out


def tail(text: str, limit: int = MAX_OUTPUT_CHARS) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def quick_checks(root: Path, preset: str, settings: CheckSettings,
               kernel_tests: bool = False) -> str:
    """Run the smoke (and the kernel tests) on the surface of the worktree `root`; a report
    of what passed, or CheckFailed."""
    commands = [[sys.executable, "-c", SMOKE, preset]]
    if kernel_tests:
        if not settings.kernel_tests:
            raise CheckFailed("the kernel tests are switched off for this session "
                              "(kernel_tests=false in the proposer's config)")
        tests = sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_kernels_*.py"))
        if not tests:
            raise CheckFailed("this worktree has no kernel tests (tests/test_kernels_*.py)")
        commands.append([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                         *tests])
    env = {"PYTHONDONTWRITEBYTECODE": "1"}  # what the checks see besides the allow-list
    if settings.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    reports = []
    for cmd in commands:
        name = "smoke" if cmd[1] == "-c" else "kernel tests"
        try:
            sandbox = available() if settings.sandbox else Sandbox(None)
        except SandboxError as e:
            raise CheckFailed(f"{name}: cannot run sandboxed here: {e}") from None
        code, out = run_command(cmd, root, settings.timeout_s, env, sandbox=sandbox,
                                gpu=settings.device != "cpu")
        if code is None:
            raise CheckFailed(f"{name}: timed out after {settings.timeout_s:.0f} s (a hang, or "
                              f"far too slow?)\n{tail(out)}")
        if code != 0:
            raise CheckFailed(f"{name} failed (exit {code}):\n{tail(out)}")
        reports.append(f"{name}: passed\n{tail(out, 1500)}")
    return "\n".join(reports)
