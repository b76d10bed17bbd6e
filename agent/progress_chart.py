"""progress.png: each experiment's speedup against the baseline, with its 95% interval as
whiskers, over the baseline's noise band, and the champion's speedup as a step.

`chart_data` reads what is drawn from a report snapshot (agent/report.py `collect`, whose
`write_report` calls `plot`), so a test can check the numbers; `plot` draws them with
matplotlib's Agg canvas.

What this module must never do: write to the ledger, or show a number it did not get from
the snapshot.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

from agent.judge import measure_noise
from agent.stats import OBJECTIVES

STYLES = {  # a candidate's class (agent/report.py CLASSES) -> (colour, marker)
    "accepted": ("tab:green", "o"),
    "rejected": ("tab:gray", "o"),
    "failed": ("tab:red", "X"),
    "refused": ("tab:purple", "X"),
    "held": ("tab:orange", "D"),
}

BAND_SDS = 2.0  # the noise band: the baseline's run-to-run noise, +/- this many sds


@dataclass
class Point:
    experiment: int
    kind: str  # a STYLES key
    ratio: float | None  # speedup vs the baseline; None: no speed measured
    ci_low: float | None
    ci_high: float | None
    description: str


@dataclass
class ChartData:
    points: list[Point]
    band: tuple[float, float] | None  # the baseline's noise around x1, or None unmeasured
    best: dict[int, float]  # experiment -> the champion's recorded speedup from there on


def chart_data(s) -> ChartData:
    """What `plot` draws, from a report Snapshot `s`."""
    points = [Point(e.candidate["experiment"], e.kind,
                    e.speedup.ratio if e.speedup else None,
                    e.speedup.ci_low if e.speedup else None,
                    e.speedup.ci_high if e.speedup else None, e.candidate["description"])
              for e in s.rows if e.kind != "pending"]
    ok = [r for r in (s.base.results if s.base else []) if r["status"] == "ok"]
    try:
        sd = measure_noise(ok, s.objective).log_metric_sd
        band = (math.exp(-BAND_SDS * sd), math.exp(BAND_SDS * sd)) if math.isfinite(sd) \
            else None
    except ValueError:  # fewer than two ok baseline runs: no noise measured
        band = None
    best = {s.candidate(row["candidate_id"])["experiment"] or 0: row["speedup"]
            for row in s.champions}
    return ChartData(points, band, best)


def plot(path: Path, s):
    """Draw progress.png at `path` from a report Snapshot `s`; returns the Figure."""
    # Lazily, and without pyplot: `status` needs no matplotlib, and a Figure with the Agg
    # canvas touches no global backend state of the process that imports us.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    data = chart_data(s)
    fig = Figure(figsize=(11, 6), dpi=110, layout="constrained")
    # Top: measured speedups. Bottom strip: experiments that measured no speed.
    ax, strip = fig.subplots(2, 1, sharex=True, height_ratios=[8, 1])
    ax.axhline(1.0, color="0.75", lw=1, ls="--", zorder=0)
    if data.band is not None:
        ax.axhspan(*data.band, color="0.85", alpha=0.6, zorder=0, lw=0,
                   label=f"baseline noise (±{BAND_SDS:g} sd)")
    if s.base is not None:
        ax.scatter([0], [1.0], c="black", marker="D", s=40, zorder=3, label="baseline")
    for kind, (colour, marker) in STYLES.items():
        mine = [p for p in data.points if p.kind == kind]
        measured = [p for p in mine if p.ratio is not None]
        style = {"c": colour, "marker": marker, "s": 40, "zorder": 3}
        ax.scatter([p.experiment for p in measured], [p.ratio for p in measured],
                   label=f"{kind} ({len(mine)})", **style)
        whiskers = [p for p in measured if p.ci_low is not None]
        if whiskers:
            ax.errorbar([p.experiment for p in whiskers], [p.ratio for p in whiskers],
                        yerr=[[p.ratio - p.ci_low for p in whiskers],
                              [p.ci_high - p.ratio for p in whiskers]],
                        fmt="none", ecolor=colour, elinewidth=1, capsize=3, zorder=2)
        unmeasured = [p.experiment for p in mine if p.ratio is None]
        strip.scatter(unmeasured, [0] * len(unmeasured), **style)
    last_x = max((p.experiment for p in data.points), default=0)
    if data.best:  # best so far: a step per acceptance, as the ledger recorded it
        xs = sorted(data.best)
        ax.step([*xs, max(last_x, xs[-1])], [*(data.best[x] for x in xs), data.best[xs[-1]]],
                where="post", color="tab:green", lw=2, alpha=0.6, label="best so far",
                zorder=2)
    kept = [p for p in data.points if p.kind == "accepted" and p.ratio is not None]
    for k, p in enumerate(kept):  # labels alternate above and below, point inwards at the end
        right = p.experiment > 0.6 * last_x
        label = textwrap.shorten(p.description, 36, placeholder="…")
        ax.annotate(label, (p.experiment, p.ratio),
                    xytext=(-6 if right else 6, 8 if k % 2 == 0 else -14),
                    textcoords="offset points", ha="right" if right else "left", fontsize=8,
                    color="darkgreen", in_layout=False,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                          "alpha": 0.7})
    ax.margins(y=0.15)
    ax.set_ylabel(f"speedup vs baseline (×, from {OBJECTIVES[s.objective][0]}; 95% CI)")
    ax.set_title(f"speedloop {s.session['id']}: {s.session['config'].get('preset', '')} "
                 f"{s.objective}, {len(data.points)} experiments")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    strip.set_xlim(-0.5, max(last_x, 1) + 0.5)
    strip.xaxis.set_major_locator(MaxNLocator(integer=True))
    strip.set_yticks([0], ["no speed\nmeasured"], fontsize=8)
    strip.set_ylim(-1, 1)
    strip.grid(axis="x", alpha=0.3)
    strip.set_xlabel("experiment")
    fig.savefig(path)
    return fig
