"""`make gpu-check`'s training part: short gpu-small runs, triton kernels against the torch
references, and the kernel benchmarks, printed as one table.

Runs with the Python already on a GPU machine and installs nothing. Uses FineWeb when it
is prepared, else the embedded corpus (prepare it elsewhere and carry the cache folder,
pointing SPEEDLOOP_DATA at it). Must never be part of a result the judge sees: it is a
health check of the machine and the kernels.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from bench.sandbox import SandboxError, available
from data.cache import dataset_dir

ROOT = Path(__file__).resolve().parent.parent


def train_run(data: str, kernels: str, seconds: float, sandbox: bool) -> dict:
    cmd = [
        sys.executable, "train.py", "--preset", "gpu-small", "--data", data,
        "--budget-seconds", str(seconds), "--kernels", kernels, "--log-every", "50",
    ]  # fmt: skip
    cmd += [] if sandbox else ["--no-sandbox"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise SystemExit(f"gpu-small with --kernels {kernels} failed ({proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=60, help="timed seconds per training run")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    data = "fineweb" if (dataset_dir("fineweb") / "meta.json").is_file() else "embedded"
    try:
        available()
        sandbox = True
    except SandboxError as e:
        print(f"no sandbox on this machine ({e}): the runs below are unconfined", flush=True)
        sandbox = False
    rows = [train_run(data, k, args.seconds, sandbox) for k in ("triton", "torch")]
    print(f"\n{rows[0]['gpu_name']} | torch {torch.__version__} | sandbox {sandbox}")
    print(f"gpu-small on {data}, {args.seconds:.0f} s timed per run\n")
    print("| kernels | tokens/s | MFU | peak memory | val loss | steps | startup s | eval s "
          "| evals | logits via | twins ok |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        peak = r.get("peak_memory_bytes") or 0
        print(
            f"| {r['kernels']} | {r['tokens_per_sec']:,.0f} | {mfu} | "
            f"{peak / 2**30:.1f} GiB | {r['val_loss']:.3f} | {r['steps']} | "
            f"{r['untimed']['startup']:.1f} | {r['eval_seconds']:.1f} | {len(r['curve'])} | "
            f"{r['logits_via']} | {all(t['ok'] for t in r['twins'])} |"
        )
    speedup = rows[0]["tokens_per_sec"] / rows[1]["tokens_per_sec"]
    print(f"\ntriton / torch tokens/s: {speedup:.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
