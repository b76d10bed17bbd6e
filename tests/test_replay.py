"""Leaderboard replay: its statistics on simulated replays, the leaderboard's loss test and
rules, the table and plot from a ledger of fake results, and one real replay on cpu-tiny
through the CLI, resumed without re-running anything."""

import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from fakes.repo import git, working_tree_repo

from agent.judge import Decision
from agent.leaderboard import LEADERBOARDS, under_rules
from agent.ledger import Ledger
from agent.proposers.sweep import write_value
from agent.rundir import LEDGER_FILE
from agent.rungs import rung_stats, times
from agent.simulate import fake_run
from agent.stats import LossTest, loss_test, speedup
from bench.leaderboards import surface_fingerprint

RECIPE = "model/recipe.py"
SPEEDRUN = LEADERBOARDS["nanogpt-speedrun"]


def simulated(rng, n: int, log_gain: float, noise_sd: float, loss: float, seed0: int):
    return [fake_run(rng, "time-to-loss", seed0 + i, log_gain, noise_sd, loss, 0.003)
            for i in range(n)]  # fmt: skip


# -- statistics on simulated replays --------------------------------------------------------


@pytest.mark.parametrize("noise_ratio", [1.0, 2.0])
def test_a_known_speedup_is_recovered_and_its_interval_covers_it(noise_ratio):
    """200 replays of one rung that is truly 1.3x faster, 5 runs a side, 3% noise on the
    time (the rung's noisier in the second case): the estimate centres on 1.3 and the 95%
    Welch interval holds it about 95% of the time."""
    rng = np.random.default_rng(0)
    ratios, covered = [], 0
    for _ in range(200):
        pred = simulated(rng, 5, 0.0, 0.03, 3.27, 0)
        rung = simulated(rng, 5, math.log(1.3), 0.03 * noise_ratio, 3.27, 100)
        sp = speedup(times(pred).values, times(rung).values)
        ratios.append(sp.ratio)
        covered += sp.ci_low <= 1.3 <= sp.ci_high
    print(f"\nnoise x{noise_ratio}: median x{np.median(ratios):.4f}, coverage {covered / 200:.1%}")
    assert np.median(ratios) == pytest.approx(1.3, rel=0.01)
    assert 0.90 <= covered / 200 <= 0.99


def test_no_speedup_is_called_significant_about_5_percent_of_the_time():
    rng = np.random.default_rng(1)
    p = [speedup(times(simulated(rng, 4, 0.0, 0.03, 3.27, 0)).values,
                 times(simulated(rng, 4, 0.0, 0.03, 3.27, 100)).values).p_value
         for _ in range(400)]  # fmt: skip
    assert 0.02 <= np.mean(np.array(p) < 0.05) <= 0.09


def test_the_loss_test_passes_fails_and_waives():
    rng = np.random.default_rng(2)
    under = [3.270 + 0.002 * rng.standard_normal() for _ in range(5)]
    at = [3.280 + 0.002 * rng.standard_normal() for _ in range(5)]
    passed = loss_test(under, 3.28, 0.01)
    assert passed.verdict == "pass" and passed.p_value < 0.01 and passed.n == 5
    failed = loss_test(at, 3.28, 0.01)
    assert failed.verdict == "fail" and failed.p_value >= 0.01
    assert loss_test(at, 3.28, 0.01, waived=True) == LossTest("waived", None, np.mean(at), 5)
    assert loss_test([3.0, 3.0], 3.28, 0.01).verdict == "pass"  # no spread, clearly under
    assert loss_test([3.28, 3.28], 3.28, 0.01).verdict == "fail"  # no spread, at the target
    # On simulated replays the test passes a rung 0.01 nats under the target almost always
    # and one at the target about p_value of the time.
    passes = [loss_test(3.27 + 0.004 * rng.standard_normal(6), 3.28, 0.01).verdict == "pass"
              for _ in range(300)]  # fmt: skip
    false = [loss_test(3.28 + 0.004 * rng.standard_normal(6), 3.28, 0.01).verdict == "pass"
             for _ in range(1000)]  # fmt: skip
    assert np.mean(passes) > 0.9 and np.mean(false) <= 0.025


