"""Acceptance checks (agent/acceptance.py): the holdout-gap and untimed-overhead tests on
honest noise and on cheats, the check names the ledger records, and a candidate held for
a human then accepted by `agent review`, through the real engine on cpu-tiny."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fakes.repo import git, working_tree_repo

from agent import acceptance
from agent.acceptance import AcceptanceConfig, gap_test, overhead_test
from agent.judge import Decision
from agent.proposers import Proposal

RECIPE = "model/recipe.py"
CPU_TINY_MODEL = "model=GPTConfig(seq_len=128, n_layer=4, n_head=4, n_embd=128)"


# -- the gap test -----------------------------------------------------------------------------


def _gaps(rng, n: int, mean: float, sd: float) -> list[float]:
    return list(mean + sd * rng.standard_normal(n))


@pytest.mark.parametrize("n_champion, n_candidate", [(2, 3), (3, 3), (3, 8), (10, 5)])
def test_the_gap_test_passes_honest_noise(n_champion, n_candidate):
    """A/A: candidate and champion gaps from one distribution (sd 0.025 nats, the
    seed-to-seed spread of cpu-tiny's gap) are caught in at most alpha of the trials; an
    honest recipe whose gap moved by less than the minimum effect is never caught."""
    rng = np.random.default_rng(0)
    cfg = AcceptanceConfig()
    trials = 2000
    caught = sum(
        gap_test(_gaps(rng, n_candidate, 0.1, 0.025), _gaps(rng, n_champion, 0.1, 0.025),
                 cfg.holdout_alpha, cfg.holdout_min_gap).caught
        for _ in range(trials)
    )  # fmt: skip
    assert caught / trials <= cfg.holdout_alpha
    # Without the minimum effect, Welch's test alone would flag A/A at about its level...
    plain = sum(
        gap_test(_gaps(rng, n_candidate, 0.1, 0.025), _gaps(rng, n_champion, 0.1, 0.025),
                 0.05, 0.0).caught
        for _ in range(trials)
    )  # fmt: skip
    assert 0.02 < plain / trials < 0.08
    # ...and a real but small shift of the gap (a recipe that fits better, 0.04 nats with
    # almost no noise) is significant, yet below the minimum effect: not caught.
    shifted = gap_test([0.09, 0.0901, 0.0899], [0.05, 0.0501, 0.0499])
    assert shifted.numbers["p_value"] < 0.01 and not shifted.caught


def test_the_gap_test_catches_a_model_that_learned_the_val_slice():
    """Power: a rise of 10 noise sds is caught with the default three baseline replicates
    (five sds: about 80%). With only two champion runs Welch's test has one to two degrees
    of freedom and catches it about three times in four: the champion's re-measurements
    add evaluated runs over a session."""
    rng = np.random.default_rng(1)
    trials = 500
    for n_champion, rate in ((3, 0.95), (2, 0.6)):
        caught = sum(
            gap_test(_gaps(rng, 3, 0.05 + 0.2, 0.02), _gaps(rng, n_champion, 0.05, 0.02)).caught
            for _ in range(trials)
        )  # fmt: skip
        assert caught / trials > rate, n_champion
    check = gap_test([0.31, 0.33, 0.29], [0.05, 0.051])
    assert check.caught and check.name == "holdout-gap"
    assert check.numbers["rise"] == pytest.approx(0.2595) and "rise of +0.2595" in check.reason
    # Identical gaps (a deterministic evaluation): no spread, the rise alone decides.
    assert gap_test([0.2, 0.2], [0.05, 0.05]).caught
    assert not gap_test([0.05, 0.05], [0.05, 0.05]).caught
    with pytest.raises(ValueError, match="need at least 2 a side"):
        gap_test([0.3], [0.05, 0.05])


# -- the overhead rule ------------------------------------------------------------------------


def test_the_overhead_rule_passes_jitter_and_catches_work_moved_out_of_the_clock():
    champion = [27.1, 29.4, 31.0]  # cpu-tiny on a busy two-core machine: seconds of jitter
    honest = [30.2, 33.9, 28.8]
    check = overhead_test(honest, champion)
    assert not check.caught and check.numbers["limit_s"] == pytest.approx(0.5 * 29.4)
    cheat = [t + 20.0 for t in honest]  # e.g. precomputing in import what training needs
    caught = overhead_test(cheat, champion)
    assert caught.caught and caught.name == "untimed-overhead"
    assert caught.numbers["rise_s"] == pytest.approx(30.2 + 20.0 - 29.4)  # medians
    # A small champion overhead: the absolute floor applies, not the relative part.
    assert not overhead_test([3.5, 4.0], [1.0, 1.2], abs_s=3.0, rel=0.5).caught
    assert overhead_test([4.5, 5.0], [1.0, 1.2], abs_s=3.0, rel=0.5).caught
    # A faster candidate never trips it.
    assert not overhead_test([1.0], [30.0]).caught


def test_untimed_overhead_of_a_run():
    run = {"wall_seconds": 40.0, "result": {"train_seconds": 7.5, "eval_seconds": 2.5}}
    assert acceptance.untimed_overhead(run) == pytest.approx(30.0)
    assert acceptance.untimed_overhead({"wall_seconds": 40.0, "result": None}) is None


def test_caught_by_names_the_checks_of_the_violation_records():
    def violated(*checks):
        return {"integrity": {"ok": False, "violations": [{"check": c, "detail": "x"}
                                                          for c in checks]}}

    runs = [{"outcome": "ok", "result": {"integrity": {"ok": True, "violations": []}}},
            {"outcome": "integrity-violation", "result": violated("twins", "restore")},
            {"outcome": "integrity-violation", "result": violated("twins", "fixed-hash")},
            {"outcome": "crash", "result": violated("restore")}]  # not an integrity outcome
    assert acceptance.caught_by_runs(runs) == "twins,restore,fixed-hash"
    assert acceptance.caught_by_runs(runs[:1]) is None
    # A record that is not one names nothing: no check is invented from free text.
    assert acceptance.caught_by_runs([{"outcome": "integrity-violation",
                                       "result": {"integrity": {"violations": ["twins: x"]}}}]) \
        is None


def test_the_checks_in_order_and_their_verdict_are_plain_functions():
    """What the engine asks, in order, of a candidate the judge would accept, on ledger runs
    and numbers alone: the first check that catches decides, and only the numbers of the
    checks up to it are kept."""
    cfg = AcceptanceConfig(max_speedup=2.0)

    def run(run_id, seed, start, val_loss=3.0):
        return {"id": run_id, "seed": seed, "wall_seconds": 40.0,
                "result": {"seed": seed, "init_fingerprint": start, "val_loss": val_loss,
                           "train_seconds": 7.5, "eval_seconds": 2.5}}

    mine, theirs = [run(1, 11, "a"), run(2, 12, "b")], [run(3, 1, "c"), run(4, 2, "d")]
    checks = acceptance.checks_on_runs(mine, theirs, cfg)
    assert not acceptance.caught(checks)
    copies = acceptance.verdict(acceptance.checks_on_runs([run(1, 11, "a"), run(2, 12, "a")],
                                                          theirs, cfg))
    assert (copies.verdict, copies.caught_by) == ("reject", "seed-ignored")
    assert set(copies.checks) == {"seed-ignored"}  # the overhead test was not reached

    scored = {1: {"val_loss": 3.0, "holdout_loss": 3.1}, 2: {"val_loss": 3.0, "holdout_loss": 3.1}}
    assert acceptance.reproduce_checks(mine, scored, 1e-5) == []
    (missing,) = acceptance.reproduce_checks(mine, {1: scored[1]}, 1e-5)
    assert missing.caught and missing.name == "holdout-gap" and "[2]" in missing.reason
    (again,) = acceptance.reproduce_checks(mine, {**scored, 2: {"val_loss": 2.9}}, 1e-5)
    assert again.caught and again.name == "eval-reproduce" and again.numbers["again"] == 2.9

    skipped = acceptance.gap_check([0.1, 0.1], [0.1], cfg)
    assert not skipped.caught and "needs 2" in skipped.numbers["skipped"]
    review = "python -m agent review --run-dir D 7 --accept|--reject"
    held = acceptance.verdict([*checks, skipped, acceptance.step_check(2.5, cfg, review)])
    assert (held.verdict, held.caught_by) == ("hold", "implausible-speedup")
    assert review in held.reason
    accepted = acceptance.verdict([*checks, skipped, acceptance.step_check(1.5, cfg, review)])
    assert accepted.verdict == "accept" and accepted.caught_by is None
    assert set(accepted.checks) == {"seed-ignored", "untimed-overhead", "holdout-gap"}


def test_the_config_is_checked():
    with pytest.raises(ValueError, match="max_speedup=1.0: must be above 1"):
        AcceptanceConfig(max_speedup=1.0)
    with pytest.raises(ValueError, match="holdout_alpha=0.5"):
        AcceptanceConfig(holdout_alpha=0.5)
    with pytest.raises(ValueError, match="overhead_abs_s=-1"):
        AcceptanceConfig(overhead_abs_s=-1)


# -- the check names in the ledger, through the engine ------------------------------------------


class EditProposer:
    """Applies the edits it is given to the worktree, one per proposal; then is done."""

    name = "test"

    def __init__(self, *edits):
        self.edits = list(edits)

    def propose(self, worktree: Path, history: list[dict], context: dict) -> Proposal | None:
        if not self.edits:
            return None
        description, path, change = self.edits.pop(0)
        change(worktree / path)
        return Proposal(description, "it is faster", "other")


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {path}"
    path.write_text(text.replace(old, new))


@pytest.fixture
def session(tmp_path, monkeypatch):
    """A session with a hand-made baseline champion (nothing runs train.py)."""
    from agent.config import SessionConfig
    from agent.loop import Session

    monkeypatch.setenv("WANDB_MODE", "disabled")
    repo = working_tree_repo(tmp_path / "repo")
    s = Session.create(tmp_path / "run", SessionConfig(repo=str(repo)), EditProposer(),
                       say=lambda text: None)  # fmt: skip
    base = s.ledger.add_candidate("baseline", parent_id=None, commit_sha=s.workspace.champion)
    decision = Decision("accept", "baseline", 1.0, None, None, None, None, 0, 3, None)
    s.ledger.record_decision(base, "accept", decision, speedup=1.0)
    return s


def test_the_ledger_names_the_check_that_caught_a_candidate(session):
    def propose(description, path, change):
        def edit(worktree: Path) -> Proposal:
            change(worktree / path)
            return Proposal(description, "it is faster", "other")

        return session.submit(edit)

    clock = propose(
        "reads the clock",
        "model/gpt.py",
        lambda p: p.write_text(p.read_text() + "import time\nimport gc\n"),
    )
    assert clock["state"] == "refused" and clock["caught_by"] == "diff-scan:clock,diff-scan:gc"
    outside = propose("edits the harness", "train.py", lambda p: p.write_text("# mine\n"))
    assert outside["state"] == "refused" and outside["caught_by"] == "surface"
    empty = propose("changes nothing", RECIPE, lambda p: None)
    assert empty["state"] == "refused" and empty["caught_by"] is None  # not an integrity check

    # A commit that changes a fixed file, made behind the workspace's back: the run fails
    # on the hashes without running train.py, and the rejection names the check.
    ws = session.workspace
    ws.checkout(session.ledger.champion()["commit_sha"])
    edit(ws.path / "train.py", "import argparse\n", "import argparse  # harmless?\n")
    git(ws.path, "commit", "-qam", "edit the harness")
    commit = git(ws.path, "rev-parse", "HEAD").strip()
    ws.reset()
    cid = session.ledger.add_candidate("edits train.py", parent_id=session.ledger.champion()["id"],
                                       commit_sha=commit)  # fmt: skip
    candidate = session.ledger.candidate(cid)
    assert session.measurer.benchmark(candidate, "screen")["status"] == "integrity-violation"
    failed = Decision("reject", "run failed", None, None, None, None, None, 2, 1, None)
    session.recorder.record(candidate, failed)
    row = session.ledger.candidate(cid)
    assert (row["verdict"], row["caught_by"]) == ("reject", "fixed-hash")
    assert session.ledger.runs_of(cid)[0]["error"].startswith("fixed-hash: ")


# -- a candidate held for a human, then accepted by `agent review` --------------------------------


@pytest.mark.slow
def test_a_step_above_the_limit_is_held_then_accepted_by_review(tmp_path, data_cache, monkeypatch):
    """A genuinely faster recipe (a smaller model: more tokens per second on cpu-tiny) under a
    speedup limit of 1.01: the judge would accept it, the holdout and overhead checks pass
    (it is honest), and it is held instead; `agent review --accept` then promotes it."""
    from agent.cli import main
    from agent.config import SessionConfig
    from agent.ledger import Ledger
    from agent.loop import Session

    for key, value in (("SPEEDLOOP_DATA", str(data_cache)), ("WANDB_MODE", "disabled"),
                       ("SPEEDLOOP_LOCKS", str(tmp_path / "locks"))):  # fmt: skip
        monkeypatch.setenv(key, value)
    repo = working_tree_repo(tmp_path / "repo")
    # A gain far above the noise of a shared machine (tokens/s varies 3x there run to run).
    smaller = CPU_TINY_MODEL.replace("n_layer=4", "n_layer=1").replace("n_embd=128", "n_embd=32")
    proposer = EditProposer(("a smaller model", RECIPE, lambda p: edit(p, CPU_TINY_MODEL, smaller)))
    config = SessionConfig(
        repo=str(repo), objective="throughput", baseline_runs=2, experiments=1,
        train_args=["--budget-tokens", "4096"],
        judge={"loss_margin": 2.0},  # the smaller model's loss is not this test's question
        acceptance={"max_speedup": 1.01},
    )  # fmt: skip
    run_dir = tmp_path / "run"
    Session.create(run_dir, config, proposer, say=print).run()

    ledger = Ledger(run_dir / "ledger.sqlite")
    (held,) = [c for c in ledger.candidates() if c["experiment"]]
    assert (held["state"], held["verdict"], held["caught_by"]) == (
        "held",
        "held",
        "implausible-speedup",
    )
    evidence = held["decision"]
    assert evidence["effect"] > 1.01 and evidence["ci_low"] > 1.0
    assert evidence["commit"] == held["commit_sha"] and len(evidence["runs"]) >= 3
    assert all(Path(r["log"]).exists() for r in evidence["runs"])
    checks = evidence["checks"]  # both checks ran on real numbers, and passed
    assert checks["holdout-gap"]["n_candidate"] >= 3 and checks["holdout-gap"]["n_champion"] == 2
    assert checks["untimed-overhead"]["rise_s"] < checks["untimed-overhead"]["limit_s"]
    assert ledger.champion()["id"] == ledger.baseline()["id"]  # not promoted
    assert list((run_dir / "checkpoints").iterdir()) == []  # evaluated, then deleted
    ledger.close()

    assert main(["review", "--run-dir", str(run_dir)]) == 0
    assert main(["review", "--run-dir", str(run_dir), str(held["id"]), "--accept",
                 "--note", "a smaller model is really faster here"]) == 0  # fmt: skip
    ledger = Ledger(run_dir / "ledger.sqlite")
    champion = ledger.champion()
    assert champion["id"] == held["id"] and champion["verdict"] == "accept"
    assert champion["speedup"] == pytest.approx(evidence["effect"])
    assert champion["decision"]["review"]["note"] == "a smaller model is really faster here"
    branch = subprocess.run(
        ["git", "rev-parse", f"speedloop/{ledger.session()['id']}/champion"],
        cwd=repo, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert branch == held["commit_sha"]
    assert any("review: accepted candidate" in e["text"] for e in ledger.events())
    assert main(["review", "--run-dir", str(run_dir), str(held["id"]), "--reject"]) == 2
    assert os.path.exists(run_dir / "session.lock")


def test_review_refuses_what_it_cannot_decide(tmp_path, capsys):
    """Only a held candidate, only while no session runs, and only on the current champion."""
    from agent.cli import main
    from agent.ledger import Ledger
    from agent.liveness import SessionBusy, session_lock
    from agent.review import settle

    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.set_session({"preset": "cpu-tiny"})
    base = ledger.add_candidate("baseline", parent_id=None, commit_sha="a" * 40)
    ledger.record_decision(base, "accept", {"reason": "baseline"}, speedup=1.0)
    held = ledger.add_candidate("x3", parent_id=base, commit_sha="b" * 40)
    ledger.finish_run(ledger.start_run(held, "screen", 1), "ok", {"status": "ok"})
    ledger.hold(held, {"reason": "x3 > 2", "effect": 3.0, "checks": {}}, "implausible-speedup")
    later = ledger.add_candidate("x1.1", parent_id=base, commit_sha="c" * 40)
    ledger.finish_run(ledger.start_run(later, "screen", 2), "ok", {"status": "ok"})
    ledger.record_decision(later, "accept", {"reason": "faster"}, speedup=1.1)
    ledger.close()

    assert main(["review", "--run-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert f"candidate {held} (experiment #1): x3" in listing
    assert "held by implausible-speedup: x3 > 2" in listing
    assert main(["review", "--run-dir", str(tmp_path), str(later), "--accept"]) == 2
    assert f"candidate {later} is decided, not held" in capsys.readouterr().err
    assert main(["review", "--run-dir", str(tmp_path), str(held), "--accept"]) == 2
    assert f"the champion is now {later}" in capsys.readouterr().err
    with session_lock(tmp_path), pytest.raises(SessionBusy, match="a running session"):
        settle(tmp_path, held, accept=False)
    assert main(["review", "--run-dir", str(tmp_path), str(held), "--reject", "--note",
                 "built on an old champion"]) == 0  # fmt: skip
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        row = ledger.candidate(held)
        assert (row["verdict"], row["caught_by"]) == ("reject", "implausible-speedup")
        assert row["decision"]["review"]["note"] == "built on an old champion"
        assert ledger.champion()["id"] == later
