"""Command line of the experiment engine.

    python -m agent run [--preset P] [--objective O] [--proposer sweep|patches] ...
    python -m agent run --resume D
    python -m agent replay LADDER [--preset P] [--runs N] [--rungs FROM:TO] ...
    python -m agent replay --resume D
    python -m agent status D
    python -m agent report D
    python -m agent review --run-dir D [ID --accept|--reject [--note TEXT]]
"""

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

from rich.console import Console

from agent import replay, review
from agent.judge import OBJECTIVES, RULES
from agent.ledger import LEDGER_FILE, Ledger, LedgerError
from agent.loop import Session, SessionConfig, SessionStop
from agent.proposers import make_proposer
from agent.report import status_text, write_report
from agent.review import ReviewError

ROOT = Path(__file__).resolve().parent.parent
UNTRUSTED = ("UNTRUSTED: candidate code runs without a sandbox (--no-sandbox); it can reach "
             "what measures it, so no result of this session is evidence")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agent", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start a session, or resume one with --resume D")
    run.add_argument("--resume", type=Path, metavar="D", help="resume the session in D")
    run.add_argument("--preset", default="cpu-tiny", help="benchmark preset (train.py --preset)")
    run.add_argument(
        "--objective", default="time-to-loss", choices=list(OBJECTIVES), help="what 'faster' means"
    )
    run.add_argument("--proposer", default="sweep", help="sweep | patches | anthropic | command")
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
    run.add_argument("--run-dir", type=Path, help="session directory (default runs/<time>)")
    run.add_argument("--baseline-runs", type=int, default=3, help="baseline replicates (>= 2)")
    run.add_argument("--budget-tokens", type=int, help="train.py --budget-tokens for every run")
    run.add_argument("--data", help="train.py --data for every run (default: the preset's)")
    run.add_argument(
        "--target-loss", type=float, help="time-to-loss target (default: set by the baseline)"
    )
    run.add_argument(
        "--wandb", default="auto", choices=["auto", "offline", "disabled"], help="W&B tracking"
    )
    run.add_argument(
        "--allow-flagged", action="store_true",
        help="run candidates the diff scan flags instead of refusing them (bench/INTEGRITY.md)",
    )  # fmt: skip
    run.add_argument(
        "--max-speedup", type=float,
        help="hold a step faster than this over the champion for `review` (default 2.0)",
    )  # fmt: skip
    add_leaderboard_arguments(run)
    add_trust_arguments(run)

    replay = sub.add_parser("replay", help="replay a leaderboard's ladder, rung by rung")
    replay.add_argument(
        "ladder", nargs="?", help="a ladder's name (bench/leaderboards/NAME) or its directory"
    )
    replay.add_argument("--resume", type=Path, metavar="D", help="resume the replay in D")
    replay.add_argument("--preset", default="cpu-tiny", help="benchmark preset (train.py --preset)")
    replay.add_argument(
        "--runs", type=int, default=3, help="timed runs of each rung and of its predecessor"
    )
    replay.add_argument("--rungs", metavar="FROM:TO", help="replay only these rungs (1-based)")
    replay.add_argument("--run-dir", type=Path, help="session directory (default runs/<time>)")
    replay.add_argument("--budget-tokens", type=int, help="train.py --budget-tokens, every run")
    replay.add_argument("--data", help="train.py --data for every run (default: the preset's)")
    replay.add_argument(
        "--target-loss", type=float,
        help="time-to-loss target (default: the leaderboard's where the preset reaches it, "
        "else set by the baseline's replicates)",
    )  # fmt: skip
    replay.add_argument(
        "--wandb", default="auto", choices=["auto", "offline", "disabled"], help="W&B tracking"
    )
    replay.add_argument(
        "--allow-flagged", action="store_true",
        help="run rungs the diff scan flags instead of stopping there (bench/INTEGRITY.md)",
    )  # fmt: skip
    add_leaderboard_arguments(replay)
    add_trust_arguments(replay)

    review = sub.add_parser("review", help="list the candidates held for a human, or decide one")
    review.add_argument("--run-dir", type=Path, required=True, help="the session directory")
    review.add_argument("candidate", type=int, nargs="?", help="a held candidate's id")
    verdict = review.add_mutually_exclusive_group()
    verdict.add_argument("--accept", action="store_true", help="make it the champion")
    verdict.add_argument("--reject", action="store_true", help="reject it")
    review.add_argument("--note", default="", help="why, kept in the ledger with the verdict")

    for name, text in (("status", "where a session stands"), ("report", "write the report")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("run_dir", type=Path, metavar="D", help="the session directory")
    return p


def add_trust_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-sandbox", action="store_true",
        help="run candidate code unconfined where bubblewrap cannot run: every result is "
        "then marked untrusted (bench/INTEGRITY.md)",
    )  # fmt: skip


