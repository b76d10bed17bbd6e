"""The command line's words: every subcommand's flags and help, and the defaults a new
session takes for the flags that were not given (agent/cli.py does what they say).

Flags that fix a session's settings default to None here, so that a resume knows what the
user gave and compares it with the session's own settings.
"""

import argparse
from argparse import Namespace
from pathlib import Path

from agent.leaderboard import LEADERBOARDS
from agent.stats import OBJECTIVES

ROOT = Path(__file__).resolve().parent.parent  # the repository the engine runs from

# What a new session takes for the flags that were not given.
RUN_DEFAULTS = {"preset": "cpu-tiny", "objective": "time-to-loss", "proposer": "sweep",
                "baseline_runs": 3, "wandb": "auto", "gpus": 1, "allow_flagged": False}
REPLAY_DEFAULTS = {"preset": "cpu-tiny", "runs": 3, "wandb": "auto", "gpus": 1,
                   "allow_flagged": False}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agent",
                                description="The experiment engine of speedloop.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start a session, or resume one with --resume D")
    add_session_arguments(run, "session", "candidates the diff scan flags instead of refusing "
                          "them", "(default: set by the baseline)")
    run.add_argument(
        "--objective", choices=list(OBJECTIVES), help="what 'faster' means (default time-to-loss)"
    )
    run.add_argument("--proposer", help="sweep (default) | patches | anthropic | command | "
                     "null (no-op candidates: an A/A test of the judge)")
    run.add_argument(
        "--proposer-arg", help="the proposer's argument (patches: the directory; command: CMD)"
    )
    llm = run.add_argument_group("LLM proposers (anthropic, command)")
    llm.add_argument("--model", help="anthropic: the model name")
    llm.add_argument("--budget-usd", type=float, help="anthropic: stop proposing past this spend")
    llm.add_argument("--max-usd-per-candidate", type=float, help="anthropic: cap per candidate")
    llm.add_argument("--max-turns", type=int, help="anthropic: tool-use turns per candidate")
    llm.add_argument("--thinking", choices=["adaptive", "disabled"], help="anthropic: thinking")
    llm.add_argument("--effort", help="anthropic: effort setting of the model")
    llm.add_argument("--brief", type=Path, help="the research brief (default: program.md)")
    llm.add_argument("--agent-timeout", type=float, help="command: seconds per proposal")
    run.add_argument("--experiments", type=int, help="stop after N experiments")
    run.add_argument("--hours", type=float, help="stop after H hours")
    run.add_argument("--deadline", help="stop at this local time, e.g. 2026-11-28T07:00")
    run.add_argument("--baseline-runs", type=int, help="baseline replicates (>= 2; default 3)")
    run.add_argument("--max-runs", type=int,
                     help="runs of a candidate at most before the judge must decide (>= 2; "
                     "default 8: fewer is cheaper and less able to see a small gain)")
    run.add_argument(
        "--paired", action="store_true", default=None,
        help="experimental: make each candidate run back to back with a champion run, on one "
        "slot with one seed, and judge the pairs: what they share cancels (a neighbour's load, "
        "the slot, the seed's noise), for one champion run per candidate run (README)",
    )  # fmt: skip
    run.add_argument(
        "--loss-margin", type=float,
        help="nats the candidate's val loss may be worse than the champion's (default 0.01)",
    )  # fmt: skip
    run.add_argument(
        "--cluster", choices=["ray"],
        help="run the benchmarks on the nodes of a running Ray cluster (RAY_ADDRESS, or the "
        "one this machine is part of): a slot per --gpus K GPUs of a node, or per node on the "
        "CPU (--devices cpu:N: N per node); needs pip install '.[cluster]'",
    )  # fmt: skip
    run.add_argument(
        "--max-speedup", type=float,
        help="hold a step faster than this over the champion for `review` (default 2.0)",
    )  # fmt: skip

    replay = sub.add_parser("replay", help="replay a leaderboard's ladder, rung by rung")
    replay.add_argument(
        "ladder", nargs="?", help="a ladder's name (bench/leaderboards/NAME) or its directory"
    )
    add_session_arguments(replay, "replay", "rungs the diff scan flags instead of stopping "
                          "there", "(default: the leaderboard's where the preset reaches it, "
                          "else set by the baseline's replicates)")
    replay.add_argument(
        "--runs", type=int, help="timed runs of each rung and of its predecessor (default 3)"
    )
    replay.add_argument("--rungs", metavar="FROM:TO", help="replay only these rungs (1-based)")

    review = sub.add_parser("review", help="list the candidates held for a human, or decide one")
    review.add_argument("--run-dir", type=Path, required=True, help="the session directory")
    review.add_argument("candidate", type=int, nargs="?", help="a held candidate's id")
    verdict = review.add_mutually_exclusive_group()
    verdict.add_argument("--accept", action="store_true", help="make it the champion")
    verdict.add_argument("--reject", action="store_true", help="reject it")
    review.add_argument("--note", default="", help="why, kept in the ledger with the verdict")

    for name, text in (("status", "where a session stands"), ("report", "write the report"),
                       ("show", "one candidate in full"),
                       ("dashboard", "save a W&B workspace for the session (online)")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("run_dir", type=Path, metavar="D", help="the session directory")
        if name == "show":
            cmd.add_argument("candidate", type=int, metavar="ID", help="a candidate's id")
        if name == "status":
            view = cmd.add_mutually_exclusive_group()
            view.add_argument("--json", action="store_true", help="everything, as JSON")
            view.add_argument("--watch", action="store_true",
                              help="a live view, refreshed every 2 s (Ctrl-C ends it)")

    cluster = sub.add_parser("cluster", help="work on every node of a Ray cluster")
    action = cluster.add_subparsers(dest="action", required=True)
    prepare = action.add_parser(
        "prepare", help="run `python -m data prepare ARGS` on every node of the cluster",
        description="e.g. `python -m agent cluster prepare embedded`, or `... fineweb --shards 8`")
    prepare.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                         help="what `python -m data prepare` takes")

    clean = sub.add_parser(
        "clean", help="remove the worktrees, branches and refs of finished or abandoned sessions"
    )
    clean.add_argument("--repo", type=Path, default=ROOT, help="the repository (default: this)")
    clean.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")
    return p


