"""Scores saved weights on the validation and held-out slices, on the trusted side.

    python -m bench.score --preset P [--data D] [--splits holdout,val] CHECKPOINT...

For the checks at acceptance: each checkpoint (a run's final weights) is scored by a fresh
sandboxed forward worker that has seen nothing before, with the same trusted evaluator
and twin rows as a run's evaluations (bench/evaluator.py). A forward pass that learned from
the validation rows it was shown during its run therefore cannot carry that into these
numbers, and a run whose reported loss is not what its weights score is caught
(`eval-reproduce` in agent/acceptance.py). Prints one JSON line: a list with one entry per
checkpoint, {"checkpoint", split: {"loss", "bpb", "twins_ok"}}. Exit 2 for bad input, 1
when a worker fails.

What it must never do: import the research surface, or reuse a worker for two checkpoints.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.candidate import Forward, WorkerFailed, WorkerUsageError
from bench.evaluator import EvalSet, evaluate
from bench.presets import UsageError, add_setup_arguments, resolve_setup
from bench.sandbox import Sandbox, SandboxError, available
from data.cache import DataMissingError, dataset_dir
from data.loader import read_split_tokens
from data.shards import ShardError

REPO = Path(__file__).resolve().parent.parent


def score(checkpoints: list[Path], preset: str, splits: list[str], *, data: str | None = None,
          device: str | None = None, kernels: str = "auto",
          sandbox: Sandbox | None = None) -> list[dict]:
    setup = resolve_setup(preset, device, data, kernels, compile=False)
    sandbox = sandbox or available()
    vocab, p = setup.meta["vocab_size"], setup.preset
    token_bytes = None
    if setup.meta.get("token_bytes"):
        token_bytes = np.load(dataset_dir(setup.data) / setup.meta["token_bytes"])
    try:
        sets = {s: EvalSet(read_split_tokens(setup.data, s), p.eval_seq_len,
                           p.eval_batch_size, p.eval_tokens, vocab, token_bytes, name=s)
                for s in splits}
    except ValueError as e:  # an unknown split, too short, or ids outside the vocabulary
        raise UsageError(f"dataset {setup.data!r}: {e}") from None
    rng = np.random.default_rng()
    out = []
    for checkpoint in checkpoints:
        # The worker sees only a private copy, in a folder of its own.
        folder = Path(tempfile.mkdtemp(prefix="speedloop-score-"))
        try:
            shutil.copyfile(checkpoint, folder / "weights.pt")
            forward = Forward(sandbox, REPO, folder, preset=preset, device=setup.device,
                              kernels=setup.kernels, vocab=vocab,
                              batch=(p.eval_batch_size, p.eval_seq_len))
            try:
                forward.ready()
                forward.load(folder / "weights.pt")
                row = {"checkpoint": str(checkpoint)}
                for name, evalset in sets.items():
                    try:
                        ev = evaluate(lambda x, f=forward: f.logits(x).to(setup.device),
                                      evalset, setup.device, rng)
                    except ValueError as e:  # logits of the wrong shape
                        raise WorkerFailed(f"the forward pass: {e}") from None
                    row[name] = {"loss": ev.loss, "bpb": ev.bpb, "twins_ok": ev.twins.ok}
                out.append(row)
            finally:
                forward.close()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", required=True, help="the preset whose model and slices to use")
    add_setup_arguments(p)
    p.add_argument("--splits", default="holdout,val",
                   help="comma-separated splits, scored in this order by each worker")
    p.add_argument("--no-sandbox", action="store_true", help="run the surface unconfined")
    p.add_argument("checkpoints", nargs="+", type=Path, help="weights saved by train.py")
    args = p.parse_args(argv)
    try:
        missing = [str(c) for c in args.checkpoints if not c.is_file()]
        if missing:
            raise UsageError(f"no checkpoint at {', '.join(missing)}")
        rows = score(args.checkpoints, args.preset, [s for s in args.splits.split(",") if s],
                     data=args.data, device=args.device, kernels=args.kernels,
                     sandbox=Sandbox(None) if args.no_sandbox else None)
    except (UsageError, DataMissingError, ShardError, SandboxError, WorkerUsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (WorkerFailed, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(rows), flush=True)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
