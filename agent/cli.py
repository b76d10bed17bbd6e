"""Command line of the experiment engine.

    python -m agent run [--preset P] [--objective O] [--proposer sweep|patches] ...
    python -m agent run --resume D [--experiments N] [--hours H] [--deadline T] [--budget-usd X]
    python -m agent replay LADDER [--preset P] [--runs N] [--rungs FROM:TO] ...
    python -m agent replay --resume D
    python -m agent status D [--json | --watch]
    python -m agent show D ID
    python -m agent dashboard D
    python -m agent report D
    python -m agent review --run-dir D [ID --accept|--reject [--note TEXT]]
    python -m agent clean [--repo R] [--dry-run]
    python -m agent cluster prepare ARGS   # python -m data prepare ARGS on every Ray node

Every bad input is one line on stderr and exit status 2: `run` and `replay` check what
they are given (agent/preflight.py) before they create a run directory, a worktree or a
branch. Flags that fix a session's settings default to None here, so that a resume knows
what the user gave and compares it with the session's own settings.
"""

import signal
import sys
import threading
import time
from argparse import Namespace
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from agent import child, preflight, replay, review
from agent.arguments import REPLAY_DEFAULTS, ROOT, RUN_DEFAULTS, build_parser, with_defaults
from agent.config import SessionConfig, SessionStop, stored
from agent.leaderboard import LEADERBOARDS
from agent.ledger import Ledger, LedgerError
from agent.liveness import SessionBusy
from agent.loop import Session
from agent.proposers import make_proposer
from agent.report import write_report
from agent.review import ReviewError
from agent.rundir import RunDir
from agent.tracking import resolve_mode
from agent.workspace import GitError
from bench.leaderboards import LadderError

UNTRUSTED = ("UNTRUSTED: candidate code runs without a sandbox (--no-sandbox); it can reach "
             "what measures it, so no result of this session is evidence")
def check_cluster(config: SessionConfig) -> None:
    """--cluster ray: Ray is installed (an optional extra), --devices is one a cluster
    takes, and the cluster answers (agent/cluster.py, imported only then: it needs Ray)."""
    from agent import cluster

    cluster.check(config)


def check_sandbox(config: SessionConfig) -> None:
    """Before anything is created or resumed: a session runs sandboxed, or says it will not."""
    if not config.sandbox:
        return
    from bench.sandbox import SandboxError, available

    try:
        available()
    except SandboxError as e:
        raise SessionStop(str(e)) from None


def proposer_options(args: Namespace, run_dir: Path) -> dict:
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
    options["transcript_dir"] = str(RunDir(run_dir).llm.resolve())
    flags = dict(model=args.model, budget_usd=args.budget_usd, max_turns=args.max_turns,
                 max_usd_per_candidate=args.max_usd_per_candidate, effort=args.effort)
    options.update({k: v for k, v in flags.items() if v is not None})
    if args.thinking:
        options["thinking"] = {"type": args.thinking}
    return options


def train_args(args: Namespace) -> list[str]:
    """train.py flags for every run, from --budget-tokens, --data and --cpu-threads."""
    extra = ["--budget-tokens", str(args.budget_tokens)] if args.budget_tokens else []
    extra += ["--cpu-threads", str(args.cpu_threads)] if args.cpu_threads else []
    return extra + (["--data", args.data] if args.data else [])


def session_config(args: Namespace, run_dir: Path) -> SessionConfig:
    """A new session's config from its flags (the defaults for those not given)."""
    from bench.presets import PRESETS  # the fixed side knows each preset's device

    args = with_defaults(args, RUN_DEFAULTS)
    preflight.check_values(args)
    if args.preset not in PRESETS:
        raise SessionStop(f"--preset {args.preset}: unknown; choose one of "
                          f"{', '.join(PRESETS)}")
    target = args.target_loss
    if args.rules and target is None and PRESETS[args.preset].target_loss is not None:
        target = LEADERBOARDS[args.rules].target_loss  # a preset made to reach the leaderboard's
    return SessionConfig(
        preset=args.preset, objective=args.objective, proposer=args.proposer,
        proposer_arg=args.proposer_arg, proposer_options=proposer_options(args, run_dir),
        experiments=args.experiments, hours=args.hours,
        deadline=preflight.deadline(args.deadline) if args.deadline else None,
        baseline_runs=args.baseline_runs, train_args=train_args(args), target_loss=target,
        device=PRESETS[args.preset].device, gpus=args.gpus, devices=args.devices,
        cluster=args.cluster, rules=args.rules, wandb=args.wandb,
        repo=str(ROOT), allow_flagged=args.allow_flagged, sandbox=not args.no_sandbox,
        acceptance={} if args.max_speedup is None else {"max_speedup": args.max_speedup},
        judge={**({} if args.max_runs is None else {"max_replicates": args.max_runs,
                                                      "min_replicates": min(3, args.max_runs)}),
               **({} if args.loss_margin is None else {"loss_margin": args.loss_margin}),
               **({"paired": True} if args.paired else {})},
    )  # fmt: skip


