"""A session's settings, typed, and the one way settings are loaded from a dict: strictly.

A session keeps its `SessionConfig` in its ledger (as JSON) from the moment it is created,
and every part of the engine reads it back from there through `stored`. Every typed
settings class (SessionConfig, the judge's, the acceptance checks', the LLM and command
proposers', a replay's) is built from a dict by `from_dict`, which refuses a key it does
not know, naming it, instead of dropping it.

What this module must never do: accept a setting it does not know, or change a stored
session (the loop stores what changes: the target, the time budget, the file hashes).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from agent.acceptance import AcceptanceConfig
from agent.judge import JudgeConfig
from agent.ledger import Ledger
from agent.rundir import RunDir


class SessionStop(Exception):
    """The session cannot start or go on (the baseline itself fails, say); the message says
    why and what to do."""


def from_dict(cls, data: dict, what: str):
    """The dataclass `cls` from `data`; ValueError naming the keys it does not know."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(known)}")
    return cls(**data)


@dataclass
class SessionConfig:
    preset: str = "cpu-tiny"
    objective: str = "time-to-loss"  # time-to-loss | throughput | loss-at-time
    proposer: str = "sweep"
    proposer_arg: str | None = None  # e.g. the patch directory, or the agent command
    proposer_options: dict = field(default_factory=dict)  # LLMConfig / CommandConfig fields
    experiments: int | None = None  # stop after this many decided candidates
    hours: float | None = None  # stop after this many hours of session time
    deadline: float | None = None  # stop at this unix time
    baseline_runs: int = 3  # baseline replicates that measure the noise (>= 2)
    remeasure_every: int = 3  # re-measure the champion after this many candidates
    max_failures: int = 5  # proposer failures in a row, with one cause, that stop the session
    train_args: list[str] = field(default_factory=list)  # extra train.py flags, every run
    target_loss: float | None = None  # time-to-loss target; None: from the baseline replicates
    target_slack: float = 0.01  # least nats above the worst baseline replicate's final loss
    seconds: float | None = None  # loss-at-time budget; None: from one calibration run
    overlap: bool = True  # draft the next candidate while the current one runs
    early_stop_margin: float = 0.15  # nats behind the champion's curve that stop a screen
    timeout_factor: float = 3.0  # a run's hard timeout, in expected run times
    device: str = "cpu"
    gpus: int = 1  # processes of every benchmark run, one per GPU: torchrun when > 1
    devices: str | None = None  # the slots (agent/slots.py): None, "cpu:N", "all", "0,1,2,5"
    cluster: str | None = None  # "ray": the slots are actors of a Ray cluster (agent/cluster.py)
    rules: str | None = None  # a leaderboard (agent/leaderboard.py) whose loss test applies too
    judge: dict = field(default_factory=dict)  # JudgeConfig overrides
    # AcceptanceConfig overrides: the holdout-gap and untimed-overhead tests, and the speedup
    # above which a step is held for a human (max_speedup), checked before every accept.
    acceptance: dict = field(default_factory=dict)
    wandb: str = "auto"  # auto (online with a key, else offline) | offline | disabled
    repo: str = "."
    # The sha256 of every fixed file, taken at session start and checked before every run
    # (`fixed-hash`); and whether candidates the diff scan flags may run.
    fixed_hashes: dict | None = None
    allow_flagged: bool = False
    # False: candidate code runs unconfined (--no-sandbox), every result marked untrusted.
    sandbox: bool = True

    @classmethod
    def from_dict(cls, data: dict) -> SessionConfig:
        return from_dict(cls, data, "session settings")

    def budget_tokens(self) -> int:
        """The token budget of every run (the schedule's horizon): --budget-tokens among
        train_args, else the preset's."""
        from bench.presets import PRESETS

        if "--budget-tokens" in self.train_args:
            return int(self.train_args[self.train_args.index("--budget-tokens") + 1])
        return PRESETS[self.preset].budget_tokens

    def dataset(self) -> str:
        return dataset_of(self.preset, self.train_args)

    def judge_config(self) -> JudgeConfig:
        return from_dict(JudgeConfig, {"objective": self.objective, **self.judge},
                         "judge settings")

    def acceptance_config(self) -> AcceptanceConfig:
        return from_dict(AcceptanceConfig, self.acceptance, "acceptance settings")


def dataset_of(preset: str, train_args: list[str]) -> str:
    """The dataset of every run: --data among the train.py flags, else the preset's."""
    from bench.presets import PRESETS

    if "--data" in train_args:
        return train_args[train_args.index("--data") + 1]
    return PRESETS[preset].data


def stored(run_dir: Path) -> tuple[dict, SessionConfig]:
    """The session row ({'id', 'created', 'config'}) and config of the session in `run_dir`;
    SessionStop when it holds none."""
    path = RunDir(run_dir).ledger
    if not path.exists():
        raise SessionStop(f"{run_dir} holds no session ({path.name} missing): start one "
                          f"with `python -m agent run --run-dir {run_dir}`")
    with Ledger(path, create=False) as ledger:
        session = ledger.session()
    if session is None:
        raise SessionStop(f"{path} holds no session row (its creation was interrupted): "
                          f"remove {run_dir} and start the session again")
    try:
        return session, SessionConfig.from_dict(session["config"])
    except ValueError as e:
        raise SessionStop(f"{path}: {e}: finish this session with the speedloop that began "
                          "it, or start a new run directory") from None