def check_sandbox(args: argparse.Namespace) -> None:
    """Before anything is created: a session runs sandboxed, or says it will not."""
    if args.no_sandbox:
        return
    from bench.sandbox import SandboxError, available

    try:
        available()
    except SandboxError as e:
        raise SessionStop(str(e)) from None


def add_leaderboard_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rules", choices=list(RULES),
        help="judge in a leaderboard's terms: its target loss (where the preset reaches it), "
        "its p-value for the loss test, its waiver for systems changes",
    )  # fmt: skip
    p.add_argument(
        "--gpus", type=int, default=1, metavar="K",
        help="GPUs (processes) of every benchmark run: torchrun --nproc_per_node=K when K > 1",
    )  # fmt: skip


# Flags that a resumed session takes from its ledger, not from the command line.
RESUME_FIXED = (
    "preset", "objective", "proposer", "proposer_arg", "deadline", "run_dir", "baseline_runs",
    "budget_tokens", "data", "target_loss", "wandb", "model", "max_usd_per_candidate",
    "max_turns", "thinking", "effort", "brief", "agent_timeout", "allow_flagged", "max_speedup",
    "rules", "gpus", "no_sandbox",
)  # fmt: skip


def build_defaults() -> dict:
    """The `run` command's default value of every flag."""
    return vars(build_parser().parse_args(["run"]))


def proposer_options(args: argparse.Namespace, run_dir: Path) -> dict:
    """The LLM proposers' settings from the flags that were given."""
    if args.proposer not in ("anthropic", "command"):
        return {}
    options = {"brief": str(args.brief.resolve())} if args.brief else {}
    if args.no_sandbox:
        options["sandbox"] = False
    if args.proposer == "command":
        if args.agent_timeout is not None:
            options["timeout_s"] = args.agent_timeout
        return options
    options["transcript_dir"] = str((run_dir / "llm").resolve())
    flags = dict(model=args.model, budget_usd=args.budget_usd, max_turns=args.max_turns,
                 max_usd_per_candidate=args.max_usd_per_candidate, effort=args.effort)
    options.update({k: v for k, v in flags.items() if v is not None})
    if args.thinking:
        options["thinking"] = {"type": args.thinking}
    return options


def train_args(args: argparse.Namespace) -> list[str]:
    """train.py flags for every run, from --budget-tokens and --data."""
    extra = ["--budget-tokens", str(args.budget_tokens)] if args.budget_tokens else []
    return extra + (["--data", args.data] if args.data else [])


def gpus(args: argparse.Namespace) -> int:
    if args.gpus < 1:
        raise SessionStop(f"--gpus {args.gpus}: a run needs at least one GPU (or process)")
    return args.gpus


def session_config(args: argparse.Namespace, run_dir: Path) -> SessionConfig:
    from bench.presets import PRESETS  # the fixed side knows each preset's device

    if args.preset not in PRESETS:
        raise SessionStop(f"unknown preset '{args.preset}': choose one of {list(PRESETS)}")
    if args.baseline_runs < 2:
        raise SessionStop("--baseline-runs must be at least 2: the judge needs the noise")
    target = args.target_loss
    if args.rules and target is None and PRESETS[args.preset].target_loss is not None:
        target = RULES[args.rules].target_loss  # a preset made to reach the leaderboard's
    return SessionConfig(
        preset=args.preset,
        objective=args.objective,
        proposer=args.proposer,
        proposer_arg=args.proposer_arg,
        proposer_options=proposer_options(args, run_dir),
        experiments=args.experiments,
        hours=args.hours,
        deadline=datetime.fromisoformat(args.deadline).timestamp() if args.deadline else None,
        baseline_runs=args.baseline_runs,
        train_args=train_args(args),
        target_loss=target,
        device=PRESETS[args.preset].device,
        gpus=gpus(args),
        rules=args.rules,
        wandb=args.wandb,
        repo=str(ROOT),
        allow_flagged=args.allow_flagged,
        acceptance={} if args.max_speedup is None else {"max_speedup": args.max_speedup},
        sandbox=not args.no_sandbox,
    )


