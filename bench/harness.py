"""The trusted harness's parts (train.py is its script): the clock and the budget, the data
only it reads, each evaluation with the trainer frozen, the device lock, its work folder.

Nothing here imports the research surface: the candidate's code is reached only through
the sandboxed workers (bench/candidate.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import protocol
from bench.candidate import Forward, Trainer, WorkerFailed
from bench.evaluator import EvalSet, evaluate
from bench.locks import LOCK_HELD_ENV, device_lock
from bench.presets import Setup, UsageError
from data.cache import DataMissingError, dataset_dir
from data.loader import open_split, read_split_tokens

WORK_PREFIX = "speedloop-run-"  # then the harness's pid: folders of killed runs are swept


class Clock:
    """Timed seconds on this process's own clock, pausable for evaluations."""

    def __init__(self):
        self.before, self.started = 0.0, None

    def start(self) -> None:
        self.started = time.perf_counter()

    def pause(self) -> None:
        if self.started is not None:
            self.before += time.perf_counter() - self.started
            self.started = None

    def elapsed(self) -> float:
        running = 0.0 if self.started is None else time.perf_counter() - self.started
        return self.before + running


class Budget:
    """Progress in [0, 1] through the run, in tokens or in timed seconds."""

    def __init__(self, tokens: int | None, seconds: float | None):
        self.tokens, self.seconds = tokens, seconds

    def progress(self, tokens: int, clock: Clock) -> float:
        if self.seconds is not None:
            return clock.elapsed() / self.seconds
        return tokens / self.tokens


def work_dir() -> Path:
    """A private folder for the weights the trainer hands over: in memory (/dev/shm) when it
    has room, else the system's temporary folder. Folders of killed runs are removed."""
    shm = Path("/dev/shm")
    base = None
    if shm.is_dir() and os.access(shm, os.W_OK):
        for old in shm.glob(f"{WORK_PREFIX}*"):
            pid = old.name[len(WORK_PREFIX):].split("-")[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(old, ignore_errors=True)
        if shutil.disk_usage(shm).free > 4 << 30:
            base = shm
    return Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir=base))


class Data:
    """What only the trusted side reads: the training stream and the evaluation rows."""

    def __init__(self, args: argparse.Namespace, setup: Setup):
        self.name, self.vocab, self.nproc = setup.data, setup.meta["vocab_size"], args.nproc
        self.train = open_split(setup.data, "train", args.seed, torch.device("cpu"))
        token_bytes = None
        if setup.meta.get("token_bytes"):
            path = dataset_dir(setup.data) / setup.meta["token_bytes"]
            if not path.is_file():
                raise DataMissingError(f"{path} (the byte table of dataset {setup.data!r}) is "
                                       "missing: rebuild the dataset with its prepare command "
                                       "--force")
            token_bytes = np.load(path)
        p = setup.preset
        try:
            self.val = EvalSet(read_split_tokens(setup.data, "val"), p.eval_seq_len,
                               p.eval_batch_size, p.eval_tokens, self.vocab, token_bytes)
        except ValueError as e:  # too short, or token ids outside the vocabulary
            raise UsageError(f"dataset {setup.data!r}: {e}") from None

    def batch(self, shape) -> tuple[np.ndarray, np.ndarray]:
        """The next training batch of the shape the trainer asked for (its word, checked)."""
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 1 << 24
                           for n in shape)):
            raise WorkerFailed(f"the trainer asked for a batch of shape {shape!r}: it must be "
                               "two positive integers (recipe.batch_shape)")
        batch_size, seq_len = shape
        if batch_size % self.nproc:
            raise UsageError(f"the recipe's batch of {batch_size} sequences does not split over "
                             f"{self.nproc} processes: use an --nproc that divides it")
        try:
            x, y = self.train.next_arrays(batch_size, seq_len)
        except ValueError as e:  # a window longer than the split
            raise UsageError(f"dataset {self.name!r}: {e}") from None
        if int(y.max()) >= self.vocab or int(x.min()) < 0:
            raise UsageError(f"the train split of dataset {self.name!r} holds token ids outside "
                             f"the vocabulary of {self.vocab}: rebuild it with its prepare --force")
        return x, y


class Evaluations:
    """Each evaluation of the run: the trainer's weights taken on the clock, then the clock
    paused and the trainer frozen while the forward worker's logits are scored."""

    def __init__(self, trainer: Trainer, forward: Forward, evalset: EvalSet,
                 device: torch.device, violations: list[dict], threads: int = 0):
        self.trainer, self.forward, self.evalset, self.device = trainer, forward, evalset, device
        # The harness's threads while it scores: every core of the run on a CPU (the trainer
        # is frozen and the forward worker waits while logits are read); 0: leave them be.
        self.threads = threads
        self.violations = violations
        self.rng = np.random.default_rng()  # row order and twins: fresh from the OS every run
        self.curve: list[dict] = []
        self.twins: list[dict] = []
        self.seconds = 0.0
        self.last_weights: Path | None = None

    def __call__(self, steps: int, tokens: int, clock: Clock) -> dict | None:
        """The point of the curve, or None when the weights give no finite loss."""
        self.last_weights = self.trainer.save(f"eval-{len(self.curve) + 1:03d}.pt")
        clock.pause()
        t = time.perf_counter()
        self.trainer.freeze()
        self.forward.thaw()
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads or threads)
        try:
            self.forward.load(self.last_weights)
            ev = evaluate(lambda x: self.forward.logits(x).to(self.device), self.evalset,
                          self.device, self.rng)
        except FloatingPointError:  # NaN or infinite logits: the weights blew up
            ev = None
        except ValueError as e:  # logits of the wrong shape: the candidate's forward is broken
            raise WorkerFailed(f"the forward pass: {e}") from None
        finally:
            torch.set_num_threads(threads)
        self.forward.freeze()
        outside = self.trainer.thaw()
        self.seconds += time.perf_counter() - t
        if outside:
            self.violations.append(protocol.violation(
                "frozen-signals", "signals reached the frozen trainer from outside its "
                f"sandbox: {'; '.join(outside)}"))
        if ev is None:
            return None
        self.twins.append(ev.twins.as_dict())
        if not ev.twins.ok:
            self.violations.append(protocol.violation(
                "twins", f"a twin row's log-probabilities moved by {ev.twins.max_change:.3g} "
                f"(tolerance {ev.twins.tolerance:.3g}) where it repeats its original row: the "
                "forward pass saw past a position, across rows, or changed as it was used"))
        point = dict(tokens=tokens, seconds=clock.elapsed(), val_loss=ev.loss, val_bpb=ev.bpb)
        self.curve.append(point)
        print(protocol.eval_line(steps, tokens, ev.loss, point["seconds"]), flush=True)
        return point


@contextlib.contextmanager
def held_device(device: str):
    """The machine-wide lock of the run's device, unless the runner that started us holds
    it; a run started by hand waits for a session's run to finish, and says so."""
    if os.environ.get(LOCK_HELD_ENV) == device:
        yield
        return
    with device_lock(device, announce=lambda holder: print(
            f"waiting for the {device} lock ({holder})", file=sys.stderr, flush=True)):
        yield
