"""The knob sweep: a search over the knobs that the recipe declares (model/recipe.py: KNOBS).

Each proposal is a real edit of the surface file: agent/proposers/knobs.py rewrites the
values where the session's preset takes them from, so the edit reaches the benchmark
exactly as an LLM's would. The first proposals of a session (the warm start) each move one
knob one step from the champion, in the order KNOBS lists them; after those, Optuna's TPE
sampler proposes a whole point of the knob space, fitted to every point the session has
measured. The study is built afresh from the ledger's history at every proposal (each
earlier sweep candidate's point is read from the recipe at its commit, its outcome from its
verdict), so a resumed session goes on where it stopped, the same history and seed give
the same proposal, and a point already tried is never proposed again.
"""

from __future__ import annotations

import math
import re
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from agent.proposers.base import Proposal
from agent.proposers.knobs import Knob, RecipeText, edits, rounded, valid_choices
from bench.presets import PRESETS as FIXED_PRESETS

RECIPE = "model/recipe.py"
PREFIX = "sweep: "
# The sampler takes over once the session has made as many sweep proposals as there are
# knobs (the warm start: one step of each knob from the champion), not before: fitted to
# fewer points it offers points far from the champion in every knob, and in two demos its
# four such proposals all lost (bench/RESULTS.md).
MAX_ASKS = 64  # tried or invalid points the sampler may offer before the sweep ends
# The outcome of a run that failed or missed its target, in log speedup below its parent:
# a third of the parent's speed, worse than any candidate that finished.
FAILED = math.log(1 / 3)

Point = dict[str, float | int]


def read_knobs(recipe: Path, preset: str = "cpu-tiny") -> dict[str, Knob]:
    """The KNOBS of a recipe file, read without importing the surface."""
    return RecipeText(recipe.read_text(), preset, str(recipe)).knobs


def read_value(recipe: Path, name: str, preset: str = "cpu-tiny") -> float | int:
    """A knob's value for `preset`, where that preset takes it from."""
    text = RecipeText(recipe.read_text(), preset, str(recipe))
    return text.value(text.keys.get(name, name))


def write_value(recipe: Path, name: str, value: float | int, preset: str = "cpu-tiny") -> None:
    """Rewrite one field's value for `preset` (a knob by name, or any field the preset's
    entry sets, 'model.<field>' for its GPTConfig), leaving the rest of the file as it is."""
    text = RecipeText(recipe.read_text(), preset, str(recipe))
    recipe.write_text(text.with_values({text.keys.get(name, name): value}))


def point_key(point: Point) -> tuple:
    return tuple(sorted((name, rounded(float(value))) for name, value in point.items()))


def describe(old: Point, new: Point) -> str:
    changed = [f"{name} {old[name]:g} -> {new[name]:g}" for name in new if new[name] != old[name]]
    return PREFIX + ", ".join(changed)


def knob_of(text: str | None) -> dict | None:
    """What a sweep candidate's description says it changed, flat for a W&B config:
    {'knobs': 'n_layer,seq_len', 'n_layer_from': 4.0, 'n_layer_to': 2.0, ...}; else None."""
    if not (text or "").startswith(PREFIX):
        return None
    out, names = {}, []
    for part in text[len(PREFIX):].split(", "):
        match = re.fullmatch(r"(\w+) (\S+) -> (\S+)", part)
        if match is None:
            return None
        names.append(match[1])
        out[f"{match[1]}_from"], out[f"{match[1]}_to"] = float(match[2]), float(match[3])
    return {"knobs": ",".join(names), **out}


class SweepProposer:
    name = "sweep"

    def __init__(self, seed: int = 0, warm_start: int | None = None):
        self.seed, self.warm_start = seed, warm_start  # None: as many as there are knobs

    def propose(self, worktree: Path, history: list[dict], context: dict) -> Proposal | None:
        preset = context.get("preset", "cpu-tiny")
        gpus = context.get("gpus", 1)
        budget = context.get("budget_tokens", FIXED_PRESETS[preset].budget_tokens)
        eval_seq_len = FIXED_PRESETS[preset].eval_seq_len
        path = worktree / RECIPE
        recipe = RecipeText(path.read_text(), preset, str(path))
        champion = recipe.point()
        try:
            edits(recipe, {}, eval_seq_len, gpus, budget)
        except ValueError as e:
            raise ValueError(f"{e}: the champion itself; fix PRESETS[{preset!r}] there") from None
        # An integer knob takes only values that make a valid recipe: none, it stays put.
        knobs = {name: knob if knob.scale != "int" else
                 replace(knob, choices=tuple(valid_choices(recipe, knob, eval_seq_len, gpus,
                                                           budget)) or (champion[name],))
                 for name, knob in recipe.knobs.items()}
        measured = past_points(worktree, history, preset)
        tried = {point_key(p) for p, _ in measured} | {point_key(champion)}
        sweeps = sum(1 for row in history if is_sweep(row))
        how = "warm start"

        def valid(point: Point) -> bool:
            try:
                edits(recipe, point, eval_seq_len, gpus, budget)
            except ValueError:
                return False
            return True

        warm = len(knobs) if self.warm_start is None else self.warm_start
        point = warm_step(knobs, champion, tried) if sweeps < warm else None
        if point is None:
            how = f"TPE (seed {self.seed}) over {sum(v is not None for _, v in measured)} points"
            point = tpe_point(knobs, measured, tried, valid, self.seed)
        if point is None:
            return None
        path.write_text(recipe.with_values(edits(recipe, point, eval_seq_len, gpus, budget)))
        return Proposal(description=describe(champion, point),
                        hypothesis=f"{how}: this point of the recipe's knobs trains faster",
                        category="hyperparameter")


