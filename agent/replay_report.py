"""The outputs of a leaderboard replay, derived from its ledger and its ladder.

- replay.md: a header (ladder, device, preset, the target and where it came from, and on a
  CPU the warning that its speedups are not a GPU's) and one row per rung: runs, measured
  time, speedup over the rung before with its confidence interval, cumulative speedup, val
  loss and the loss test, the published figure and its reference.
- replay.png: time against rung with confidence intervals, and the published cumulative
  speedups drawn from the same start where the ladder has them.
- replay_table(): the same table as columns and rows, for W&B.

What this module must never do: write to the ledger, or show a number it did not get from
the ledger's runs or the ladder's manifest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from agent.config import SessionConfig, stored
from agent.judge import comparable
from agent.ledger import Ledger
from agent.rundir import RunDir
from agent.rungs import ReplaySettings, RungStats, Times, load, rung_of, stats_of, times

COLUMNS = ("rung", "title", "kind", "n", "time (s)", "speedup", "cumulative", "val loss",
           "loss test", "published", "reference")  # fmt: skip
CPU_NOTE = ("Measured on a CPU: speedups here differ from those on GPUs (kernels, "
            "compilation and communication changes do little or nothing on a CPU), so compare "
            "the shape of the ladder, not the figures.")  # fmt: skip


class ReplayPaths(NamedTuple):
    table: Path  # replay.md
    plot: Path  # replay.png


@dataclass
class Row:
    rung: object | None  # the ladder's Rung; None for the start (the baseline)
    label: str
    state: str  # measured, failed, refused, running, not run
    times: Times | None
    stats: RungStats | None  # None for the start and for rungs not measured
    cumulative: float | None  # measured speedup over the start, along the chain


@dataclass
class Replayed:
    config: SessionConfig
    settings: ReplaySettings
    ladder: object
    rows: list[Row]
    device: str  # e.g. "cuda (NVIDIA H100 80GB HBM3) x 8", "cpu (x86_64)"


def collect_replay(run_dir: Path) -> Replayed:
    _, cfg = stored(run_dir)
    ledger = Ledger(RunDir(run_dir).ledger, create=False)
    settings = ReplaySettings.of(cfg)
    ladder = load(cfg.proposer_arg)
    by_rung = {rung_of(c): c for c in ledger.candidates() if rung_of(c) is not None}
    base = ledger.baseline()
    start = None
    if base is not None:
        start = times(comparable(ledger.results_of(base["id"], roles=["champion"]), asdict(cfg)))
    before = ladder.rungs[settings.first - 1].id if settings.first else None
    label = f"{before} (start)" if before else "0 (start)"
    rows = [Row(None, label, "measured" if start and start.n else "not run", start, None, 1.0)]
    cumulative = 1.0
    for rung in ladder.rungs[settings.first : settings.last + 1]:
        cand = by_rung.get(rung.id)
        if cand is None:
            rows.append(Row(rung, str(rung.id), "not run", None, None, None))
            continue
        st = stats_of(ledger, cfg, cand, rung)
        state = {"accept": "measured", "reject": "failed", "refused": "refused"}.get(
            cand["verdict"], "running"
        )
        cumulative = _times(cumulative, st.speedup.ratio if st.speedup else None)
        rows.append(Row(rung, str(rung.id), state, st.rung, st, cumulative))
    device = _device(ledger, cfg)
    ledger.close()
    return Replayed(cfg, settings, ladder, rows, device)


def _times(product: float | None, factor: float | None) -> float | None:
    return None if product is None or factor is None else product * factor


def _device(ledger: Ledger, cfg: SessionConfig) -> str:
    """Where the runs ran, from their results (what the harness saw), else the config."""
    for cand in ledger.candidates():
        for r in ledger.results_of(cand["id"]):
            if r["status"] == "ok" and r.get("device"):
                name = r.get("gpu_name") or r.get("cpu") or ""
                gpus = f" x {cfg.gpus}" if cfg.gpus > 1 else ""
                return f"{r['device']} ({name}){gpus}" if name else f"{r['device']}{gpus}"
    return cfg.device


def _f(value: float | None, spec: str, none: str = "–") -> str:
    return none if value is None or not math.isfinite(value) else format(value, spec)


def cells(row: Row, ladder) -> list[str]:
    """One row of the table as text."""
    rung, st, t = row.rung, row.stats, row.times
    n = f"{t.n}+{st.pred.n}" if st else (str(t.n) if t else "0")
    time = "–"
    if t and t.n:
        time = f"{t.mean:.2f} ± {t.sd:.2f}" if t.sd is not None else f"{t.mean:.2f}"
        time += f" ({t.missed} short of target)" if t.missed else ""
    speedup = "1 (start)" if rung is None else row.state
    if st and st.speedup:
        sp = st.speedup
        ci = "" if sp.ci_low is None else f" [{sp.ci_low:.3f}, {sp.ci_high:.3f}]"
        speedup = f"×{sp.ratio:.3f}{ci}"
    loss, verdict = "–", "–"
    if st:
        loss = _f(st.loss.mean, ".4f")
        verdict = st.loss.verdict + (f" (p={st.loss.p_value:.2g})"
                                     if st.loss.p_value is not None else "")  # fmt: skip
    published = "–" if rung is None else rung.published or "–"
    if rung is not None and rung.published_speedup is not None:
        published += f" (×{rung.published_speedup:.3f})"
    return [row.label, "start" if rung is None else rung.title, "–" if rung is None else rung.kind,
            n, time, speedup, "–" if row.cumulative is None else f"×{row.cumulative:.3f}", loss,
            verdict, published, ladder.reference if rung is None else rung.reference]  # fmt: skip


def replay_table(run_dir: Path) -> tuple[list[str], list[list[str]]]:
    r = collect_replay(run_dir)
    return list(COLUMNS), [cells(row, r.ladder) for row in r.rows]


def markdown(r: Replayed) -> str:
    cfg, s = r.config, r.settings
    shown = "not set yet" if cfg.target_loss is None else f"{cfg.target_loss:.4f}"
    target = {
        "ladder": f"target val loss {shown}, the leaderboard's",
        "given": f"target val loss {shown}, given on the command line (the leaderboard's: "
        f"{s.ladder_target:.2f})",
        "baseline": f"target val loss {shown}, set by the baseline's replicates: the preset "
        f"{cfg.preset} cannot reach the leaderboard's {s.ladder_target:.2f}",
    }[s.target_from]
    waiver = "; systems rungs are waived" if s.waive_systems else ""
    lines = [
        f"# Replay of {r.ladder.title} ({r.ladder.name})", "",
        f"Device: {r.device}; preset {cfg.preset}; {s.runs} timed runs per rung and per "
        f"predecessor, interleaved, fresh seeds; {target}.", "",
        f"Time is the time to the target (training seconds for a run that fell short of it); "
        f"speedup is the predecessor's geometric-mean time over the rung's, with a 95% Welch "
        f"interval (n = rung + predecessor runs); the loss test is one-sided, mean val loss at "
        f"or under the target at p < {s.p_value}{waiver}"
        + (f"; rules {cfg.rules}." if cfg.rules else "."), "",
    ]  # fmt: skip
    if cfg.device == "cpu":
        lines += [f"**{CPU_NOTE}**", ""]
    lines += [f"Reference: {r.ladder.reference}.", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in r.rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells(row, r.ladder))
                     + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(path: Path, r: Replayed) -> None:
    """Top: time against rung, measured (geometric mean, 95% CI), and where the ladder has a
    published step ratio, the time it predicts from the measured predecessor. Bottom: each
    step's speedup over the rung before, measured (with its CI) and published."""
    # Without pyplot, as report.py: a Figure on the Agg canvas touches no global state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7.5), dpi=110, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    measured = {x: row.times for x, row in enumerate(r.rows) if row.times and row.times.n}
    mids = {x: t.geomean for x, t in measured.items()}
    bands = {x: t.interval() or (mids[x], mids[x]) for x, t in measured.items()}
    _bars(top, mids, bands, "tab:blue", "measured (geometric mean, 95% CI)", "o-")
    steps = {
        x: row.stats.speedup for x, row in enumerate(r.rows) if row.stats and row.stats.speedup
    }
    _bars(bottom, {x: sp.ratio for x, sp in steps.items()},
          {x: (sp.ci_low or sp.ratio, sp.ci_high or sp.ratio) for x, sp in steps.items()},
          "tab:blue", "measured (95% CI)", "o")  # fmt: skip
    published = {x: row.rung.published_speedup for x, row in enumerate(r.rows)
                 if row.rung is not None and row.rung.published_speedup}  # fmt: skip
    style = {"marker": "s", "ls": "none", "color": "tab:orange", "mfc": "none", "ms": 8}
    predicted = {x: mids[x - 1] / ratio for x, ratio in published.items() if x - 1 in mids}
    if predicted:
        top.plot(list(predicted), list(predicted.values()), **style,
                 label="published step, from the measured rung before")  # fmt: skip
    if published:
        bottom.plot(list(published), list(published.values()), **style, label="published")
    bottom.axhline(1.0, color="0.6", lw=1, ls="--")
    bottom.set_xticks(range(len(r.rows)), [row.label for row in r.rows], rotation=30, ha="right")
    bottom.set_xlabel("rung")
    bottom.set_ylabel("speedup over the rung before (×)")
    top.set_ylabel(f"time to target loss {_f(r.config.target_loss, '.4f')} (s)")
    top.set_ylim(bottom=0)
    top.set_title(f"{r.ladder.title}: {r.config.preset} on {r.device}")
    if r.config.device == "cpu":
        top.text(0.99, 0.98, "CPU: speedups differ from GPU ones", transform=top.transAxes,
                 ha="right", va="top", fontsize=8, color="0.4")  # fmt: skip
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    fig.savefig(path)


def _bars(ax, mids: dict, bands: dict, colour: str, label: str, fmt: str) -> None:
    xs = sorted(mids)
    below = [mids[x] - bands[x][0] for x in xs]
    above = [bands[x][1] - mids[x] for x in xs]
    ax.errorbar(xs, [mids[x] for x in xs], yerr=[below, above], fmt=fmt, color=colour,
                capsize=4, label=label)  # fmt: skip


def write_replay(run_dir: Path) -> ReplayPaths:
    """Write replay.md and replay.png in `run_dir` from its ledger and its ladder."""
    r, where = collect_replay(run_dir), RunDir(run_dir)
    paths = ReplayPaths(where.replay_md, where.replay_png)
    paths.table.write_text(markdown(r))
    plot(paths.plot, r)
    return paths
