"""Two versions of the harness, interleaved on the same seeds: what a change of train.py costs.

    python -m bench.compare_harness --old REF [--new REF] [--runs N] [--preset P]
                                    [--budget-tokens N] [--new-args "..."]

Each version is a git worktree of this repository at its ref (--new defaults to the working
tree). Runs alternate old, new, old, new, ... with seeds 1..N, so a machine that drifts
hits both sides alike. Wall seconds are this process's own clock around each run;
training and evaluation seconds are each result's. Prints one table: the median of each
version, the ratio new / old per pair with its range, and per-version spread. It measures
and prints; it changes nothing and writes only its temporary worktrees.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIELDS = ("wall", "train_seconds", "eval_seconds", "untimed")


def worktree(ref: str, into: Path) -> Path:
    path = into / ref.replace("/", "_")
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(path), ref], cwd=REPO,
                   check=True)
    return path


def one_run(tree: Path, preset: str, seed: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "train.py", "--preset", preset, "--seed", str(seed), *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    result["untimed"] = wall - result["train_seconds"] - result["eval_seconds"]
    return result


def table(old: list[dict], new: list[dict]) -> str:
    lines = ["| field | old median | new median | new / old per pair: median [min, max] |",
             "| --- | --- | --- | --- |"]
    for field in FIELDS:
        a, b = [r[field] for r in old], [r[field] for r in new]
        ratios = [y / x for x, y in zip(a, b) if x > 0]
        lines.append(f"| {field} | {statistics.median(a):.2f} s | {statistics.median(b):.2f} s "
                     f"| {statistics.median(ratios):.3f} [{min(ratios):.3f}, "
                     f"{max(ratios):.3f}] |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--old", required=True, help="git ref of the first version")
    p.add_argument("--new", help="git ref of the second (default: this working tree)")
    p.add_argument("--runs", type=int, default=5, help="runs of each version")
    p.add_argument("--preset", default="cpu-tiny")
    p.add_argument("--budget-tokens", type=int, default=65536)
    p.add_argument("--old-args", default="", help="more train.py flags for the old version")
    p.add_argument("--new-args", default="", help="more train.py flags for the new version")
    args = p.parse_args(argv)
    budget = ["--budget-tokens", str(args.budget_tokens)]
    with tempfile.TemporaryDirectory(prefix="speedloop-compare-") as tmp:
        trees = [worktree(args.old, Path(tmp))]
        trees.append(worktree(args.new, Path(tmp)) if args.new else REPO)
        extras = [budget + shlex.split(args.old_args), budget + shlex.split(args.new_args)]
        runs: list[list[dict]] = [[], []]
        try:
            for seed in range(1, args.runs + 1):
                for side in (0, 1):
                    r = one_run(trees[side], args.preset, seed, extras[side])
                    runs[side].append(r)
                    print(f"seed {seed} {'new' if side else 'old'}: wall {r['wall']:.1f} s, "
                          f"train {r['train_seconds']:.2f} s, eval {r['eval_seconds']:.2f} s",
                          file=sys.stderr, flush=True)
        finally:
            for tree in trees:
                if tree != REPO:
                    subprocess.run(["git", "worktree", "remove", "--force", str(tree)],
                                   cwd=REPO, check=False)
    print(table(*runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