def printers(console: Console):
    def say(text: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}", highlight=False)

    def waiting(text: str):
        return console.status(text)

    return say, waiting


def check_new(run_dir: Path, config: SessionConfig, say) -> None:
    """The checks of a new session that need its config: the run directory, the
    repository, the machine and data; and a warning for edits the session will not see."""
    preflight.check_run_dir(run_dir)
    preflight.check_repo(ROOT)
    check_sandbox(config)
    preflight.check_machine(config.preset, config.gpus, config.train_args)
    if config.cluster:
        check_cluster(config)
    else:
        preflight.check_devices(config)
    resolve_mode(config.wandb)  # a bad WANDB_MODE fails here, not in the new session
    edits = preflight.uncommitted_surface(ROOT)
    if edits:
        say(f"warning: uncommitted changes to {', '.join(edits)} are not in the session, which "
            "starts from HEAD: commit them to include them")


def command_run(args: Namespace, console: Console) -> int:
    say, waiting = printers(console)
    if args.resume:
        return resume(args, say, waiting)
    run_dir = args.run_dir or ROOT / "runs" / time.strftime("%Y%m%d-%H%M%S")
    config = session_config(args, run_dir)
    check_new(run_dir, config, say)
    proposer = make_proposer(config.proposer, config.proposer_arg, config.proposer_options)
    access = preflight.check_proposer(proposer)
    session = Session.create(run_dir, config, proposer, say=say, waiting=waiting)
    if access is not None:  # the request that proved the key was paid for too
        session.ledger.add_spend(access["model"], access)
    return run_session(session, say)


def apply_budgets(args: Namespace, config: SessionConfig) -> bool:
    """The budgets a resume was given, into `config`; True when one changed."""
    changed = False
    for name in ("experiments", "hours"):
        if getattr(args, name, None) is not None and getattr(args, name) != getattr(config, name):
            setattr(config, name, getattr(args, name))
            changed = True
    if getattr(args, "deadline", None) is not None:
        config.deadline, changed = preflight.deadline(args.deadline), True
    if getattr(args, "budget_usd", None) is not None:
        if config.proposer != "anthropic":
            raise SessionStop(f"--budget-usd {args.budget_usd}: this session's proposer "
                              f"({config.proposer}) pays for no LLM requests")
        config.proposer_options["budget_usd"], changed = args.budget_usd, True
    return changed


def resume(args: Namespace, say, waiting) -> int:
    """Resume a session (`run --resume D`) or a replay (`replay --resume D`, or run's): the
    flags given must be the session's own settings, or budgets, which are stored."""
    run_dir = args.resume
    _, config = stored(run_dir)
    is_replay = config.proposer == replay.PROPOSER
    if args.command == "replay" and not is_replay:
        raise SessionStop(f"{run_dir} holds a `python -m agent run` session, not a replay: "
                          f"resume it with `python -m agent run --resume {run_dir}`")
    preflight.resume_conflicts(args, config)
    preflight.check_values(args)
    changed = apply_budgets(args, config)
    preflight.check_machine(config.preset, config.gpus, config.train_args)
    check_sandbox(config)
    if config.cluster:
        check_cluster(config)
    access = None
    if not is_replay:
        proposer = make_proposer(config.proposer, config.proposer_arg, config.proposer_options)
        access = preflight.check_proposer(proposer)
    with Ledger(RunDir(run_dir).ledger, create=False) as ledger:
        if changed:  # so that status, and the next resume, see the new budgets
            ledger.set_session(asdict(config))
        if access is not None:
            ledger.add_spend(access["model"], access)
    if is_replay:
        return run_session(replay.Replay(run_dir, say=say, waiting=waiting), say)
    return run_session(Session(run_dir, proposer, say=say, waiting=waiting), say)