def is_sweep(row: dict) -> bool:
    return row.get("parent_id") is not None and (
        row.get("proposer") == SweepProposer.name
        or (row.get("description") or "").startswith(PREFIX))


def warm_step(knobs: dict[str, Knob], champion: Point, tried: set) -> Point | None:
    """One knob one step from the champion: every knob's first step, in KNOBS order, then
    every knob's second; None when all were tried."""
    for rank in (0, 1):
        for name, knob in knobs.items():
            moves = knob.steps(champion[name])
            if knob.scale == "int":  # only the valid values: steps() picks among choices
                moves = [m for m in moves if m in knob.choices]
            if len(moves) > rank:
                point = {**champion, name: moves[rank]}
                if point_key(point) not in tried:
                    return point
    return None


def past_points(worktree: Path, history: list[dict],
                preset: str) -> list[tuple[Point, float | None]]:
    """The point of the baseline and of every sweep candidate in the history, each with its
    outcome as the sampler maximises it: log speedup vs the baseline for a measured one,
    None for one still running or held. A rejection scores below its parent; a failure
    (no effect measured) FAILED below it."""
    speed: dict[int, float] = {}  # each champion's speedup vs the baseline, by id
    out = []
    for row in history:
        decision = row.get("decision") or {}
        effect = decision.get("effect")
        if row.get("parent_id") is None:
            speed[row["id"]] = 1.0
        elif row.get("verdict") == "accept" and row.get("parent_id") in speed and effect:
            speed[row["id"]] = speed[row["parent_id"]] * effect
        if not (row.get("parent_id") is None or is_sweep(row)) or not row.get("commit_sha"):
            continue
        point = recipe_at(worktree, row["commit_sha"], preset).point()
        base = math.log(speed.get(row.get("parent_id"), 1.0))
        if row.get("parent_id") is None or row.get("verdict") == "accept":
            value = math.log(speed[row["id"]]) if row["id"] in speed else None
        elif row.get("verdict") == "reject":
            # Not faster than its parent, whatever the estimate: the judge said no.
            value = base + (math.log(min(effect, 1.0)) - 1e-3 if effect else FAILED)
        else:
            value = None
        out.append((point, value))
    return out


def recipe_at(worktree: Path, commit: str, preset: str) -> RecipeText:
    proc = subprocess.run(["git", "show", f"{commit}:{RECIPE}"], cwd=worktree,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ValueError(f"the sweep cannot read {RECIPE} at commit {commit} in {worktree}: "
                         f"{proc.stderr.strip()} (were the session's refs removed? "
                         "`python -m agent clean` keeps those of live sessions)")
    return RecipeText(proc.stdout, preset, f"{RECIPE} at {commit[:12]}")


def tpe_point(knobs: dict[str, Knob], measured: list, tried: set,
              valid: Callable[[Point], bool], seed: int) -> Point | None:
    """The next valid, untried point of Optuna's TPE sampler, fitted to the measured points
    (a point it offers that was tried, or breaks a rule spanning two knobs, is told to it as
    failed); None when it keeps offering such points."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {name: _distribution(knob) for name, knob in knobs.items()}
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=1)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for point, value in measured:
        params = _params(knobs, point)
        if value is not None and params is not None:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=space,
                                                      value=value))
    for _ in range(MAX_ASKS):
        trial = study.ask(space)
        point = {name: knob.choices[trial.params[name]] if knob.scale == "int"
                 else rounded(trial.params[name]) for name, knob in knobs.items()}
        if point_key(point) not in tried and valid(point):
            return point
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return None


def _distribution(knob: Knob):
    from optuna.distributions import FloatDistribution, IntDistribution

    if knob.scale == "int":  # the index into the choices: TPE sees their order
        return IntDistribution(0, len(knob.choices) - 1)
    return FloatDistribution(knob.low, knob.high, log=knob.scale == "log")


def _params(knobs: dict[str, Knob], point: Point) -> dict | None:
    """A point as the sampler's parameters; None if it lies outside the space (a value
    not among the choices, or outside a range)."""
    params = {}
    for name, knob in knobs.items():
        value = point.get(name)
        if value is None:
            return None
        if knob.scale == "int":
            if value not in knob.choices:
                return None
            params[name] = knob.choices.index(value)
        elif knob.low <= value <= knob.high:
            params[name] = float(value)
        else:
            return None
    return params
