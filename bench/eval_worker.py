"""The evaluator process: the loss of model checkpoints on the validation and held-out
slices, and the causality probes, in a process of its own.

Threat 3 of bench/INTEGRITY.md: the training process is never given the validation
data. train.py starts this worker (`EvalProcess`) before it builds the surface, and at
every evaluation point hands it a checkpoint of the weights; the worker builds the same
surface model, loads the weights through torch's own `Module.load_state_dict` and
computes the loss from the logits (bench/evaluator.py). The worker's own stdout is the
reply channel: everything else, the surface's prints included, goes to stderr.

    python -m bench.eval_worker --serve --preset P --data D --device DEV --kernels K
        train.py's evaluator: one JSON request per line on stdin, one JSON reply per line.
    python -m bench.eval_worker --preset P [--data D] --splits val,holdout --checkpoints C..
        the loop's check at acceptance: run in the worktree of the commit that produced the
        checkpoints; prints one JSON line, a list with one entry per checkpoint.

What it must never do: train, or let a checkpoint choose which tokens it is evaluated on.
"""

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
DIR_PREFIX = "speedloop-eval-"  # then the pid of train.py: folders of dead runs are swept


class EvalWorkerError(RuntimeError):
    """The evaluator process failed or broke the protocol."""


class Evaluator:
    """The surface's model for one preset, ready to load checkpoints and evaluate them."""

    def __init__(self, preset: str, data: str, device: str | None, kernel_backend: str):
        import kernels
        from model import build_recipe
        from train import resolve_setup

        setup = resolve_setup(preset, device, data, kernel_backend, compile=False)
        kernels.set_backend(setup.kernels)
        self.setup = setup
        self.vocab_size = setup.meta["vocab_size"]
        self.recipe = build_recipe(preset, setup.device, self.vocab_size, compile=False)
        self.recipe.model.eval()
        for param in torch.nn.Module.parameters(self.recipe.model):
            param.requires_grad_(False)  # frozen: evaluation never trains
        self.token_bytes = None
        if setup.meta.get("token_bytes"):  # the byte table that bits per byte needs
            from data.cache import dataset_dir

            self.token_bytes = np.load(dataset_dir(setup.data) / setup.meta["token_bytes"])
        self._tokens: dict[str, np.ndarray] = {}

    def tokens(self, split: str) -> np.ndarray:
        """The split's evaluation slice: the same number of tokens for every split."""
        if split not in self._tokens:
            from data.loader import read_split_tokens

            n = self.setup.preset.eval_tokens + 1
            self._tokens[split] = read_split_tokens(self.setup.data, split)[:n]
        return self._tokens[split]

    def load(self, checkpoint: Path) -> None:
        state = torch.load(checkpoint, map_location=self.setup.device, weights_only=True)
        torch.nn.Module.load_state_dict(self.recipe.model, state["state_dict"], strict=True)

    def evaluate(self, split: str) -> dict:
        from bench.evaluator import evaluate

        p = self.setup.preset
        ev = evaluate(
            self.recipe.logits,
            self.tokens(split),
            p.eval_seq_len,
            p.eval_batch_size,
            self.vocab_size,
            self.setup.device,
            self.token_bytes,
        )
        return {"loss": ev.loss, "bpb": ev.bpb, "tokens": ev.tokens}

    def probe(self) -> dict:
        """Three probes with fresh randomness: look-ahead on random tokens and on real text,
        and rows of a real batch leaking into each other. Violations are named by check."""
        from bench.evaluator import causality_probe, cross_row_probe

        g = torch.Generator().manual_seed(secrets.randbits(63))
        p, V, dev = self.setup.preset, self.vocab_size, self.setup.device
        text = self.tokens("val")
        with torch.no_grad():
            results = [
                causality_probe(self.recipe.logits, V, p.eval_seq_len, dev, g),
                causality_probe(self.recipe.logits, V, p.eval_seq_len, dev, g, tokens=text),
                cross_row_probe(self.recipe.logits, V, p.eval_seq_len, dev, g, text),
            ]
        violations = []
        for r in results:
            if r.causal:
                continue
            if r.kind == "cross-row":
                violations.append(
                    f"cross-row-probe: changing row {r.position} of an evaluation batch moved "
                    f"another row's log-probabilities by {r.max_change:.3g} "
                    f"(tolerance {r.tolerance:.3g})"
                )
            else:
                violations.append(
                    f"causality-probe: a change after position {r.position} moved an earlier "
                    f"log-probability by {r.max_change:.3g} (tolerance {r.tolerance:.3g})"
                )
        return {"probes": [r.__dict__ for r in results], "violations": violations}


