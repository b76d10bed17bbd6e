"""What `agent run` and `agent replay` check before they create or resume anything.

Every input that would fail the session later (a preset this machine cannot run, a dataset
not prepared, a count that is not positive, a deadline in the past, a run directory that
cannot be made, a ladder that does not exist, an API key the API refuses) is refused here
with one line that names the flag and the fix (SessionStop, exit 2), before a run
directory, a worktree or a branch exists. A resume is checked against the session's own
settings: a flag given on --resume must say what the session already has, unless it is
one of the budgets that a resume may change (RESUME_BUDGETS).

What this module must never do: create or change a file, a branch or a ledger, or spend
more than the one-token request that proves an LLM proposer's key, URL and model.
"""

from __future__ import annotations

import math
import os
import time
from datetime import datetime
from pathlib import Path

from agent.config import SessionConfig, SessionStop, dataset_of
from agent.rundir import RunDir
from agent.workspace import GitError, git
from bench.surface import SURFACE_DIRS

# Flags a resume may change: the session's budgets.
RESUME_BUDGETS = ("experiments", "hours", "deadline", "budget_usd")
# Each count and budget flag: the least it may be, and whether it must be above it.
LIMITS = {
    "experiments": (1, False), "hours": (0, True), "budget_tokens": (1, False),
    "baseline_runs": (2, False), "runs": (1, False), "gpus": (1, False), "cpu_threads": (1, False),
    "budget_usd": (0, True), "max_usd_per_candidate": (0, True), "max_turns": (2, False),
    "agent_timeout": (0, True), "max_speedup": (1, True), "max_runs": (2, False),
    "loss_margin": (0, False),
}  # fmt: skip
WHY = {
    "baseline_runs": " (the judge measures the noise from at least 2)",
    "max_turns": " (a candidate needs at least 2 turns)",
    "max_speedup": " (a speed ratio over the champion)",
    "max_runs": " (the judge's test needs at least 2 runs of a candidate)",
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_values(args) -> None:
    """Counts and budgets positive, the target finite and positive, the deadline to come."""
    for name, (least, above) in LIMITS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if not (math.isfinite(value) and (value > least if above else value >= least)):
            need = f"a number above {least}" if above else f"at least {least}"
            raise SessionStop(f"{flag(name)} {value}: give {need}{WHY.get(name, '')}")
    target = getattr(args, "target_loss", None)
    if target is not None and not (math.isfinite(target) and target > 0):
        raise SessionStop(f"--target-loss {target}: give a finite positive validation loss "
                          "in nats (e.g. 3.28), or leave it out to set it from the baseline")
    if getattr(args, "deadline", None) is not None:
        deadline(args.deadline)


def deadline(text: str) -> float:
    """--deadline as unix time; it must parse as a local date and time, and be to come."""
    try:
        when = datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise SessionStop(f"--deadline {text!r} is not a local date and time: give it as "
                          "YYYY-MM-DDTHH:MM, e.g. 2026-11-28T07:00") from None
    if when <= time.time():
        raise SessionStop(f"--deadline {text} has passed (it is now "
                          f"{time.strftime('%Y-%m-%dT%H:%M')}): give a time to come")
    return when


def check_run_dir(run_dir: Path) -> None:
    """A new session's directory: creatable, writable, and not another session's."""
    path = Path(run_dir)
    if RunDir(path).ledger.exists():
        raise SessionStop(f"--run-dir {path} already holds a session: resume it with "
                          f"`python -m agent run --resume {path}`, or choose another directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SessionStop(f"--run-dir {path}: {existing} is not a directory, so the run "
                          "directory cannot be made there; choose another --run-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SessionStop(f"--run-dir {path}: {existing} is not writable by this user; "
                          "choose another --run-dir")


def check_machine(preset: str, gpus: int, train_args: list[str]) -> None:
    """The preset runs on this machine (its device is here, with enough GPUs), and its
    dataset is prepared and readable."""
    from bench.presets import PRESETS  # the fixed side knows each preset's device and data

    if preset not in PRESETS:
        raise SessionStop(f"--preset {preset}: unknown; choose one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    if spec.device == "cuda":
        import torch

        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found == 0:
            raise SessionStop(f"--preset {preset} runs on a CUDA GPU and this machine has "
                              "none visible: use --preset cpu-tiny here, or run on a GPU machine")
        if gpus > found:
            raise SessionStop(f"--gpus {gpus}: this machine has {found} CUDA GPU(s) visible; "
                              f"give --gpus {found} or fewer")
    check_data(dataset_of(preset, train_args))


def check_devices(config) -> None:
    """--devices names slots this machine has (agent/slots.py says what it may be)."""
    from agent.slots import parse_devices

    try:
        parse_devices(config.devices, config.device, config.gpus)
    except ValueError as e:
        raise SessionStop(str(e)) from None


def check_data(name: str) -> None:
    """Every file of the prepared dataset `name` is there and whole (the shards' headers
    against their sizes), so no run fails on it hours later."""
    from data.cache import DataMissingError
    from data.shards import ShardError, check_whole

    try:
        check_whole(name)
    except (DataMissingError, ShardError, ValueError, KeyError) as e:
        raise SessionStop(f"--data {name}: {e}") from None


def uncommitted_surface(repo: Path) -> list[str]:
    """Paths under model/ and kernels/ that differ from HEAD in the user's checkout: the
    session starts from HEAD, without them."""
    listing = git(repo, "status", "--porcelain", "--", *SURFACE_DIRS)
    return [line[3:] for line in listing.splitlines() if line.strip()]


def check_repo(repo: Path) -> None:
    try:
        git(repo, "rev-parse", "--verify", "HEAD^{commit}")
    except GitError as e:
        raise SessionStop(f"{repo} is not a git repository with a commit to start from "
                          f"({e}): run from a clone") from None


def check_proposer(proposer) -> dict | None:
    """An LLM proposer proves its key, URL and model with one tiny request; returns that
    request's usage (for the ledger), or None for a proposer that has no API."""
    if not hasattr(proposer, "check_access"):
        return None
    return proposer.check_access()


def settings_of(config: SessionConfig) -> dict:
    """The session's value of each flag that fixes one of its settings, in the flag's terms
    (the defaults it ran with included), for comparing with what a resume was given."""
    from agent.proposers.anthropic import LLMConfig
    from agent.proposers.command import CommandConfig

    options = dict(config.proposer_options)
    llm = LLMConfig.from_dict(options) if config.proposer == "anthropic" else None
    command = CommandConfig.from_dict(options) if config.proposer == "command" else None
    values = {
        "preset": config.preset, "objective": config.objective, "proposer": config.proposer,
        "proposer_arg": config.proposer_arg, "baseline_runs": config.baseline_runs,
        "budget_tokens": _train_flag(config.train_args, "--budget-tokens", int),
        "data": _train_flag(config.train_args, "--data", str),
        "target_loss": None if config.target_loss is None else round(config.target_loss, 4),
        "wandb": config.wandb, "allow_flagged": config.allow_flagged,
        "max_speedup": config.acceptance_config().max_speedup, "rules": config.rules,
        "loss_margin": config.judge_config().loss_margin,
        "paired": config.judge_config().paired,
        "gpus": config.gpus, "devices": config.devices, "no_sandbox": not config.sandbox,
        "cluster": config.cluster,
        "model": llm and llm.model, "max_usd_per_candidate": llm and llm.max_usd_per_candidate,
        "max_turns": llm and llm.max_turns, "effort": llm and llm.effort,
        "thinking": llm and (llm.thinking or {}).get("type"),
        "brief": (llm or command) and str(Path((llm or command).brief).resolve()),
        "agent_timeout": command and command.timeout_s,
    }  # fmt: skip
    if config.proposer == "replay":
        options = config.proposer_options
        values["runs"] = options["runs"]
        values["rungs"] = f"{options['first'] + 1}:{options['last'] + 1}"
    return values


def resume_conflicts(args, config: SessionConfig) -> None:
    """SessionStop naming the first flag given on a resume whose value is not the session's
    own (a session keeps its settings, or its runs would not compare)."""
    mine = settings_of(config)
    for name, theirs in mine.items():
        given = getattr(args, name, None)
        if given is None or given is False:  # not given (allow_flagged: not set)
            continue
        if name == "target_loss":
            given = round(given, 4)
        if name == "brief":
            given = str(Path(given).resolve())
        if name == "rungs":  # FROM:TO as the replay stores it
            from agent import replay

            first, last = replay.select(replay.load(config.proposer_arg), given)
            given = f"{first + 1}:{last + 1}"
        if given != theirs:
            shown = "it not set" if theirs is None else "it off" if theirs is False else theirs
            raise SessionStop(
                f"{flag(name)}{'' if given is True else f' {given}'}: this session has "
                f"{shown}, and a resumed session keeps "
                "its settings (a resume may change only "
                f"{', '.join(flag(b) for b in RESUME_BUDGETS)}); start a new session to "
                "change it"
            )
    if getattr(args, "run_dir", None) is not None:
        raise SessionStop(f"--run-dir {args.run_dir}: a resumed session stays in its "
                          "directory; give only --resume D")


def _train_flag(train_args: list[str], name: str, kind):
    return kind(train_args[train_args.index(name) + 1]) if name in train_args else None
