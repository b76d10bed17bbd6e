"""The research context that an LLM (or an external coding agent) reads before each candidate.

Two parts. The stable part, the same for every candidate of a session (so the API can cache
it): the rules of the game and the user's research brief (program.md). The per-candidate
part: the objective, the champion's metrics with their spread, the hardware, a profile of
the champion when the engine has one, a one-line digest of every candidate tried so far
(so nothing is tried twice) and the full diffs of the last few accepted ones. Everything
here is read from what the engine passes in; this module never reads the ledger itself and
never changes a file.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.surface import SURFACE_DIRS

MAX_HISTORY_LINES = 80  # the most recent candidates listed one per line; older ones counted
MAX_LINE_CHARS = 160  # a description or a reason in the digest
MAX_DIFF_CHARS = 12_000  # one accepted diff
MAX_PROFILE_CHARS = 8_000

SURFACE_TEXT = ", ".join(f"{d}/" for d in SURFACE_DIRS)

GAME_RULES = f"""\
You are a research engineer in speedloop, an automated loop that makes the training of a
nanoGPT-style model faster. A fixed benchmark trains the model and measures it; a
statistical judge keeps a change only when it is significantly faster and validation loss
is not worse. Each candidate is one focused edit of the research surface ({SURFACE_TEXT}),
made on top of the current champion.

How the benchmark works:
- train.py (fixed) runs the surface in a sandbox through model/__init__.py (build_recipe,
  Recipe: model, optimizers, batch_shape, train_step, logits, flops_per_token): it sends
  every training batch, owns the clock, and freezes training during evaluation. The
  sandbox has no data, no network and no writable files but the weights it hands over;
  one trainer thread on the CPU.
- bench/ (fixed) computes the validation loss itself, in fp32, from recipe.logits on
  input rows only, and checks with twin rows that the logits at a position depend on
  nothing but that row's earlier tokens, and do not change as evaluation goes on.
- kernels/ holds Triton kernels with pure-torch references; the harness picks the backend
  (triton on CUDA). A kernel must match its reference.
- Only {SURFACE_TEXT} may change. Anything else (train.py, bench/, data/, agent/, tests/) is
  fixed; a change outside the surface is refused before it runs.

Rules:
- One idea per candidate, small enough that its effect can be attributed to it.
- Never repeat a change from the history below; learn from the rejected ones.
- Keep the model causal and the loss honest: no looking ahead, no special cases for
  evaluation, no changes that only move work outside the timed region.
- Prefer changes that are faster at equal quality (throughput, fewer wasted steps, better
  schedules or optimizers that reach the target loss sooner).
"""


def read_brief(path: str | Path) -> str:
    """The user's research brief (program.md); FileNotFoundError names the path and fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"research brief {path} not found: create it (program.md at the repository "
            "root is the default) or point the proposer at another file"
        )
    return path.read_text()


def stable_prompt(brief: str) -> str:
    """The part of the prompt that stays the same for every candidate of a session."""
    return f"{GAME_RULES}\n# Research brief (program.md)\n\n{brief.strip()}\n"


def _ok(results: list[dict]) -> list[dict]:
    return [r for r in results if r.get("status", "ok") == "ok"]


def _spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    return f"{format(mean, fmt)} ± {format(sd, fmt)}"


METRICS = (  # result key, label, format
    ("time_to_target", "time to target (s)", ".2f"),
    ("tokens_per_sec", "tokens/s", ",.0f"),
    ("val_loss", "val loss", ".4f"),
    ("val_bpb", "val bits per byte", ".4f"),
    ("train_seconds", "training time (s)", ".2f"),
    ("mfu", "MFU", ".3f"),
    ("peak_memory_bytes", "peak memory (bytes)", ",.0f"),
)


def champion_summary(context: dict) -> str:
    """The objective, the champion and its metrics (mean ± sd over its ok runs)."""
    champion = context.get("champion") or {}
    results = _ok(context.get("champion_results") or [])
    number = champion.get("experiment")
    name = "the baseline" if number is None else f"#{number}"
    lines = [
        f"Preset: {context.get('preset', '?')}; objective: {context.get('objective', '?')}.",
        f"Champion: {name} '{champion.get('description', '?')}'"
        + (f", x{champion['speedup']:.3f} vs the baseline" if champion.get("speedup") else ""),
    ]
    target = next((r["target_loss"] for r in results if r.get("target_loss")), None)
    if target is not None:
        lines.append(f"Target val loss: {target:.4f}")
    if not results:
        return "\n".join(lines + ["No successful runs of the champion yet."])
    lines.append(f"Its metrics over {len(results)} run(s) (mean ± sd):")
    for key, label, fmt in METRICS:
        values = [float(r[key]) for r in results if isinstance(r.get(key), (int, float))]
        if values:
            lines.append(f"- {label}: {_spread(values, fmt)}")
    return "\n".join(lines)


