"""A local search over the knobs that the recipe declares (model/recipe.py: KNOBS).

Each proposal is a real edit of the surface file: the knob's default in the
Hyperparameters dataclass is rewritten, so the edit reaches the benchmark exactly as an
LLM's edit would. Knobs are visited in turn, each tried one step up and one step down
from the champion's value (x2 / /2 on a log scale, +/- a fifth of the range on a linear
one), skipping values already tried in this session, and knobs that the session's preset
sets itself in PRESETS (a new default would not reach its runs).
"""

import ast
import re
from pathlib import Path

from agent.proposers.base import Proposal

RECIPE = "model/recipe.py"
PREFIX = "sweep: "


def read_knobs(recipe: Path) -> dict[str, tuple[float, float, str]]:
    """The KNOBS dictionary of the recipe file, read without importing the surface."""
    for node in ast.parse(recipe.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "KNOBS" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise ValueError(f"{recipe} declares no KNOBS: the sweep proposer has nothing to turn")


def overridden(recipe: Path, preset: str) -> set[str]:
    """The Hyperparameters fields that the preset's entry in PRESETS sets itself: an edit of
    such a field's default would not reach that preset's runs."""
    for node in ast.parse(recipe.read_text()).body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == "PRESETS" for t in node.targets)):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and key.value == preset:
                    if isinstance(value, ast.Call):
                        return {k.arg for k in value.keywords if k.arg}
    return set()


def _field_pattern(name: str) -> re.Pattern:
    # The dataclass field line: `    name: float = 0.04  # comment`.
    return re.compile(rf"^(\s+{re.escape(name)}: float = )([-+0-9.eE]+)(.*)$", re.MULTILINE)


def read_value(recipe: Path, name: str) -> float:
    match = _field_pattern(name).search(recipe.read_text())
    if match is None:
        raise ValueError(f"{recipe} has no line `{name}: float = VALUE` for the knob {name}")
    return float(match.group(2))


def write_value(recipe: Path, name: str, value: float) -> None:
    text = recipe.read_text()
    new, count = _field_pattern(name).subn(lambda m: f"{m.group(1)}{value:g}{m.group(3)}", text)
    if count != 1:
        raise ValueError(f"{recipe}: expected one `{name}: float = ...` line, found {count}")
    recipe.write_text(new)


def steps(value: float, low: float, high: float, scale: str) -> list[float]:
    """The values one step up and one step down from `value`, inside [low, high]."""
    if scale == "log":
        moves = [value * 2, value / 2]
    else:
        moves = [value + (high - low) / 5, value - (high - low) / 5]
    out = []
    for v in moves:
        v = float(f"{min(max(v, low), high):.4g}")
        if v != value and v not in out:
            out.append(v)
    return out


def description(name: str, old: float, new: float) -> str:
    return f"{PREFIX}{name} {old:g} -> {new:g}"


def knob_of(text: str | None) -> dict | None:
    """{knob, from, to} of a sweep candidate's description, else None."""
    match = re.fullmatch(rf"{PREFIX}(\w+) (\S+) -> (\S+)", text or "")
    if match is None:
        return None
    return {"knob": match.group(1), "from": float(match.group(2)), "to": float(match.group(3))}


def tried(history: list[dict]) -> set[tuple[str, float]]:
    """(knob, value) pairs already proposed by the sweep in this session."""
    knobs = (knob_of(row.get("description")) for row in history)
    return {(k["knob"], k["to"]) for k in knobs if k}


class SweepProposer:
    name = "sweep"

    def propose(self, worktree: Path, history: list[dict], context: dict) -> Proposal | None:
        recipe = worktree / RECIPE
        done = tried(history)
        fixed = overridden(recipe, context.get("preset", "cpu-tiny"))
        for name, (low, high, scale) in read_knobs(recipe).items():
            if name in fixed:
                continue
            current = read_value(recipe, name)
            for value in steps(current, low, high, scale):
                if (name, value) in done:
                    continue
                write_value(recipe, name, value)
                return Proposal(
                    description=description(name, current, value),
                    hypothesis=f"{name} at {value:g} instead of {current:g} trains faster",
                    category="hyperparameter",
                )
        return None
