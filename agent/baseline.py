"""The baseline: the session's first champion, measured before any candidate.

`measure_baseline` records the starting commit as the baseline, runs its replicates (they
measure the benchmark's noise, which the judge needs), and fixes what the objective still
lacks: for loss-at-time the time budget, from one calibration run; for time-to-loss the
target loss, from the replicates (`target_loss`). Then it decides the baseline "accept":
it is the first champion, with speedup 1.

What this module must never do: judge a candidate, or go on when the baseline itself
keeps failing (the session stops, with where to look).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict

from agent.config import SessionStop
from agent.judge import Decision, comparable, first_of_seed, twins
from agent.measure import Measurer


def target_loss(finals: Sequence[float], min_slack: float) -> tuple[float, float]:
    """(target, slack): the worst replicate's final loss plus a slack of two seed-to-seed
    standard deviations (at least `min_slack`), so that every replicate reached it and a
    candidate as good as the baseline rarely misses it. Rounded to the 4 decimals that
    reach train.py through its argv."""
    slack = max(min_slack, 2 * statistics.stdev(finals))
    return round(max(finals) + slack, 4), slack


def measure_twins(measurer: Measurer, baseline: dict, event) -> None:
    """With paired runs each baseline replicate has a twin, a run with its seed right after
    it (`Measurer.twin`); this makes the twins a stop left unmade. Two runs of one code with
    one seed differ only by the clock, so these pairs are the session's first measure of a
    pair's noise, the floor of the paired test (agent/judge.py `pair_noise`); without them
    the first candidates are judged against two fresh-seed runs' spread, several times
    larger. A twin that fails is not retried: the floor is measured on the ones that ran."""
    cfg = measurer.config
    results = comparable(measurer.ledger.results_of(baseline["id"]), asdict(cfg))
    first, again = twins(results)
    done = {r["seed"] for r in again} | {r["seed"] for r in results if r["status"] != "ok"}
    for run in first:
        if run["seed"] not in done:
            event(f"baseline twin of seed {run['seed']} (a pair of the same code: the pairs' "
                  "noise)")
            measurer.benchmark(baseline, "baseline", slot=run.get("slot"), seed=run["seed"])


def measure_baseline(measurer: Measurer, event) -> dict:
    """The baseline, measured and decided; returns its ledger row."""
    ledger, cfg, run_dir = measurer.ledger, measurer.config, measurer.run_dir
    baseline = ledger.baseline()
    if baseline is None:
        bid = ledger.add_candidate("baseline", parent_id=None,
                                   commit_sha=measurer.workspace().champion, proposer="baseline")
        baseline = ledger.candidate(bid)
    if baseline["state"] == "decided":
        return baseline

    def ok() -> list[dict]:  # each seed's first: a paired baseline's twins come after
        results = comparable(ledger.results_of(baseline["id"]), asdict(cfg))
        return first_of_seed(r for r in results if r["status"] == "ok")

    if cfg.objective == "loss-at-time" and cfg.seconds is None:
        event("calibration run of the baseline (sets the time budget)")
        result = measurer.benchmark(baseline, "baseline")
        if result["status"] != "ok":
            raise SessionStop(f"the baseline's calibration run failed: {result['status']}")
        cfg.seconds = round(result["train_seconds"], 1)
        ledger.set_session(asdict(cfg))
        measurer.tracker.update_session(asdict(cfg))
        event(f"time budget {cfg.seconds:g} s per run")
    attempts, paired = 0, cfg.judge_config().paired
    while len(ok()) < cfg.baseline_runs:
        attempts += 1
        if attempts > 2 * cfg.baseline_runs:
            raise SessionStop(f"the baseline failed {attempts - 1} of its runs; see "
                              f"{run_dir.logs}")
        event(f"baseline replicate {len(ok()) + 1}/{cfg.baseline_runs}"
              + (", with its twin" if paired else ""))
        if paired:
            measurer.twin(baseline, "baseline")
        else:
            measurer.benchmark(baseline, "baseline")
    if cfg.objective == "time-to-loss" and cfg.target_loss is None:
        finals = [r["val_loss"] for r in ok()]
        cfg.target_loss, slack = target_loss(finals, cfg.target_slack)
        ledger.set_session(asdict(cfg))
        measurer.tracker.update_session(asdict(cfg))
        # The replicates' crossing times are read off their curves from now on
        # (judge.comparable): they ran without a target.
        event(f"target loss {cfg.target_loss:.4f} (worst baseline replicate "
              f"{max(finals):.4f}, slack {slack:.4f})")
    if paired:  # a replicate left without its twin by a stop
        measure_twins(measurer, baseline, event)
    runs = ok()
    decision = Decision("accept", f"the baseline, measured {len(runs)} times", 1.0, None,
                        None, None, None, 0, len(runs), None)
    ledger.record_decision(baseline["id"], "accept", decision, speedup=1.0)
    measurer.tracker.log_decision(ledger.candidate(baseline["id"]))
    event(f"baseline measured {len(runs)} times; it is the first champion")
    return ledger.candidate(baseline["id"])
