"""Reading evaluation curves: when did validation loss first reach a target?

Shared by the harness (which stops a run there) and the judge (which reads the same
crossing off a baseline curve that ran to its end), so both measure it the same way.
Runs with and without a target evaluate on the same schedule (eval_points), which is
what makes the two readings comparable.
"""


def eval_points(n_evals: int) -> list[float]:
    """Progress fractions at which the harness evaluates: n_evals evenly spaced, and four
    times as dense over the last 30% of the run, where a target loss is usually crossed."""
    even = [i / n_evals for i in range(1, n_evals)]
    dense = [1 - i / (4 * n_evals) for i in range(1, int(0.3 * 4 * n_evals) + 1)]
    return sorted(p for p in set(round(p, 6) for p in even + dense) if 0 < p < 1)


def interpolate_target(curve: list[dict], target: float) -> float | None:
    """Training time at which val loss first crossed the target, linear between evaluations;
    None when the curve never reached it."""
    if curve and curve[0]["val_loss"] <= target:
        return curve[0]["seconds"]
    for prev, cur in zip(curve, curve[1:]):
        if cur["val_loss"] <= target < prev["val_loss"]:
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - cur["val_loss"])
            return prev["seconds"] + frac * (cur["seconds"] - prev["seconds"])
    return None