def test_one_run_a_side_gives_a_ratio_but_no_interval_and_no_loss_verdict():
    rng = np.random.default_rng(3)
    st = rung_stats(simulated(rng, 1, 0.0, 0.03, 3.27, 0),
                    simulated(rng, 1, 0.2, 0.03, 3.27, 1), 3.28, 0.01)  # fmt: skip
    assert st.speedup.ratio > 1.0 and st.speedup.ci_low is None and st.speedup.p_value is None
    assert st.loss.verdict == "n/a" and st.loss.p_value is None and st.rung.sd is None
    assert st.rung.interval() is None
    assert speedup(times([]).values, st.rung.values) is None


def test_a_run_short_of_the_target_counts_its_training_time_and_failures_count_none():
    runs = [{"status": "ok", "time_to_target": 10.0, "train_seconds": 12.0, "val_loss": 3.2},
            {"status": "ok", "time_to_target": None, "train_seconds": 15.0, "val_loss": 3.4},
            {"status": "crash", "seed": 9}]  # fmt: skip
    t = times(runs)
    assert t.values == (10.0, 15.0) and t.missed == 1 and t.failed == 1
    assert t.geomean == pytest.approx(math.sqrt(150.0))


def decision(verdict="accept") -> Decision:
    return Decision(verdict, "speed ratio 1.2", 1.2, 1.1, 1.3, 0.001, 0.01, 5, 3, 0.0)


def test_under_rules_an_accept_also_needs_the_loss_at_the_target():
    good = [{"status": "ok", "val_loss": v} for v in (3.270, 3.272, 3.271)]
    bad = [{"status": "ok", "val_loss": v} for v in (3.279, 3.281, 3.283)]
    kept = under_rules(decision(), good, SPEEDRUN, 3.28)
    assert kept.verdict == "accept" and "p=" in kept.reason
    more = under_rules(decision(), bad, SPEEDRUN, 3.28, max_runs=8)
    assert more.verdict == "more" and "not shown at or under 3.2800" in more.reason
    assert under_rules(decision(), bad, SPEEDRUN, 3.28, max_runs=3).verdict == "reject"
    waived = under_rules(decision(), bad, SPEEDRUN, 3.28, systems=True)
    assert waived.verdict == "accept" and "waived" in waived.reason
    assert under_rules(decision("reject"), good, SPEEDRUN, 3.28).verdict == "reject"


# -- ladders on disk ------------------------------------------------------------------------


def knob_patch(repo: Path, **values: float) -> str:
    """A `git diff` of the recipe with some knobs changed, made in `repo` and undone."""
    for name, value in values.items():
        write_value(repo / RECIPE, name, value)
    diff = git(repo, "diff")
    git(repo, "checkout", "--", RECIPE)
    return diff


def make_ladder(root: Path, repo: Path, rungs: list[tuple[str, dict]], name="tiny") -> Path:
    """A ladder directory: manifest.toml and one patch per rung, each applying on the
    previous one (rung k's patch is made with rungs 1..k-1 applied)."""
    root.mkdir(parents=True)
    entries = []
    for i, (kind, values) in enumerate(rungs, 1):
        (root / f"{i:02d}.patch").write_text(knob_patch(repo, **values))
        git(repo, "apply", str(root / f"{i:02d}.patch"))
        git(repo, "commit", "-qam", f"rung {i}")
        entries.append(f'[[rung]]\nid = "r{i}"\ntitle = "knobs {i}"\npatch = "{i:02d}.patch"\n'
                       f'kind = "{kind}"\nreference = "https://example.org/r{i}"\n'
                       f'published = "record {i}"\npublished_speedup = 1.{i}\n')  # fmt: skip
    git(repo, "reset", "-q", "--hard", f"HEAD~{len(rungs)}")
    (root / "manifest.toml").write_text(
        f'name = "{name}"\ntitle = "A tiny ladder"\nreference = "the start"\n'
        f'target_loss = 3.28\np_value = 0.01\nbase_surface = "{surface_fingerprint(repo)}"\n\n'
        + "\n".join(entries)
    )
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return working_tree_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def ladder_dir(repo, tmp_path_factory) -> Path:
    rungs = [("ml", {"embed_lr": 0.25}), ("systems", {"head_lr": 0.01})]
    return make_ladder(tmp_path_factory.mktemp("ladders") / "tiny", repo, rungs)


