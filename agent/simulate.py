"""The judge in simulation: its false-accept rate, power and runs per decision, measured by
running the whole sequential procedure (`agent.judge.assess`) on synthetic runs, with one
slot or several (device offsets, and offsets that drift). The tests hold the figures to
their bounds; `python -m agent.simulate` prints them (bench/RESULTS.md keeps them).

What this module must never do: tune the judge to its own figures (the levels are
calibrated in agent/judge.py, on their own fixed simulations), or stand in for a real run.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from agent.config import SessionConfig
from agent.judge import (
    JudgeConfig,
    PairNoise,
    assess,
    comparable,
    fresh_seed_floor,
    pair_noise,
    twins,
)
from agent.ledger import Ledger
from agent.rundir import RunDir
from agent.stats import OBJECTIVES


@dataclass(frozen=True)
class SimulationResult:
    accept_rate: float  # fraction of trials that ended in "accept"
    mean_runs: float  # candidate runs per decision, screen included
    screened_out: float  # fraction rejected after the screening run alone
    trials: int


def fake_run(rng: np.random.Generator, objective: str, seed: int, log_gain: float,
             noise_sd: float, loss: float, loss_sd: float,
             shared: tuple[float, float] | None = None, correlation: float = 0.0) -> dict:
    """A synthetic result dict: the primary metric is its true value times exp(noise), with
    the speed gain `log_gain` (> 0 is better) applied in the objective's direction. With
    `shared` (standard normal draws of its seed, for metric and loss) a part `correlation`
    of each noise's variance is the seed's: the two runs of a pair share it."""
    z_metric, z_loss = rng.standard_normal(), rng.standard_normal()
    if shared is not None:
        own = math.sqrt(1.0 - correlation)
        z_metric = math.sqrt(correlation) * shared[0] + own * z_metric
        z_loss = math.sqrt(correlation) * shared[1] + own * z_loss
    drift = math.exp(noise_sd * z_metric)
    run = {"status": "ok", "seed": seed, "tokens_per_sec": 1.0e5, "train_seconds": 300.0,
           "time_to_target": None, "val_loss": loss + loss_sd * z_loss}
    if objective == "time-to-loss":
        run["time_to_target"] = run["train_seconds"] = 300.0 * math.exp(-log_gain) * drift
    elif objective == "throughput":
        run["tokens_per_sec"] = 1.0e5 * math.exp(log_gain) * drift
    else:  # loss-at-time: the loss itself is the primary metric
        run["val_loss"] = loss * math.exp(-log_gain) * drift
    return run


def rescaled(run: dict, objective: str, log_speed: float) -> dict:
    """`run` on a device faster by `log_speed` (log scale): its primary metric moves as a
    speed gain would; where the loss is not that metric it stays."""
    field, sign = OBJECTIVES[objective]
    if run.get(field) is None:
        return run
    out = {**run, field: run[field] * math.exp(sign * log_speed)}
    if objective == "time-to-loss":
        out["train_seconds"] = out[field]
    return out


def simulate(effect_sigmas: float = 0.0, loss_shift: float = 0.0, *, trials: int = 2000,
             config: JudgeConfig | None = None, n_champion: int = 5, noise_sd: float = 0.03,
             noise_ratio: float = 1.0, loss_sd: float = 0.002, seed: int = 0,
             slots: int = 1, slot_offset: float = 0.0, drift: float = 0.0,
             remeasure_every: int = 0, candidate_slots: int | None = None,
             label_slots: bool = True, correlation: float = 0.0,
             slow_champion: float = 1.0, pair_history: int = 0) -> SimulationResult:
    """Run the whole sequential procedure `trials` times on synthetic runs.

    The candidate's true log gain is `effect_sigmas * noise_sd`, its noise is `noise_ratio`
    times the champion's, and its true val loss is the champion's plus `loss_shift` nats.
    Each trial draws a fresh champion sample of `n_champion` replicates, so the noise
    estimate is as uncertain as in a session.

    With `slots` > 1 each trial also draws the devices: a log speed offset per slot (sd
    `slot_offset`), each walking randomly by `drift` (sd) per run's duration. The champion's
    runs go round the slots (so `n_champion` >= `slots`), one every `remeasure_every` run
    durations up to the candidate's start (0: all just before it); the candidate's runs
    follow one per run duration, each on a random slot, or on a random one of the first
    `candidate_slots` only (the others busy with other candidates: its runs cluster).
    `label_slots=False` hides the slots from the judge: today's judge, blind to devices.

    With a paired judge (`config.paired`) each candidate run comes with a champion run of
    its seed, the two sharing a part `correlation` of their noise (the seed's data order and
    initialisation; the minute's load); the champion's first sample still measures the
    noise the screen needs. `slow_champion` > 1 slows one champion run the judge compares
    by that factor (a neighbour's burst on a shared machine): the first of the
    sample, or with pairs the partner of the candidate's first confirmation run.
    `pair_history` > 0 gives the paired judge the session's pair noise (its floor) as
    measured on that many degrees of freedom of other candidates' pairs like the champion's;
    0: none yet, the judge falls back on two fresh-seed runs' noise.
    """
    if slots > 1 and n_champion < slots:
        raise ValueError(f"n_champion={n_champion} < slots={slots}: the champion needs a run "
                         "on every slot")
    cfg = config or JudgeConfig()
    rng = np.random.default_rng(seed)
    accepted = runs = screened = 0
    champion_at = [-(n_champion - i) * remeasure_every for i in range(n_champion)]
    start = min(champion_at, default=0) - 1
    offset = np.zeros((cfg.max_replicates - start, slots))  # (time - start, slot)

    def on_slot(run: dict, slot: int, time: int) -> dict:
        """`run` measured on `slot` at `time` (run durations from the candidate's start)."""
        if slots == 1:
            return run
        run = rescaled(run, cfg.objective, offset[time - start, slot])
        return {**run, "slot": str(slot)} if label_slots else run

    for _ in range(trials):
        if slots > 1:  # one slot draws nothing more, so its trials are today's exactly
            steps = drift * rng.standard_normal(offset.shape)
            offset[:] = slot_offset * rng.standard_normal(slots) + np.cumsum(steps, axis=0)
        champion = [on_slot(fake_run(rng, cfg.objective, s, 0.0, noise_sd, 3.3, loss_sd),
                            s % slots, champion_at[s]) for s in range(n_champion)]
        if slow_champion != 1.0 and not cfg.paired:
            champion[0] = rescaled(champion[0], cfg.objective, -math.log(slow_champion))
        pairs = None
        if cfg.paired and pair_history:
            pair_sd = noise_sd * math.sqrt(2.0 * (1.0 - correlation))
            pairs = PairNoise(pair_sd * math.sqrt(rng.chisquare(pair_history) / pair_history),
                              pair_history)
        candidate: list[dict] = []
        while True:
            seed = 1000 + len(candidate)
            shared = tuple(rng.standard_normal(2)) if cfg.paired else None
            run = fake_run(rng, cfg.objective, seed, effect_sigmas * noise_sd,
                           noise_ratio * noise_sd, 3.3 + loss_shift, loss_sd, shared, correlation)
            slot = int(rng.integers(candidate_slots or slots)) if slots > 1 else 0
            candidate.append(on_slot(run, slot, len(candidate)))
            if cfg.paired:
                mate = fake_run(rng, cfg.objective, seed, 0.0, noise_sd, 3.3, loss_sd, shared,
                                correlation)
                if slow_champion != 1.0 and len(candidate) == 2:
                    mate = rescaled(mate, cfg.objective, -math.log(slow_champion))
                champion.append(on_slot(mate, slot, len(candidate) - 1))
            decision = assess(champion, candidate, cfg, pairs)
            if decision.verdict != "more":
                break
        accepted += decision.verdict == "accept"
        screened += decision.verdict == "reject" and len(candidate) == 1
        runs += len(candidate)
    return SimulationResult(accepted / trials, runs / trials, screened / trials, trials)


@dataclass(frozen=True)
class Pair:
    at: float  # when its first run started (the ledger's clock)
    candidate: int  # the candidate it was made for
    champion: dict  # the two results, with one seed
    mine: dict


def session_pairs(run_dir: Path) -> tuple[JudgeConfig, list[dict], list[Pair]]:
    """A paired session's judge settings, its baseline's fresh-seed runs (each seed's first,
    read as the judge reads them) and its pairs in time order, from its ledger."""
    with Ledger(RunDir(run_dir).ledger, create=False) as ledger:
        session, baseline = ledger.session(), ledger.baseline()
        if session is None or baseline is None:
            raise ValueError(f"{run_dir}: the ledger has no session or no baseline: not the "
                             "run dir of a session that measured its baseline")
        config = SessionConfig.from_dict(session["config"])

        def results(cid: int, roles=None) -> list[dict]:  # as the judge sees them
            return comparable(ledger.results_of(cid, roles), asdict(config))

        found = []
        for c in ledger.candidates():
            if c["parent_id"] is None:
                continue
            started = {r["seed"]: r["started_at"] for r in ledger.runs_of(c["parent_id"])}
            started.update((r["seed"], min(r["started_at"], started.get(r["seed"], math.inf)))
                           for r in ledger.runs_of(c["id"]))
            mates = {r["seed"]: r for r in results(c["parent_id"]) if r["status"] == "ok"}
            for r in results(c["id"]):
                mate = mates.get(r["seed"])
                if r["status"] == "ok" and mate is not None:
                    found.append(Pair(started[r["seed"]], c["id"], mate, r))
        # The baseline's replicates, and its twins: pairs of the same code.
        own = results(baseline["id"], ["baseline"])
        fresh, again = twins(own)
        started = {}
        for r in ledger.runs_of(baseline["id"]):
            started[r["seed"]] = min(r["started_at"], started.get(r["seed"], math.inf))
        mates = {r["seed"]: r for r in fresh}
        found += [Pair(started[r["seed"]], baseline["id"], mates[r["seed"]], r) for r in again]
        return (replace(config.judge_config(), paired=True), fresh,
                sorted(found, key=lambda p: p.at))


def replay(config: JudgeConfig, baseline: Sequence[dict], pairs: Sequence[Pair],
           gain: float = 0.0, *, floor: bool = True) -> SimulationResult:
    """The paired judge (`config`) on a real session's pairs, in the order they ran: from
    each pair a pseudo-candidate whose runs are that pair and the ones after it (as many as
    the judge asks for), both ways round (in an A/A session either side may be called the
    candidate), the candidate's metric better by the log gain `gain`. So the judge meets
    the real noise of those runs (its tails, its changes with the minute) instead of a
    normal one. Only pairs with a whole decision's worth after them start one, so every
    pseudo-candidate is decided. The floor is the pair noise of the session's candidates
    measured on the pairs before the first (failing those, the baseline's spread);
    `floor=False` judges with the plain t."""
    accepted = runs = screened = trials = 0
    for i in range(len(pairs) - config.max_replicates + 1):
        history = None
        if floor:
            by_candidate: dict[int, list[Pair]] = {}
            for p in pairs[:i]:
                by_candidate.setdefault(p.candidate, []).append(p)
            history = pair_noise([([p.champion for p in ps], [p.mine for p in ps])
                                  for ps in by_candidate.values()], config.objective)
        history = history or fresh_seed_floor(baseline, config.objective)
        if not floor:
            history = replace(history, df=0)
        for swap in (False, True):
            champion, candidate = list(baseline), []
            for k, p in enumerate(pairs[i:i + config.max_replicates]):
                a, b = (p.mine, p.champion) if swap else (p.champion, p.mine)
                seed = 10**6 + k
                champion.append({**a, "seed": seed})
                candidate.append({**rescaled(b, config.objective, gain), "seed": seed})
                decision = assess(champion, candidate, config, history)
                if decision.verdict != "more":
                    break
            trials += 1
            accepted += decision.verdict == "accept"
            screened += decision.verdict == "reject" and len(candidate) == 1
            runs += len(candidate)
    if trials == 0:
        raise ValueError(f"{len(pairs)} pairs: a replay needs more pairs than one decision's "
                         f"maximum ({config.max_replicates})")
    return SimulationResult(accepted / trials, runs / trials, screened / trials, trials)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="The judge of speedloop in simulation: false-accept rate, power and runs "
        "per decision")
    parser.add_argument("--trials", type=int, default=2000, help="simulated candidates each")
    parser.add_argument("--objective", default="time-to-loss", choices=list(OBJECTIVES),
                        help="objective to simulate")
    parser.add_argument("--slots", type=int, default=1,
                        help="device slots the runs spread over (the champion round them)")
    parser.add_argument("--slot-offset", type=float, default=0.03,
                        help="sd of the slots' log speed offsets, drawn once per trial")
    parser.add_argument("--drift", type=float, default=0.0,
                        help="sd of each slot offset's random-walk step per run duration")
    parser.add_argument("--remeasure-every", type=int, default=0,
                        help="run durations between the champion's runs (0: all at the start)")
    parser.add_argument("--champion", type=int, default=None,
                        help="champion runs (default 5 on one slot, else one per slot)")
    parser.add_argument("--paired", type=float, default=None, metavar="RHO",
                        help="the paired judge, each pair sharing this part of its noise")
    parser.add_argument("--pair-history", type=int, default=20, metavar="DF",
                        help="with --paired: degrees of freedom of the session's pair noise "
                        "the judge floors a candidate's spread with (0: none yet)")
    parser.add_argument("--replay", type=Path, default=None, metavar="RUN_DIR",
                        help="instead: the paired judge on the real pairs of a paired A/A "
                        "session's run dir, with and without the floor, at a few gains")
    args = parser.parse_args(argv)
    if args.replay is not None:
        cfg, baseline, pairs = session_pairs(args.replay)
        print(f"{len(pairs)} pairs of {args.replay}, each with a decision's worth after it "
              f"the start of a pseudo-candidate, both ways round; the session's {cfg}")
        for gain in (0.0, 0.02, 0.03, 0.05, 0.08):
            line = f"gain {gain:4.0%}:"
            for floor in (True, False):
                r = replay(cfg, baseline, pairs, gain, floor=floor)
                line += (f"   {'floored' if floor else 'plain t'}: accept {r.accept_rate:6.1%} "
                         f"of {r.trials}, {r.mean_runs:4.2f} pairs per decision")
            print(line)
        return
    cfg = JudgeConfig(objective=args.objective, paired=args.paired is not None)
    n_champion = args.champion or (5 if args.slots == 1 else args.slots)
    devices = {} if args.slots == 1 else {
        "slots": args.slots, "slot_offset": args.slot_offset, "drift": args.drift,
        "remeasure_every": args.remeasure_every}
    print(f"{args.trials} trials per line, champion of {n_champion} replicates unless said, "
          f"{devices or 'one slot'}, {cfg}")
    scenarios = {
        "A/A (false accept)": {},
        "gain 2 x noise (power)": {"effect_sigmas": 2.0},
        "gain 3 x noise, loss at margin": {"effect_sigmas": 3.0, "loss_shift": cfg.loss_margin},
        "gain 3 x noise, loss 2 x margin": {"effect_sigmas": 3.0,
                                            "loss_shift": 2 * cfg.loss_margin},
        "A/A, champion of 30": {"n_champion": 30},
        "A/A, candidate twice as noisy": {"noise_ratio": 2.0},
        "A/A, one champion run 1.3x slow": {"slow_champion": 1.3},
    }
    if cfg.paired:
        scenarios = {label: {**kwargs, "correlation": args.paired,
                             "pair_history": args.pair_history}
                     for label, kwargs in scenarios.items()}
    if devices:
        scenarios.update({
            "A/A, candidate on 2 slots only": {"candidate_slots": 2},
            "Welch blind to slots: A/A": {"label_slots": False},
            "Welch blind to slots: gain 2 x noise": {"effect_sigmas": 2.0, "label_slots": False},
            "Welch blind, candidate on 2 slots": {"candidate_slots": 2, "label_slots": False},
        })
    for label, kwargs in scenarios.items():
        kwargs = {"n_champion": n_champion, **devices, **kwargs}
        r = simulate(trials=args.trials, config=cfg, **kwargs)
        print(f"{label:38s} accept {r.accept_rate:6.1%}  runs/decision {r.mean_runs:4.2f}  "
              f"screened out {r.screened_out:6.1%}")


if __name__ == "__main__":
    main()
