"""The knobs of the training recipe, read and rewritten in model/recipe.py's own text.

The sweep proposer turns the knobs that the recipe declares in KNOBS. This module reads
that declaration, finds where the session's preset takes each knob's value from (its entry
in PRESETS when the entry sets the field, else the field's default in Hyperparameters),
and rewrites values in place, every other character of the file kept. It reads the file
with `ast` and never imports the research surface.

A change of shape carries what depends on it, so no point of the knob space is an invalid
recipe: a new n_embd keeps the head dim (n_head follows); a new training seq_len keeps the
model's rotary table covering both it and the fixed evaluator's rows; a new batch_size
keeps micro_batch_size dividing it (equal to it when the recipe does not accumulate). One
rule spans two knobs: a step of batch_size x seq_len tokens leaves the run's token budget
at least MIN_STEPS steps, or is no larger than the current recipe's (a larger one is a run
of a few steps, or of none, and its batch may not fit in memory).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

FLOAT_SCALES = ("log", "linear")
MIN_STEPS = 16  # optimizer steps a run's token budget must hold at the least
KNOB_FORMS = ("a float knob is (low, high, 'log' or 'linear'); an integer knob is a list of "
              "increasing positive integers, the values it may take")


@dataclass(frozen=True)
class Knob:
    name: str
    scale: str  # "log" or "linear" for a float knob, "int" for an integer one
    low: float = 0.0
    high: float = 0.0
    choices: tuple[int, ...] = ()  # an integer knob's values, increasing

    def steps(self, value: float) -> list[float]:
        """One step each way from `value`, inside the knob's range, the sweep's first step
        first: down for an integer (a smaller model, a smaller batch: more steps for the same
        tokens), up for a float (x2 on a log scale, a fifth of the range on a linear one)."""
        if self.scale == "int":
            below = [c for c in self.choices if c < value]
            above = [c for c in self.choices if c > value]
            down = min(below, key=lambda c: abs(c - value / 2), default=None)
            up = min(above, key=lambda c: abs(c - value * 2), default=None)
            return [c for c in (down, up) if c is not None]
        if self.scale == "log":
            moves = [value * 2, value / 2]
        else:
            moves = [value + (self.high - self.low) / 5, value - (self.high - self.low) / 5]
        out = []
        for v in moves:
            v = rounded(min(max(v, self.low), self.high))
            if v != value and v not in out:
                out.append(v)
        return out


def rounded(value: float) -> float:
    """Four significant digits: what the sweep writes, so a point reads back equal."""
    return float(f"{value:.4g}")


def parse_knobs(tree: ast.Module, origin: str) -> dict[str, Knob]:
    """The KNOBS dictionary of a parsed recipe, checked."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "KNOBS" for t in node.targets
        ):
            try:
                specs = ast.literal_eval(node.value)
            except ValueError:
                raise ValueError(f"{origin}: KNOBS must be a literal dict ({KNOB_FORMS})") from None
            return {name: _knob(name, spec, origin) for name, spec in specs.items()}
    raise ValueError(f"{origin} declares no KNOBS: the sweep proposer has nothing to turn; "
                     f"add KNOBS = {{field: spec}} ({KNOB_FORMS})")


def _knob(name: str, spec, origin: str) -> Knob:
    if isinstance(spec, tuple) and len(spec) == 3 and spec[2] in FLOAT_SCALES:
        low, high, scale = spec
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
        if numbers and low < high and (scale == "linear" or low > 0):
            return Knob(name, scale, float(low), float(high))
    if (isinstance(spec, list) and spec and all(type(v) is int and v > 0 for v in spec)
            and spec == sorted(set(spec))):
        return Knob(name, "int", float(spec[0]), float(spec[-1]), tuple(spec))
    raise ValueError(f"{origin}: KNOBS[{name!r}] = {spec!r} is not a knob: {KNOB_FORMS} "
                     "(a log range must start above 0)")


class RecipeText:
    """One version of the recipe file, as one preset reads it: its knobs, where each knob's
    value is written, and the file with new values."""

    def __init__(self, text: str, preset: str, origin: str = "model/recipe.py"):
        self.text, self.preset, self.origin = text, preset, origin
        tree = ast.parse(text)
        self.knobs = parse_knobs(tree, origin)
        self.nodes = _value_nodes(tree, preset, origin)
        self.keys = {name: self._key(name) for name in self.knobs}

    def _key(self, name: str) -> str:
        for key in (name, f"model.{name}"):
            if key in self.nodes:
                return key
        raise ValueError(
            f"{self.origin}: the knob {name!r} has no value for preset {self.preset!r}: it is "
            f"neither a Hyperparameters field with a default nor set in PRESETS[{self.preset!r}]"
            " (or its GPTConfig); set it there or remove it from KNOBS")

    def value(self, key: str) -> float | int:
        """The value of a field: 'lr' for Hyperparameters.lr, 'model.n_layer' for the
        preset's GPTConfig."""
        if key not in self.nodes:
            raise ValueError(f"{self.origin}: PRESETS[{self.preset!r}] does not set {key}")
        try:
            return ast.literal_eval(self.nodes[key])
        except ValueError:
            raise ValueError(f"{self.origin}: {key} for preset {self.preset!r} is "
                             f"`{ast.unparse(self.nodes[key])}`, not a number the sweep can "
                             "turn; write it as a literal") from None

    def point(self) -> dict[str, float | int]:
        """The value of every knob, by knob name."""
        return {name: self.value(key) for name, key in self.keys.items()}

    def with_values(self, values: dict[str, float | int]) -> str:
        """The file with the fields in `values` (keys as for `value`) rewritten in place."""
        lines = self.text.splitlines(keepends=True)
        starts = [0]
        for line in lines:
            starts.append(starts[-1] + len(line.encode()))
        data = self.text.encode()
        spans = []
        for key, value in values.items():
            node = self.nodes[key]
            begin = starts[node.lineno - 1] + node.col_offset  # ast offsets count utf-8 bytes
            end = starts[node.end_lineno - 1] + node.end_col_offset
            spans.append((begin, end, f"{value:g}" if isinstance(value, float) else str(value)))
        for begin, end, new in sorted(spans, reverse=True):
            data = data[:begin] + new.encode() + data[end:]
        return data.decode()