def _stopped(signum, frame) -> None:
    """Ctrl-C, or SIGTERM (`kill PID`, a job scheduler's stop): the runs in flight end, the
    ledger says the session stopped and why, `--resume` goes on. Every child is ended too
    (`child.stop`), so the stop holds where Python swallows the KeyboardInterrupt (one
    raised inside an at-fork callback is only printed)."""
    name = signal.Signals(signum).name
    child.stop(name)
    raise KeyboardInterrupt(*(() if signum == signal.SIGINT else (name,)))


def run_session(session: Session, say) -> int:
    """Run a session (or a replay) to its end; its reports then, or exit 130 on Ctrl-C or
    SIGTERM."""
    run_dir, cfg = session.run_dir, session.config
    command = "replay" if isinstance(session, replay.Replay) else "run"
    if command == "replay":
        say(f"replay {session.id} in {run_dir}: {session.ladder.name}, {cfg.preset}")
    else:
        say(f"session {session.id} in {run_dir}: {cfg.preset}, {cfg.objective}")
    if not cfg.sandbox:
        say(UNTRUSTED)
    # SIGINT only where Python's own handler is in place: a background job's stays ignored.
    stops = [signal.SIGTERM] + [signal.SIGINT] * (
        signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _stopped) for sig in stops} if main else {}
    try:
        session.run()
    except KeyboardInterrupt:
        child.cancel_all()  # a draft's agent too, which no run's thread would end
        say("interrupted: the run in flight was stopped; it will be discarded and re-run by "
            f"`python -m agent {command} --resume {run_dir}`")
        return 130
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
    paths = [str(p) for p in write_report(run_dir.root)]
    replayed = f"; replay: {run_dir.replay_md}" if command == "replay" else ""
    say(f"report: {', '.join(paths)}{replayed}")
    return 0


def command_replay(args: Namespace, console: Console) -> int:
    say, waiting = printers(console)
    if args.resume:
        if args.ladder:
            raise SessionStop("give a ladder or --resume D, not both: a replay keeps its ladder")
        return resume(args, say, waiting)
    if not args.ladder:
        raise SessionStop("name a ladder (e.g. nanogpt-speedrun) or --resume D")
    args = with_defaults(args, REPLAY_DEFAULTS)
    preflight.check_values(args)
    if args.devices:
        raise SessionStop(f"--devices {args.devices}: a replay measures one rung at a time, "
                          "interleaved with the rung before; run it without --devices")
    ladder = replay.load(args.ladder)
    run_dir = args.run_dir or ROOT / "runs" / time.strftime("replay-%Y%m%d-%H%M%S")
    config = replay.replay_config(
        ladder, args.preset, args.runs, args.rungs, args.rules,
        args.target_loss, train_args=train_args(args), gpus=args.gpus, wandb=args.wandb,
        repo=str(ROOT), allow_flagged=args.allow_flagged, sandbox=not args.no_sandbox,
    )  # fmt: skip
    check_new(run_dir, config, say)
    return run_session(replay.Replay.create(run_dir, config, None, say=say, waiting=waiting), say)


def require_ledger(run_dir: Path) -> None:
    path = RunDir(run_dir).ledger
    if not path.exists():
        raise SessionStop(f"{run_dir} holds no session ({path.name} missing)")


def command_review(args: Namespace) -> int:
    require_ledger(args.run_dir)
    if args.candidate is None:
        if args.accept or args.reject:
            raise SessionStop("--accept and --reject need the id of a held candidate")
        print(review.held_text(args.run_dir))
    elif args.accept or args.reject:
        print(review.settle(args.run_dir, args.candidate, args.accept, args.note))
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
        if args.command == "cluster":
            from agent import cluster

            return cluster.prepare(args.args)
        if args.command == "clean":
            from agent.clean import clean

            print(clean(args.repo, dry_run=args.dry_run))
            return 0
        require_ledger(args.run_dir)
        if args.command == "status":
            from agent.status_data import print_status

            print_status(args.run_dir, as_json=args.json, live=args.watch)
        elif args.command == "show":
            from agent.show import show_text

            print(show_text(args.run_dir, args.candidate), end="")
        elif args.command == "dashboard":
            from agent.dashboard import save

            print(save(args.run_dir))
        else:
            for path in write_report(args.run_dir):
                print(path)
            if replay.is_replay(args.run_dir):
                from agent.replay_report import write_replay

                for path in write_replay(args.run_dir):
                    print(path)
        return 0
    except (SessionStop, SessionBusy, LedgerError, ReviewError, LadderError, GitError,
            ValueError, FileNotFoundError) as e:  # fmt: skip
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        print(f"error: {' | '.join(lines)}", file=sys.stderr)
        return 2
