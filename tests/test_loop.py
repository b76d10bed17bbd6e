"""The experiment loop end to end on cpu-tiny: a real session through the CLI and its
report, drafts re-applied on a new champion, an LLM session drafting in the background.
(A session killed at any moment and resumed: tests/test_faults.py.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fakes.repo import working_tree_repo

from agent.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["--preset", "cpu-tiny", "--budget-tokens", "8192", "--baseline-runs", "2"]


@pytest.fixture(scope="module")
def env(data_cache, tmp_path_factory) -> dict:
    locks = tmp_path_factory.mktemp("locks")
    return {
        **os.environ,
        "SPEEDLOOP_DATA": str(data_cache),
        "SPEEDLOOP_LOCKS": str(locks),
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture
def repo(tmp_path) -> Path:
    return working_tree_repo(tmp_path / "repo")


def agent(repo: Path, env: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        cwd=repo, env=env, capture_output=True, text=True, timeout=900, **kw,
    )  # fmt: skip


@pytest.mark.slow
def test_session_runs_and_reports(repo, env, tmp_path):
    run_dir = tmp_path / "session"
    args = ["run", *SHORT, "--objective", "throughput", "--experiments", "2", "--max-runs", "2",
            "--devices", "cpu:2"]  # two slots, one core each: the parallel path end to end
    # An inherited spinning wait policy does not reach the benchmark (train.py sets its own).
    proc = agent(repo, {**env, "OMP_WAIT_POLICY": "ACTIVE"}, *args, "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ledger = Ledger(run_dir / "ledger.sqlite")
    decided = [c for c in ledger.candidates() if c["experiment"]]
    assert len(decided) == 2 and all(c["state"] == "decided" for c in decided)
    assert all(c["description"].startswith("sweep: ") for c in decided)
    baseline = ledger.runs_of(ledger.baseline()["id"], ok_only=True)
    assert len(baseline) == 2 and {r["slot"] for r in baseline} == {"0", "1"}
    for run in baseline:  # each pinned to its slot's one core, its trainer on one thread
        assert run["result"]["cpu_usage"]["threads"] == 1
        assert run["result"]["cpu_usage"]["wait_policy"] == "PASSIVE"
    for name in ("report.md", "progress.png", "results.tsv"):
        assert (run_dir / name).stat().st_size > 0
    status = agent(repo, env, "status", str(run_dir))
    assert status.returncode == 0 and "champion" in status.stdout.lower()
    assert "on 2 slots (slot 0 " in status.stdout
    # The user's checkout did not move; the session's work is on its own branch and refs.
    head = subprocess.run(["git", "branch", "--show-current"], cwd=repo, capture_output=True)
    assert head.stdout.decode().strip() == "main"
    refs = subprocess.run(["git", "for-each-ref", "refs/speedloop"], cwd=repo, capture_output=True)
    assert len(refs.stdout.decode().splitlines()) == 2


def _accept(session, description: str, edit) -> dict:
    """Make a candidate by hand (edit the worktree, capture it) and accept it as champion."""
    from agent.judge import Decision

    ws = session.workspace
    edit(ws.path)
    made = ws.capture(len(session.ledger.candidates()), description)
    champion = session.ledger.champion()
    cid = session.ledger.add_candidate(
        description, parent_id=champion["id"], diff=made.diff, commit_sha=made.commit
    )
    decision = Decision("accept", "by hand", 1.1, 1.0, 1.2, 0.01, 0.01, 3, 3, 0.0)
    session.ledger.record_decision(cid, "accept", decision, speedup=1.1)
    ws.move_champion(made.commit)
    return session.ledger.candidate(cid)


def test_a_draft_made_on_an_old_champion_is_reapplied_or_redone(repo, tmp_path, monkeypatch):
    """Drafting overlaps with running: when the champion changes meanwhile, the draft is
    re-applied on the new champion, or, when it no longer applies, proposed anew."""
    from agent.config import SessionConfig
    from agent.judge import Decision
    from agent.loop import Session
    from agent.proposers import SweepProposer
    from agent.proposers.sweep import knob_of, read_value, write_value

    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = SessionConfig(repo=str(repo))
    session = Session.create(tmp_path / "s", config, SweepProposer(), say=lambda text: None)
    base = session.ledger.add_candidate(
        "baseline", parent_id=None, commit_sha=session.workspace.champion
    )
    decision = Decision("accept", "baseline", 1.0, None, None, None, None, 0, 3, None)
    session.ledger.record_decision(base, "accept", decision, speedup=1.0)
    recipe = "model/recipe.py"

    # The sweep drafts a change of its first knob (n_layer) in the second worktree...
    second = session.workspace.second(tmp_path / "s" / "propose")
    draft = session.drafter.draft(second, *session.drafter.inputs())
    assert draft.made is not None and draft.proposal.description == "sweep: n_layer 4 -> 2"
    # ...while another candidate, changing another line, becomes the champion.
    new = _accept(session, "head_lr by hand", lambda p: write_value(p / recipe, "head_lr", 0.01))
    taken = session.drafter.take(draft)
    assert taken["parent_id"] == new["id"] and taken["description"] == draft.proposal.description
    parent = subprocess.run(
        ["git", "rev-parse", f"{taken['commit_sha']}^"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()
    assert parent == new["commit_sha"]  # built on the new champion, both changes in it
    session.workspace.checkout(taken["commit_sha"])
    path = session.workspace.path / recipe
    assert read_value(path, "head_lr") == 0.01 and read_value(path, "n_layer") == 2

    # A draft whose lines the new champion changed is dropped and proposed anew.
    draft = session.drafter.draft(second, *session.drafter.inputs())
    # The champion moves the same knob the other way (a valid shape either way).
    (changed,) = knob_of(draft.proposal.description)["knobs"].split(",")
    old, to = (knob_of(draft.proposal.description)[f"{changed}_{end}"] for end in ("from", "to"))
    other = old * 2 if to < old else old / 2
    other = int(other) if other == int(other) else other
    _accept(session, f"{changed} by hand", lambda p: write_value(p / recipe, changed, other))
    redone = session.drafter.take(draft)
    assert redone["description"] != draft.proposal.description
    assert any("does not apply" in e["text"] for e in session.ledger.events(50))


@pytest.mark.slow
def test_llm_proposers_see_a_profile_of_the_champion(repo, env, tmp_path, monkeypatch):
    from agent.config import SessionConfig
    from agent.judge import Decision
    from agent.loop import Session

    for key in ("SPEEDLOOP_DATA", "SPEEDLOOP_LOCKS", "WANDB_MODE"):
        monkeypatch.setenv(key, env[key])

    class Scripted:  # stands in for an LLM proposer: only its name matters here
        name = "command"

    session = Session.create(tmp_path / "s", SessionConfig(repo=str(repo)), Scripted())
    base = session.ledger.add_candidate(
        "baseline", parent_id=None, commit_sha=session.workspace.champion
    )
    decision = Decision("accept", "baseline", 1.0, None, None, None, None, 0, 3, None)
    session.ledger.record_decision(base, "accept", decision, speedup=1.0)
    _, _, context = session.drafter.inputs()
    assert "cpu-tiny" in context["profile"] and "aten::" in context["profile"]
    assert (tmp_path / "s" / "profiles" / f"c{base:03d}.txt").read_text() == context["profile"]


@pytest.mark.slow
def test_an_llm_session_drafts_in_the_background_and_records_every_request(repo, env, tmp_path):
    """`agent run --proposer anthropic` with the real SDK talking to a loopback fake, overlap
    on (the default): three conversations, two of them drafted in the proposer's thread while
    a candidate runs (the drafting thread must never write to the ledger itself). Each
    edits a different line of the recipe, checks and submits; the engine runs and judges all
    three; the ledger's spend is exactly what the fake server was asked for, request by
    request, and the report shows it."""
    import re

    from fakes.messages_api import FakeMessagesAPI, text, tool_use

    recipe = "model/recipe.py"
    source = (repo / recipe).read_text()
    lines = [re.search(rf"^    {knob}: float = [0-9.]+", source, re.M)[0]
             for knob in ("warmdown", "momentum_warmup", "head_lr")]
    with FakeMessagesAPI() as api:
        api.reply(text("pong"), usage={"input_tokens": 9, "output_tokens": 1})  # preflight's
        for n, old in enumerate(lines):
            api.reply(tool_use("read_file", path=recipe, start_line=1, end_line=40),
                      usage={"input_tokens": 3000 + n, "cache_creation_input_tokens": 2000})
            api.reply(tool_use("replace_in_file", path=recipe, old=old, new=old + "5"),
                      usage={"cache_read_input_tokens": 1500, "output_tokens": 70 + n})
            api.reply(tool_use("run_checks"))
            api.reply(tool_use("submit", description=f"knob {n}: one more digit",
                               hypothesis="a nudge", expected_effect="1% faster",
                               category="schedule"))  # fmt: skip
        run_dir = tmp_path / "session"
        keyed = {**env, "ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": api.url}
        args = ["run", *SHORT, "--objective", "throughput", "--experiments", "3", "--max-runs", "2"]
        proc = agent(repo, keyed, *args, "--proposer", "anthropic", "--run-dir", str(run_dir))
        served = api.served_usage()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ledger = Ledger(run_dir / "ledger.sqlite")
    candidates = [c for c in ledger.candidates() if c["experiment"]]
    assert [c["description"] for c in candidates] == [f"knob {n}: one more digit"
                                                     for n in range(3)]
    assert all(c["proposer"] == "anthropic" and c["state"] == "decided" for c in candidates)
    for candidate, old in zip(candidates, lines):
        assert "+" + old + "5" in candidate["diff"]
        assert candidate["usage"]["requests"] == 4
        assert ledger.runs_of(candidate["id"], ok_only=True)  # it really ran
    # Two drafts came from the background thread: their progress lines reached the ledger.
    llm_events = [e for e in ledger.events(200) if e["text"].startswith("llm: ")]
    assert len(llm_events) == 3
    spend = ledger.spend()
    assert served["requests"] == spend["requests"] == 13  # the preflight's one-token request
    for kind in ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                 "cache_read_input_tokens"):
        assert spend[kind] == served[kind], kind
    probe = (9 * 2.0 + 1 * 10.0) / 1e6  # claude-sonnet-5-5's prices, USD per MTok
    assert spend["cost_usd"] == pytest.approx(
        probe + sum(c["usage"]["cost_usd"] for c in candidates))
    report = (run_dir / "report.md").read_text()
    assert f"LLM spend: ${spend['cost_usd']:.3f} over 13 requests" in report
    assert "the device idled" in report
    assert "Top operations" in api.requests[1]["body"]["messages"][0]["content"][0]["text"]


def test_no_sandbox_here_refuses_to_start_unless_told(tmp_path, capsys, monkeypatch):
    """Where bubblewrap cannot run, a session refuses before it creates anything, with one
    line that says what to do; --no-sandbox starts it, marked untrusted."""
    from agent.cli import build_parser, main, session_config
    from bench import sandbox

    monkeypatch.setenv("SPEEDLOOP_BWRAP", str(tmp_path / "no-bwrap"))
    sandbox.available.cache_clear()
    try:
        run_dir = tmp_path / "s"
        assert main(["run", "--run-dir", str(run_dir), "--experiments", "1"]) == 2
        err = capsys.readouterr().err
        assert "could not start a sandbox" in err and "--no-sandbox" in err, err
        assert len(err.strip().splitlines()) == 1 and not run_dir.exists()
    finally:
        sandbox.available.cache_clear()
    args = build_parser().parse_args(["run", "--no-sandbox", "--proposer", "command",
                                      "--proposer-arg", "true"])
    config = session_config(args, run_dir)
    assert config.sandbox is False and config.proposer_options["sandbox"] is False


def test_allow_flagged_and_max_speedup_are_session_settings(tmp_path):
    from agent.cli import build_parser, session_config

    args = build_parser().parse_args(["run", "--allow-flagged", "--max-speedup", "3"])
    config = session_config(args, tmp_path)
    assert config.allow_flagged and config.acceptance_config().max_speedup == 3.0
    assert not session_config(build_parser().parse_args(["run"]), tmp_path).allow_flagged


def test_max_runs_bounds_the_judge_and_is_checked(tmp_path):
    from agent.cli import build_parser, session_config
    from agent.config import SessionStop

    config = session_config(build_parser().parse_args(["run", "--max-runs", "2"]), tmp_path)
    judge = config.judge_config()
    assert (judge.min_replicates, judge.max_replicates) == (2, 2)
    default = session_config(build_parser().parse_args(["run"]), tmp_path).judge_config()
    assert (default.min_replicates, default.max_replicates) == (3, 8)
    with pytest.raises(SessionStop, match="--max-runs 1: give at least 2"):
        session_config(build_parser().parse_args(["run", "--max-runs", "1"]), tmp_path)