def test_the_ladder_loads_and_the_settings_follow_the_preset(ladder_dir, repo):
    from agent.replay import load, replay_config, select

    ladder = load(ladder_dir)
    assert [r.id for r in ladder.rungs] == ["r1", "r2"]
    assert select(ladder, "2:2") == (1, 1) and select(ladder, ":1") == (0, 0)
    assert select(ladder, None) == (0, 1) and select(ladder, "2:") == (1, 1)
    with pytest.raises(Exception, match="rungs 1 to 2"):
        select(ladder, "1:3")
    # gpt2-124m reaches the leaderboard's target: no baseline replicates needed to set one.
    big = replay_config(ladder, "gpt2-124m", 3, rules="nanogpt-speedrun", gpus=8, repo=str(repo))
    assert big.target_loss == 3.28 and big.baseline_runs == 0 and big.gpus == 8
    assert big.proposer_options["waive_systems"] and big.proposer_options["p_value"] == 0.01
    small = replay_config(ladder, "cpu-tiny", 2, repo=str(repo))
    assert small.target_loss is None and small.baseline_runs == 2
    assert small.proposer_options["target_from"] == "baseline"
    assert not small.proposer_options["waive_systems"]  # only the rules waive
    given = replay_config(ladder, "cpu-tiny", 2, target_loss=7.5)
    assert given.target_loss == 7.5 and given.baseline_runs == 0
    assert given.proposer_options["target_from"] == "given"


def result(seed: int, seconds: float, loss: float, target: float) -> dict:
    curve = [{"tokens": 1000 * i, "seconds": seconds * i / 4, "val_loss": loss + 0.3 * (4 - i),
              "val_bpb": 1.5} for i in range(1, 5)]  # fmt: skip
    return {"status": "ok", "seed": seed, "device": "cpu", "gpu_name": None, "cpu": "x86_64",
            "time_to_target": seconds, "train_seconds": seconds, "val_loss": loss,
            "target_loss": target, "tokens_per_sec": 1e4, "curve": curve}  # fmt: skip


def test_the_table_and_plot_are_written_from_a_ledger_of_fake_results(ladder_dir, tmp_path):
    from agent.replay import load, replay_config
    from agent.replay_report import replay_table, write_replay

    config = replay_config(load(ladder_dir), "cpu-tiny", 2, rules="nanogpt-speedrun")
    config.target_loss = 4.0  # as the baseline's replicates would have set it
    ledger = Ledger(tmp_path / LEDGER_FILE)
    ledger.set_session(asdict(config))
    seed = iter(range(1, 100))

    def runs(cid, role, seconds, loss=3.9):
        for s in seconds:
            rid = ledger.start_run(cid, role, next(seed))
            ledger.finish_run(rid, "ok", result(s, s, loss, 4.0), None, s + 2)

    base = ledger.add_candidate("baseline", parent_id=None, commit_sha="a" * 40)
    ledger.record_decision(base, "accept", {"reason": "baseline"}, speedup=1.0)
    r1 = ledger.add_candidate("rung r1: knobs 1", parent_id=base, commit_sha="b" * 40)
    runs(base, "champion", [10.0, 10.4])
    runs(r1, "screen", [8.0])
    runs(r1, "confirm", [8.2])
    ledger.record_decision(r1, "accept", {"reason": "replayed"}, speedup=1.25)
    r2 = ledger.add_candidate("rung r2: knobs 2", parent_id=r1, commit_sha="c" * 40)
    runs(r1, "champion", [8.1, 7.9])
    runs(r2, "screen", [8.0, 8.1], loss=4.1)  # at a loss above the target: waived (systems)
    ledger.close()

    paths = write_replay(tmp_path)
    text = paths.table.read_text()
    assert "# Replay of A tiny ladder (tiny)" in text and "Device: cpu (x86_64)" in text
    assert "set by the baseline's replicates: the preset cpu-tiny cannot reach" in text
    assert "speedups here differ from those on GPUs" in text and "rules nanogpt-speedrun" in text
    columns, rows = replay_table(tmp_path)
    table = {row[0]: dict(zip(columns, row)) for row in rows}
    assert table["0 (start)"]["time (s)"].startswith("10.20 ± 0.28")
    r1_row, r2_row = table["r1"], table["r2"]
    assert r1_row["n"] == "2+2" and r1_row["speedup"].startswith("×1.259 [")
    assert r1_row["loss test"].startswith("pass (p=") and r1_row["kind"] == "ml"
    assert r1_row["published"] == "record 1 (×1.100)"
    assert r1_row["reference"] == "https://example.org/r1"
    assert r2_row["loss test"] == "waived" and r2_row["cumulative"].startswith("×1.2")
    assert paths.plot.stat().st_size > 10_000 and paths.plot.read_bytes()[:4] == b"\x89PNG"