def hardware_summary(results: list[dict]) -> str:
    r = next(iter(_ok(results)), None)
    if r is None:
        return "Hardware: not measured yet."
    device = r.get("gpu_name") or f"CPU ({r.get('cpu') or 'unknown'})"
    parts = [
        f"device {r.get('device', '?')}: {device}",
        f"torch {r.get('torch_version', '?')}",
        f"triton {r.get('triton_version') or 'none'}",
        f"kernels backend {r.get('kernels', '?')}",
        f"torch.compile {'on' if r.get('compile') else 'off'}",
    ]
    return "Hardware: " + ", ".join(parts) + "."


def _short(text: str | None, limit: int = MAX_LINE_CHARS) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def digest_line(row: dict) -> str:
    """`#3 [optimizer] reject x0.981 (CI 0.95-1.01, p=0.62): desc — reason`."""
    decision = row.get("decision") or {}
    verdict = row.get("verdict") or row.get("state", "?")
    outcome = verdict
    if decision.get("effect") is not None and verdict != "refused":
        outcome += f" x{decision['effect']:.3f}"
        if decision.get("ci_low") is not None and decision.get("ci_high") is not None:
            outcome += f" (CI {decision['ci_low']:.3f}-{decision['ci_high']:.3f}"
            if decision.get("p_value") is not None:
                outcome += f", p={decision['p_value']:.3g}"
            outcome += ")"
        if decision.get("loss_delta") is not None:
            outcome += f", val loss {decision['loss_delta']:+.4f}"
    reason = f" — {_short(decision.get('reason'))}" if decision.get("reason") else ""
    category = f"[{row['category']}] " if row.get("category") else ""
    return f"#{row.get('experiment')} {category}{outcome}: {_short(row.get('description'))}" \
        + reason


def history_digest(history: list[dict], max_lines: int = MAX_HISTORY_LINES) -> str:
    """One line per candidate tried (the baseline excluded), oldest first, most recent last;
    beyond `max_lines`, the oldest are only counted."""
    rows = [r for r in history if r.get("experiment") is not None]
    if not rows:
        return "No candidates tried yet: this is the first."
    lines = []
    older, recent = rows[:-max_lines] if len(rows) > max_lines else [], rows[-max_lines:]
    if older:
        counts: dict[str, int] = {}
        for r in older:
            key = r.get("verdict") or r.get("state", "?")
            counts[key] = counts.get(key, 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        lines.append(f"({len(older)} earlier candidates not listed: {summary})")
    lines += [digest_line(r) for r in recent]
    return "\n".join(lines)


def accepted_diffs(history: list[dict], n: int = 3, max_chars: int = MAX_DIFF_CHARS) -> str:
    """The full diffs of the last `n` accepted candidates, most recent last."""
    accepted = [r for r in history if r.get("verdict") == "accept" and r.get("experiment")]
    if not accepted:
        return "No candidate has been accepted yet: the champion is the baseline."
    parts = []
    for r in accepted[-n:]:
        diff = r.get("diff") or ""
        if len(diff) > max_chars:
            diff = diff[:max_chars] + f"\n... ({len(diff) - max_chars} more characters)"
        parts.append(f"## #{r['experiment']} {_short(r.get('description'))}\n```diff\n"
                     f"{diff.rstrip()}\n```")
    return "\n\n".join(parts)


def research_context(context: dict, history: list[dict], n_diffs: int = 3) -> str:
    """The per-candidate part of the prompt, as markdown."""
    results = context.get("champion_results") or []
    sections = [
        "# The champion\n\n" + champion_summary(context) + "\n\n" + hardware_summary(results),
    ]
    profile = (context.get("profile") or "").strip()
    if profile:
        if len(profile) > MAX_PROFILE_CHARS:
            profile = profile[:MAX_PROFILE_CHARS] + "\n..."
        sections.append(f"# Profile of the champion\n\n```\n{profile}\n```")
    sections.append("# History (oldest first)\n\n" + history_digest(history))
    sections.append("# Recently accepted changes\n\n" + accepted_diffs(history, n_diffs))
    return "\n\n".join(sections) + "\n"
