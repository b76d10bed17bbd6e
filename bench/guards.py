"""Integrity checks at the model boundary (threat 5 of bench/INTEGRITY.md), for the harness.

The surface may override its model's state_dict, load_state_dict or named_parameters, so
these read the tensors through torch.nn.Module's and torch.optim.Optimizer's own methods,
unbound. They must never change the model, and never be called inside the timed region.
"""

import torch


def module_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the model by name (non-persistent buffers included)."""
    out = dict(torch.nn.Module.named_parameters(model, remove_duplicate=False))
    out.update(dict(torch.nn.Module.named_buffers(model, remove_duplicate=False)))
    return out


def restore_problems(recipe, state: tuple[dict, list[dict]]) -> list[str]:
    """What differs, after `restore`, from the snapshot it restored: empty when the model and
    the optimizers are exactly the initial ones (no warmup progress kept)."""
    model_state, opt_states = state
    problems = []
    now = torch.nn.Module.state_dict(recipe.model, keep_vars=True)
    for name in sorted(set(now) | set(model_state)):
        a, b = now.get(name), model_state.get(name)
        if a is None or b is None:
            problems.append(f"model tensor {name} is {'missing' if a is None else 'new'}")
        elif not _same(a.detach(), b):
            problems.append(f"model tensor {name} differs from its initial value")
    for i, (opt, expected) in enumerate(zip(recipe.optimizers, opt_states)):
        if not _same(torch.optim.Optimizer.state_dict(opt), expected):
            problems.append(f"optimizer {i} ({type(opt).__name__}) state is not the initial one")
    if len(recipe.optimizers) != len(opt_states):
        problems.append("the recipe's list of optimizers changed during warmup")
    return problems


def _same(a, b) -> bool:
    """Exact equality of nested state (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a, b.to(a.device))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN equals NaN here


def fingerprint(model: torch.nn.Module) -> tuple[list[str], torch.Tensor]:
    """Names, and per tensor (sum, sum of squares, sum of the even elements) in float64,
    computed on the tensors' device and fetched in one transfer: cheap at every evaluation
    even for a 124M model on a GPU."""
    names, rows = [], []
    for name, t in module_tensors(model).items():
        v = t.detach()
        v = torch.view_as_real(v) if v.is_complex() else v
        v = v.reshape(-1).to(torch.float64)
        rows.append(torch.stack([v.sum(), torch.dot(v, v), v[::2].sum()]))
        names.append(name)
    if not rows:
        return names, torch.zeros(0, 3, dtype=torch.float64)
    return names, torch.stack([r.to(rows[0].device) for r in rows]).cpu()


def fingerprint_change(
    before: tuple[list[str], torch.Tensor], after: tuple[list[str], torch.Tensor]
) -> str | None:
    """The first tensor whose fingerprint changed, as a reason; None when none did."""
    (names_a, a), (names_b, b) = before, after
    if names_a != names_b:
        added = sorted(set(names_b) - set(names_a))
        gone = sorted(set(names_a) - set(names_b))
        return f"the model's tensors changed: new {added[:3]}, gone {gone[:3]}"
    for i, name in enumerate(names_a):
        # Exact (the same tensor sums to the same bits); NaN equals NaN, so a model that
        # diverged before this evaluation is reported as diverged, not as a violation.
        same = (a[i] == b[i]) | (a[i].isnan() & b[i].isnan())
        if not bool(same.all()):
            return f"tensor {name} changed during evaluation"
    return None