def _value_nodes(tree: ast.Module, preset: str, origin: str) -> dict[str, ast.expr]:
    """Where each field's value is written for `preset`: the Hyperparameters defaults, then
    the keywords of the preset's entry in PRESETS (its GPTConfig's as 'model.<field>')."""
    nodes: dict[str, ast.expr] = {}
    entry = None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Hyperparameters":
            for item in node.body:
                if (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                        and item.value is not None):
                    nodes[item.target.id] = item.value
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == "PRESETS" for t in node.targets)):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and key.value == preset:
                    entry = value
    if not isinstance(entry, ast.Call):
        raise ValueError(f"{origin}: PRESETS has no entry Hyperparameters(...) for preset "
                         f"{preset!r}; add one, or run the sweep with a preset it has")
    for kw in entry.keywords:
        if kw.arg == "model" and isinstance(kw.value, ast.Call):
            nodes.update({f"model.{k.arg}": k.value for k in kw.value.keywords if k.arg})
        elif kw.arg:
            nodes[kw.arg] = kw.value
    return nodes


# The integer fields of a recipe's shape, which `check` holds to its rules.
SHAPE = ("model.n_layer", "model.n_embd", "model.n_head", "model.seq_len", "seq_len",
         "batch_size", "micro_batch_size")


def edits(recipe: RecipeText, point: dict, eval_seq_len: int, gpus: int = 1,
          budget_tokens: int | None = None) -> dict:
    """The field values that put the recipe at `point` (knob name -> value), with what
    depends on the knobs that change; raises ValueError if the result would be invalid."""
    current = recipe.point()
    out = {recipe.keys[name]: value for name, value in point.items() if value != current[name]}
    if "model.n_embd" in out:
        head_dim = recipe.value("model.n_embd") // recipe.value("model.n_head")
        if out["model.n_embd"] % head_dim:
            raise ValueError(f"{recipe.origin}: n_embd {out['model.n_embd']} is not a multiple "
                             f"of the head dim {head_dim}")
        out["model.n_head"] = out["model.n_embd"] // head_dim
    if "seq_len" in out:
        out["model.seq_len"] = max(out["seq_len"], eval_seq_len)
    if "batch_size" in out:
        batch, micro = out["batch_size"], recipe.value("micro_batch_size")
        if micro == recipe.value("batch_size"):
            out["micro_batch_size"] = batch
        else:
            out["micro_batch_size"] = max(d for d in range(1, min(micro, batch) + 1)
                                          if batch % d == 0)
    shape = {key: recipe.value(key) for key in SHAPE if key in recipe.nodes}
    step_tokens = None
    if budget_tokens and "batch_size" in shape and "seq_len" in shape:
        step_tokens = max(budget_tokens // MIN_STEPS, shape["batch_size"] * shape["seq_len"])
    check({**shape, **out}, eval_seq_len, gpus, recipe.origin, step_tokens)
    return out


def check(values: dict, eval_seq_len: int, gpus: int, origin: str,
          step_tokens: int | None = None) -> None:
    """The rules a recipe's shape must keep (None: the field is not set, not checked);
    `step_tokens`: the most tokens a step may take."""
    v = values.get
    problems = []
    for key, value in values.items():
        if key in SHAPE and value is not None and (type(value) is not int or value < 1):
            problems.append(f"{key} = {value!r} is not a positive integer")
    if v("model.n_embd") and v("model.n_head"):
        if v("model.n_embd") % v("model.n_head") or (v("model.n_embd") // v("model.n_head")) % 2:
            problems.append(f"n_embd {v('model.n_embd')} over {v('model.n_head')} heads is not "
                            "an even head dim (rotary embeddings rotate pairs)")
    if v("model.seq_len") and v("model.seq_len") < max(v("seq_len") or 0, eval_seq_len):
        problems.append(f"the model's seq_len {v('model.seq_len')} does not cover training rows "
                        f"of {v('seq_len')} and evaluation rows of {eval_seq_len}")
    if v("batch_size") and v("micro_batch_size") and v("batch_size") % v("micro_batch_size"):
        problems.append(f"micro_batch_size {v('micro_batch_size')} does not divide batch_size "
                        f"{v('batch_size')}")
    if step_tokens and v("batch_size") and v("seq_len") and (
            v("batch_size") * v("seq_len") > step_tokens):
        problems.append(f"a step of {v('batch_size')} x {v('seq_len')} tokens is over "
                        f"{step_tokens:,} (the token budget over {MIN_STEPS} steps)")
    if v("batch_size") and v("batch_size") % gpus:
        problems.append(f"batch_size {v('batch_size')} does not split over {gpus} GPUs")
    if problems:
        raise ValueError(f"{origin}: an invalid shape: {'; '.join(problems)}")


def valid_choices(recipe: RecipeText, knob: Knob, eval_seq_len: int, gpus: int,
                  budget_tokens: int | None = None) -> list:
    """The values of an integer knob that give a valid recipe from the current one, the
    current value included (it may lie outside the declared list)."""
    current = recipe.point()[knob.name]
    out = []
    for choice in sorted(set(knob.choices) | {current}):
        try:
            edits(recipe, {knob.name: choice}, eval_seq_len, gpus, budget_tokens)
        except ValueError:
            continue
        out.append(choice)
    return out
