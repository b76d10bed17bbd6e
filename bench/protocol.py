"""The contract between the harness (train.py) and whoever runs it (agent/runner.py, a user),
declared once: the result schema, the exit codes, and the progress lines with their parser.

train.py prints the lines with `eval_line` and `train_line` and writes a result with the
fields below; the runner parses the lines with `parse_eval_line` and `parse_train_line`
(early stopping, the live W&B run) and checks results with `contract_problem`. Change a
format here and both sides change together.
"""

from __future__ import annotations

import math
import re

# The version changes when a field is removed or changes its meaning; an optional field
# added (OPTIONAL_FIELDS) keeps it, since every reader handles a result without it.
SCHEMA_VERSION = 3

EXIT_OK, EXIT_CRASH, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTEGRITY = 0, 1, 2, 3, 4

# A result (exit 0) must have these fields with these types.
REQUIRED_FIELDS = {
    "schema_version": int,
    "status": str,
    "sandbox": bool,
    "tokens_per_sec": (int, float),
    "train_seconds": (int, float),
    "val_loss": (int, float),
    "curve": list,
}
CURVE_FIELDS = ("tokens", "seconds", "val_loss")
# Fields a result may have, with their types when present.
OPTIONAL_FIELDS = {
    # bench/telemetry.py: {"source": "nvml", "unavailable": why not or None, "start" and
    # "end": one NVML sample per GPU around the timed region, "throttled": reason names}
    "telemetry": dict,
}
TELEMETRY_FIELDS = {"unavailable": (str, type(None)), "start": list, "end": list,
                    "throttled": list}

_EVAL_LINE = re.compile(
    r"^eval\s+step\s+\d+\s*\|\s*tokens\s+(?P<tokens>[\d,]+)\s*\|\s*val loss\s+(?P<loss>\S+)"
    r"\s*\|\s*train time\s+(?P<seconds>[\d.]+)s"
)


def eval_line(steps: int, tokens: int, val_loss: float, seconds: float) -> str:
    """The line the harness prints at each evaluation (on stdout, as it happens)."""
    return (f"eval   step {steps:5d} | tokens {tokens:>11,} | val loss {val_loss:.4f} | "
            f"train time {seconds:.2f}s")


def parse_eval_line(line: str) -> dict | None:
    """{tokens, seconds, val_loss} of an eval line, or None for any other line."""
    match = _EVAL_LINE.match(line)
    if match is None:
        return None
    return {"tokens": int(match["tokens"].replace(",", "")), "seconds": float(match["seconds"]),
            "val_loss": float(match["loss"])}


_TRAIN_LINE = re.compile(
    r"^train\s+step\s+(?P<steps>\d+)\s*\|\s*tokens\s+(?P<tokens>[\d,]+)\s*\|\s*loss\s+(?P<loss>\S+)"
    r"\s*\|\s*(?P<speed>[\d,.]+) tok/s\s*\|\s*(?P<seconds>[\d.]+)s"
)


def train_line(steps: int, tokens: int, loss: float, seconds: float) -> str:
    """The line the harness prints every --log-every steps: the trainer's own word on its
    loss (logged for people to watch, never used to judge), the tokens sent and the time."""
    return (f"train  step {steps:5d} | tokens {tokens:>11,} | loss {loss:.4f} | "
            f"{tokens / max(seconds, 1e-9):,.0f} tok/s | {seconds:.1f}s")


def parse_train_line(line: str) -> dict | None:
    """{steps, tokens, seconds, train_loss, tokens_per_sec} of a train line, or None."""
    match = _TRAIN_LINE.match(line)
    if match is None:
        return None
    try:
        loss = float(match["loss"])
    except ValueError:
        return None
    return {"steps": int(match["steps"]), "tokens": int(match["tokens"].replace(",", "")),
            "seconds": float(match["seconds"]), "train_loss": loss,
            "tokens_per_sec": float(match["speed"].replace(",", ""))}


def violation(check: str, detail: str) -> dict:
    """One integrity violation as the result carries it: the check's name and what it saw."""
    return {"check": check, "detail": detail}


def contract_problem(result: dict) -> str | None:
    """What is wrong with an exit-0 result, or None if it honours this contract."""
    for name, kind in REQUIRED_FIELDS.items():
        if name not in result:
            return f"the result has no '{name}' field"
        value = result[name]
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            return f"the result's '{name}' is {value!r}, not of type {_type_name(kind)}"
    for name, kind in OPTIONAL_FIELDS.items():
        if name in result and not isinstance(result[name], kind):
            return f"the result's '{name}' is {result[name]!r}, not of type {_type_name(kind)}"
    telemetry = result.get("telemetry", {})
    for name, kind in TELEMETRY_FIELDS.items():
        if telemetry and not isinstance(telemetry.get(name), kind):
            return (f"the result's telemetry.{name} is {telemetry.get(name)!r}, not of type "
                    f"{_type_name(kind)}")
    if result["schema_version"] != SCHEMA_VERSION:
        return (f"result schema_version {result['schema_version']} but this reader knows "
                f"version {SCHEMA_VERSION}: bench/protocol.py and train.py disagree")
    if result["status"] != "ok":
        return f"exit code 0 but the result's status is {result['status']!r}"
    if not result["curve"]:
        return "the result's curve is empty"
    for i, row in enumerate(result["curve"]):
        if not isinstance(row, dict) or any(
            isinstance(row.get(k), bool) or not isinstance(row.get(k), (int, float))
            for k in CURVE_FIELDS
        ):
            return f"curve row {i} is {row!r}: it needs numbers {', '.join(CURVE_FIELDS)}"
    bad = _non_finite(result)
    if bad is not None:
        return f"{bad} is not a finite number"
    return None


def _non_finite(value: object, where: str = "result") -> str | None:
    """Where the first NaN or infinity is in a JSON value, e.g. 'result.curve[2].val_loss'."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} = {value}"
    if isinstance(value, dict):
        children = ((f"{where}.{k}", v) for k, v in value.items())
    elif isinstance(value, list):
        children = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for path, child in children:
        bad = _non_finite(child, path)
        if bad is not None:
            return bad
    return None


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)