def command_run(args: argparse.Namespace, console: Console) -> int:
    def say(text: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}", highlight=False)

    def waiting(text: str):
        return console.status(text)

    if args.resume:
        run_dir = args.resume
        if not (run_dir / LEDGER_FILE).exists():
            raise SessionStop(f"{run_dir} holds no session ({LEDGER_FILE} missing)")
        fixed = [flag for flag in RESUME_FIXED if getattr(args, flag) != build_defaults()[flag]]
        if fixed:  # the session's settings are in its ledger; changing them would mix runs
            names = ", ".join("--" + flag.replace("_", "-") for flag in fixed)
            raise SessionStop(
                f"{names} cannot change on --resume (the session keeps its own settings); "
                "only --experiments, --hours and --budget-usd can"
            )
        config = SessionConfig.from_dict(Ledger(run_dir / LEDGER_FILE).session()["config"])
        if config.proposer == replay.PROPOSER:  # a replay resumes as one
            return run_replay(replay.open_replay(run_dir, say, waiting), say)
        if args.budget_usd is not None:  # a resume may raise the LLM budget
            config.proposer_options["budget_usd"] = args.budget_usd
        proposer = make_proposer(config.proposer, config.proposer_arg, config.proposer_options)
        session = Session(run_dir, proposer, say=say, waiting=waiting)
        for name in ("experiments", "hours"):  # a resume may extend the budgets
            if getattr(args, name) is not None:
                setattr(session.config, name, getattr(args, name))
    else:
        run_dir = args.run_dir or ROOT / "runs" / time.strftime("%Y%m%d-%H%M%S")
        check_sandbox(args)
        config = session_config(args, run_dir)
        proposer = make_proposer(config.proposer, config.proposer_arg, config.proposer_options)
        session = Session.create(run_dir, config, proposer, say=say, waiting=waiting)
    say(f"session {session.id} in {run_dir}: {session.config.preset}, {session.config.objective}")
    if not session.config.sandbox:
        say(UNTRUSTED)
    try:
        session.run()
    except KeyboardInterrupt:
        say(
            "interrupted: the run in flight was stopped; it will be discarded and re-run by "
            f"`python -m agent run --resume {run_dir}`"
        )
        return 130
    paths = write_report(run_dir)
    say(f"report: {', '.join(str(p) for p in paths)}")
    return 0


def command_replay(args: argparse.Namespace, console: Console) -> int:
    def say(text: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}", highlight=False)

    def waiting(text: str):
        return console.status(text)

    if args.resume:
        if args.ladder:
            raise SessionStop("give a ladder or --resume D, not both: a replay keeps its ladder")
        if not (args.resume / LEDGER_FILE).exists():
            raise SessionStop(f"{args.resume} holds no session ({LEDGER_FILE} missing)")
        return run_replay(replay.open_replay(args.resume, say, waiting), say)
    if not args.ladder:
        raise SessionStop("name a ladder (e.g. nanogpt-speedrun) or --resume D")
    run_dir = args.run_dir or ROOT / "runs" / time.strftime("replay-%Y%m%d-%H%M%S")
    check_sandbox(args)
    config = replay.session_config(
        replay.load(args.ladder), args.preset, args.runs, args.rungs, args.rules,
        args.target_loss, train_args=train_args(args), gpus=gpus(args), wandb=args.wandb,
        repo=str(ROOT), allow_flagged=args.allow_flagged, sandbox=not args.no_sandbox,
    )  # fmt: skip
    return run_replay(replay.create_replay(run_dir, config, say, waiting), say)


def run_replay(r: replay.Replay, say) -> int:
    s = r.session
    say(f"replay {s.id} in {s.run_dir}: {r.ladder.name}, {s.config.preset}")
    try:
        r.run()
    except KeyboardInterrupt:
        say(
            "interrupted: the run in flight was stopped; it will be discarded and re-run by "
            f"`python -m agent replay --resume {s.run_dir}`"
        )
        return 130
    paths = write_report(s.run_dir)
    say(f"report: {', '.join(str(p) for p in paths)}; replay: {s.run_dir / 'replay.md'}")
    return 0


def command_review(args: argparse.Namespace) -> int:
    if not (args.run_dir / LEDGER_FILE).exists():
        raise SessionStop(f"{args.run_dir} holds no session ({LEDGER_FILE} missing)")
    if args.candidate is None:
        if args.accept or args.reject:
            raise SessionStop("--accept and --reject need the id of a held candidate")
        print(review.held_text(args.run_dir))
    elif args.accept or args.reject:
        print(review.decide(args.run_dir, args.candidate, args.accept, args.note))
    else:
        print(review.show(args.run_dir, args.candidate))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        if args.command == "run":
            return command_run(args, console)
        if args.command == "review":
            return command_review(args)
        if args.command == "replay":
            return command_replay(args, console)
        if not (args.run_dir / LEDGER_FILE).exists():
            raise SessionStop(f"{args.run_dir} holds no session ({LEDGER_FILE} missing)")
        if args.command == "status":
            print(status_text(args.run_dir))
        else:
            for path in write_report(args.run_dir):
                print(path)
            if replay.is_replay(args.run_dir):
                from agent.replay_report import write_replay

                for path in write_replay(args.run_dir):
                    print(path)
        return 0
    except (SessionStop, LedgerError, ReviewError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