# -- a real replay --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(data_cache, tmp_path_factory) -> dict:
    return {**os.environ, "SPEEDLOOP_DATA": str(data_cache),
            "SPEEDLOOP_LOCKS": str(tmp_path_factory.mktemp("locks")),
            "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}  # fmt: skip


def agent(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.mark.slow
def test_a_real_replay_on_cpu_tiny_writes_its_table_and_resumes_without_rerunning(
    repo, ladder_dir, env, tmp_path
):
    run_dir = tmp_path / "replay"
    # A given target spares the baseline's replicates that would set one: two runs in all.
    args = ["replay", str(ladder_dir), "--preset", "cpu-tiny", "--runs", "1", "--rungs", "1:1",
            "--budget-tokens", "8192", "--target-loss", "7.6",
            "--run-dir", str(run_dir)]  # fmt: skip
    proc = agent(repo, env, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ledger = Ledger(run_dir / LEDGER_FILE)
    base, rung = ledger.candidates()
    assert rung["description"] == "rung r1: knobs 1" and rung["parent_id"] == base["id"]
    assert rung["verdict"] == "accept" and "+    embed_lr: float = 0.25" in rung["diff"]
    roles = [(r["candidate_id"], r["role"]) for c in (base, rung) for r in ledger.runs_of(c["id"])]
    # The step: the predecessor once, then the rung once.
    assert roles == [(base["id"], "champion"), (rung["id"], "screen")]
    assert all(r["outcome"] == "ok" for c in (base, rung) for r in ledger.runs_of(c["id"]))
    text = (run_dir / "replay.md").read_text()
    assert "| r1 | knobs 1 | ml | 1+1 |" in text and "n/a" in text
    assert "target val loss 7.6000, given on the command line" in text
    assert "speedups here differ from those on GPUs" in text
    assert (run_dir / "replay.png").stat().st_size > 0 and (run_dir / "report.md").exists()
    n_runs = len(roles)
    ledger.close()

    status = agent(repo, env, "status", str(run_dir))
    assert status.returncode == 0 and "rung r1" in status.stdout
    resumed = agent(repo, env, "replay", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "every selected rung of tiny was measured" in resumed.stdout
    with Ledger(run_dir / LEDGER_FILE) as again:
        assert sum(len(again.runs_of(c["id"])) for c in again.candidates()) == n_runs


def test_agent_run_takes_the_rules_and_the_gpus(tmp_path, capsys):
    from agent.cli import build_parser, main, session_config
    from agent.recording import with_rules

    def config(*flags):
        return session_config(build_parser().parse_args(["run", *flags]), tmp_path)

    big = config("--preset", "gpt2-124m", "--rules", "nanogpt-speedrun", "--gpus", "8")
    assert big.rules == "nanogpt-speedrun" and big.gpus == 8 and big.target_loss == 3.28
    small = config("--rules", "nanogpt-speedrun")
    assert small.target_loss is None and small.gpus == 1  # cpu-tiny: the baseline sets it
    assert main(["run", "--gpus", "0", "--run-dir", str(tmp_path / "x")]) == 2
    assert "--gpus 0" in capsys.readouterr().err

    # The session applies the rules after the judge: the loss test at the session's target.
    small.target_loss = 3.28
    over = [{"status": "ok", "val_loss": v} for v in (3.279, 3.281, 3.283)]
    assert with_rules(small, decision(), over, {"category": "optimizer"}).verdict == "more"
    assert with_rules(small, decision(), over, {"category": "systems"}).verdict == "accept"