def serve(evaluator: Evaluator, requests, reply) -> None:
    """Answer requests until stdin closes: {"checkpoint": path[, "probe": true]}."""
    from bench.guards import fingerprint, fingerprint_change

    for line in requests:
        request = json.loads(line)
        evaluator.load(Path(request["checkpoint"]))
        before = fingerprint(evaluator.recipe.model)
        try:
            answer = evaluator.probe() if request.get("probe") else evaluator.evaluate("val")
        except FloatingPointError as e:  # the weights hold NaNs: the run diverged
            answer = {"error": str(e), "non_finite": True}
        # A model that learns from the batches it is scored on (threat 5) changes here.
        change = fingerprint_change(before, fingerprint(evaluator.recipe.model))
        if change is not None:
            answer = {"violations": [f"eval-unchanged: {change}"]}
        reply.write(json.dumps(answer) + "\n")
        reply.flush()
        if evaluator.setup.device.type == "cuda":
            # Give the evaluation's buffers (a batch of full-vocabulary logits: gigabytes on
            # gpt2-124m) back to the training process until the next request.
            torch.cuda.empty_cache()


class EvalProcess:
    """train.py's side: the worker process, started before the surface is built."""

    def __init__(self, preset: str, data: str, device: torch.device, kernel_backend: str):
        cmd = [sys.executable, "-m", "bench.eval_worker", "--serve", "--preset", preset]
        cmd += ["--data", data, "--device", str(device), "--kernels", kernel_backend]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.dir: Path | None = None  # made at the first save, where the weights fit
        self.ready = False

    @property
    def checkpoint(self) -> Path:
        return self.dir / "model.pt"

    def _make_dir(self, nbytes: int) -> Path:
        """A private folder for the checkpoints: in memory (/dev/shm) when it has room for
        two copies of the weights, else the system's temporary folder. Folders left by
        runs that were killed (their pid is in the name) are removed first."""
        shm = Path("/dev/shm")
        base = None
        if shm.is_dir() and os.access(shm, os.W_OK):
            for old in shm.glob(f"{DIR_PREFIX}*"):
                pid = old.name[len(DIR_PREFIX) :].split("-")[0]
                if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    shutil.rmtree(old, ignore_errors=True)
            if shutil.disk_usage(shm).free > 2 * nbytes:
                base = shm
        return Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=base))

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise EvalWorkerError(f"the evaluator process exited (code {code}); see stderr")
        return json.loads(line)

    def wait_ready(self) -> None:
        if not self.ready:
            reply = self._reply()
            if not reply.get("ready"):
                raise EvalWorkerError(f"the evaluator process did not start: {reply}")
            self.ready = True

    def save(self, model: torch.nn.Module, meta: dict) -> None:
        """The model's weights, read through torch's own state_dict (an override in the
        surface does not answer for it), to the checkpoint the worker reads."""
        state = torch.nn.Module.state_dict(model)
        state = {k: v.detach().cpu() for k, v in state.items()}
        if self.dir is None:
            self.dir = self._make_dir(sum(v.numel() * v.element_size() for v in state.values()))
        torch.save({"state_dict": state, **meta}, self.checkpoint)

    def ask(self, request: dict) -> dict:
        self.wait_ready()
        self.proc.stdin.write(json.dumps({"checkpoint": str(self.checkpoint), **request}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        """Stop the worker and remove the checkpoints, whatever state the worker is in."""
        try:
            if self.proc.stdin and not self.proc.stdin.closed:
                self.proc.stdin.close()  # EOF: the worker's loop ends
        except OSError:  # the worker is already gone (a broken pipe)
            pass
        finally:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            finally:
                if self.dir is not None:
                    shutil.rmtree(self.dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", required=True, help="the preset whose model and eval slice to use")
    p.add_argument("--data", help="dataset name in the data cache (default: the preset's)")
    p.add_argument("--device", help="cpu or cuda (default: the preset's)")
    p.add_argument("--kernels", default="auto", help="kernel backend: auto, torch, triton")
    p.add_argument("--serve", action="store_true", help="answer train.py's requests on stdin")
    p.add_argument("--splits", default="val,holdout", help="comma-separated splits to evaluate")
    p.add_argument("--checkpoints", nargs="*", type=Path, default=[], help="checkpoint files")
    args = p.parse_args(argv)
    # The reply channel is a copy of stdout; fd 1 itself becomes stderr, so nothing else
    # (a print in the surface, a C library's output) can write into the replies.
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    t = time.perf_counter()
    evaluator = Evaluator(args.preset, args.data, args.device, args.kernels)
    if args.serve:
        evaluator.tokens("val")
        reply.write(json.dumps({"ready": True, "seconds": time.perf_counter() - t}) + "\n")
        reply.flush()
        serve(evaluator, sys.stdin, reply)
        return 0
    splits = [s for s in args.splits.split(",") if s]
    out = []
    for checkpoint in args.checkpoints:
        evaluator.load(checkpoint)
        out.append({"checkpoint": str(checkpoint), **{s: evaluator.evaluate(s) for s in splits}})
    reply.write(json.dumps(out) + "\n")
    reply.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