def add_session_arguments(p: argparse.ArgumentParser, what: str, flagged: str,
                          target: str) -> None:
    """The flags `run` and `replay` share; `what` names the session, `flagged` what
    --allow-flagged runs, `target` where the target comes from by default."""
    p.add_argument("--resume", type=Path, metavar="D", help=f"resume the {what} in D")
    p.add_argument("--preset", help="benchmark preset (train.py --preset; default cpu-tiny)")
    p.add_argument("--run-dir", type=Path, help="session directory (default runs/<time>)")
    p.add_argument("--budget-tokens", type=int, help="train.py --budget-tokens for every run")
    p.add_argument("--data", help="train.py --data for every run (default: the preset's)")
    p.add_argument("--cpu-threads", type=int, metavar="N",
                   help="train.py --cpu-threads for every run: the trainer's intra-op threads "
                   "on the CPU (default 1)")
    p.add_argument("--target-loss", type=float, help=f"time-to-loss target {target}")
    p.add_argument(
        "--wandb", choices=["auto", "offline", "disabled"], help="W&B tracking (default auto)"
    )
    p.add_argument("--allow-flagged", action="store_true", default=None,
                   help=f"run {flagged} (bench/INTEGRITY.md)")
    p.add_argument(
        "--rules", choices=list(LEADERBOARDS),
        help="judge in a leaderboard's terms: its target loss (where the preset reaches it), "
        "its p-value for the loss test, its waiver for systems changes",
    )  # fmt: skip
    p.add_argument(
        "--gpus", type=int, metavar="K",
        help="GPUs (processes) of every benchmark run: torchrun --nproc_per_node=K when K > 1 "
        "(default 1)",
    )  # fmt: skip
    p.add_argument(
        "--devices", metavar="SPEC",
        help="run experiments in parallel, one per slot: 'all' (every visible GPU), a list of "
        "GPUs such as 0,1,2,5 (with --gpus K, K of them per slot), or cpu:N (N slots of this "
        "machine's cores). Default: one slot, the whole device",
    )  # fmt: skip
    p.add_argument(
        "--no-sandbox", action="store_true",
        help="run candidate code unconfined where bubblewrap cannot run: every result is "
        "then marked untrusted (bench/INTEGRITY.md)",
    )  # fmt: skip


def with_defaults(args: Namespace, defaults: dict) -> Namespace:
    """`args` with each flag that was not given set to its default, for a new session."""
    return Namespace(**{**vars(args), **{k: v for k, v in defaults.items()
                                         if getattr(args, k, None) is None}})


