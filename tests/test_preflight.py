"""One preflight before anything is created, one line for every bad input, and a resume
that compares what it was given with the session's own settings.

The CLI runs as users run it (`python -m agent ...` in a repository), here one whose
harness is the fast fake (tests/fakes/harness.py), so a session that wrongly starts costs
seconds and touches no real checkout.
"""

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from fakes.messages_api import FakeMessagesAPI, text
from fakes.repo import working_tree_repo

from agent.ledger import Ledger
from agent.rundir import LEDGER_FILE

SESSION = ["--preset", "cpu-tiny", "--objective", "throughput", "--baseline-runs", "2",
           "--wandb", "disabled"]  # fmt: skip


@pytest.fixture(scope="module")
def env(data_cache, tmp_path_factory) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "WANDB_"))}
    return {**clean, "SPEEDLOOP_DATA": str(data_cache), "WANDB_MODE": "disabled",
            "SPEEDLOOP_LOCKS": str(tmp_path_factory.mktemp("locks"))}  # fmt: skip


def agent(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def branches(repo: Path) -> set[str]:
    out = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/heads/speedloop",
                          "refs/speedloop"], cwd=repo, capture_output=True, text=True).stdout
    return set(out.split())


def refused(repo: Path, env: dict, *args: str) -> str:
    """Run `agent *args`, which must be refused with one line and exit 2, having created
    nothing: no run directory, no branch. Returns the line."""
    before = branches(repo)
    proc = agent(repo, env, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert branches(repo) == before
    return proc.stderr


BAD_INPUTS = [  # (flags, what the line must say)
    (["run", "--run-dir", "/dev/null/x"], "--run-dir /dev/null/x: /dev/null is not a directory"),
    (["replay", "no-such-ladder"], "no ladder 'no-such-ladder'"),
    (["run", "--deadline", "tomorrow"], "--deadline 'tomorrow' is not a local date and time"),
    (["run", "--deadline", "2020-01-01T07:00"], "--deadline 2020-01-01T07:00 has passed"),
    (["run", "--experiments", "0"], "--experiments 0: give at least 1"),
    (["run", "--hours", "-1"], "--hours -1.0: give a number above 0"),
    (["run", "--budget-tokens", "0"], "--budget-tokens 0: give at least 1"),
    (["run", "--baseline-runs", "1"], "--baseline-runs 1: give at least 2"),
    (["run", "--loss-margin", "-0.1"], "--loss-margin -0.1: give at least 0"),
    (["replay", "nanogpt-speedrun", "--runs", "0"], "--runs 0: give at least 1"),
    (["run", "--target-loss", "inf"], "--target-loss inf: give a finite positive"),
    (["run", "--target-loss", "nan"], "--target-loss nan: give a finite positive"),
    (["run", "--target-loss", "-1"], "--target-loss -1.0: give a finite positive"),
    (["run", "--data", "nope"], "--data nope: dataset 'nope' is not prepared"),
    (["run", "--preset", "nope"], "--preset nope: unknown"),
    (["run", "--proposer", "patches", "--proposer-arg", "/no/such/dir"], "/no/such/dir"),
]


@pytest.mark.parametrize("args, says", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_each_bad_input_is_one_line_and_creates_nothing(fake_repo, env, tmp_path, args, says):
    if "--run-dir" not in args and args[0] == "run":
        args = [*args, "--run-dir", str(tmp_path / "session")]
    assert says in refused(fake_repo, env, *args)
    assert not (tmp_path / "session").exists()


def test_a_gpu_preset_is_refused_up_front_without_a_gpu(env, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    repo = working_tree_repo(tmp_path / "repo")  # the real harness: the fake has no GPU preset
    line = refused(repo, env, "run", "--preset", "gpu-small", "--run-dir", str(tmp_path / "s"))
    assert "--preset gpu-small runs on a CUDA GPU and this machine has none" in line


def test_a_truncated_shard_is_found_before_the_session(data_cache, fake_repo, env, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(data_cache / "embedded", cache / "embedded")
    val = sorted((cache / "embedded").glob("val_*.bin"))[0]
    val.write_bytes(val.read_bytes()[:5000])
    line = refused(fake_repo, {**env, "SPEEDLOOP_DATA": str(cache)}, "run",
                   "--run-dir", str(tmp_path / "s"))  # fmt: skip
    assert f"--data embedded: {val}" in line and "truncated" in line
    (cache / "embedded" / "token_bytes.npy").unlink()
    shutil.copy(data_cache / "embedded" / val.name, val)
    line = refused(fake_repo, {**env, "SPEEDLOOP_DATA": str(cache)}, "run",
                   "--run-dir", str(tmp_path / "s"))  # fmt: skip
    assert "token_bytes.npy is missing" in line


def test_an_llm_proposer_proves_its_key_url_and_model_first(fake_repo, env, tmp_path):
    """One one-token request, against the loopback fake of the Messages API: a refused
    key, an unknown model and an unreachable URL are each one line; a good one is paid for
    in the new session's ledger."""
    llm = ["--proposer", "anthropic", "--run-dir", str(tmp_path / "s")]
    with FakeMessagesAPI() as api:
        keyed = {**env, "ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": api.url}
        api.fail(401, "invalid x-api-key")
        assert "refuses the key" in refused(fake_repo, keyed, "run", *llm)
        api.fail(404, "model: claude-nope")
        line = refused(fake_repo, keyed, "run", *llm, "--model", "claude-sonnet-4-5")
        assert "--model claude-sonnet-4-5: the Messages API" in line
        line = refused(fake_repo, keyed, "run", *llm, "--max-usd-per-candidate", "0.01")
        assert "--max-usd-per-candidate 0.01 is below the worst case of one request" in line
        assert len(api.requests) == 2  # the cap needs no request
        api.reply(text("pong"), usage={"input_tokens": 8, "output_tokens": 1})
        # The probe passes; the session then stops at its first proposal, whose first
        # request the fake refuses.
        api.default = (400, api.error_body(400, "the script is over"))
        agent(fake_repo, keyed, "run", *SESSION, *llm, "--experiments", "1")
    with Ledger(tmp_path / "s" / LEDGER_FILE, create=False) as ledger:
        spend = ledger.spend()
    assert spend["input_tokens"] >= 8 and spend["requests"] >= 1
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    keyed = {**env, "ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": closed}
    line = refused(fake_repo, keyed, "run", *llm[:-1], str(tmp_path / "t"))
    assert f"cannot reach the Messages API at {closed}" in line


def test_uncommitted_surface_edits_are_named_and_a_bad_harness_input_stops_at_once(
    data_cache, fake_repo, env, tmp_path
):  # fmt: skip
    """The session starts from HEAD, so edits to model/ are named in a warning. When
    train.py itself refuses the session's input (exit 2), the session stops at its first
    run with train.py's message instead of retrying the baseline."""
    cache = tmp_path / "cache"  # a dataset "missing" that preflight finds, train.py refuses
    cache.mkdir()
    for name in ("embedded", "missing"):
        (cache / name).symlink_to(data_cache / "embedded")
    speed = fake_repo / "model" / "speed.txt"
    speed.write_text("2.0\n")
    try:
        proc = agent(fake_repo, {**env, "SPEEDLOOP_DATA": str(cache)}, "run", *SESSION,
                     "--data", "missing", "--run-dir", str(tmp_path / "s"))  # fmt: skip
    finally:
        subprocess.run(["git", "checkout", "--", "model/speed.txt"], cwd=fake_repo, check=True)
    assert "warning: uncommitted changes to model/speed.txt" in " ".join(proc.stdout.split())
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "train.py refused its input: error: dataset 'missing' is not prepared" in proc.stderr
    with Ledger(tmp_path / "s" / LEDGER_FILE, create=False) as ledger:
        runs = ledger.runs_of(ledger.baseline()["id"])
        assert [r["outcome"] for r in runs] == ["crash"]
        assert ledger.last_event("session stopped: ")["text"].startswith(
            "session stopped: train.py refused its input")


def test_a_failed_create_leaves_nothing_behind(fake_repo, tmp_path, monkeypatch):
    from agent.config import SessionConfig
    from agent.loop import Session

    monkeypatch.setenv("WANDB_MODE", "bogus")  # the tracker refuses it in the new session
    with pytest.raises(ValueError, match="bogus"):
        Session.create(tmp_path / "new" / "session", SessionConfig(repo=str(fake_repo)), None)
    assert list(tmp_path.iterdir()) == []


def test_resume_compares_what_was_given_with_the_sessions_own_settings(tmp_path):
    """Not with the parser's defaults: a flag that repeats the session's setting passes,
    one that differs is refused by name, a budget passes."""
    from agent.cli import build_parser
    from agent.config import SessionConfig, SessionStop
    from agent.preflight import resume_conflicts

    config = SessionConfig(baseline_runs=2, wandb="disabled", experiments=6)
    with Ledger(tmp_path / LEDGER_FILE) as ledger:
        ledger.set_session(asdict(config))

    def given(*flags):
        return build_parser().parse_args(["run", "--resume", str(tmp_path), *flags])

    for flags in (["--wandb", "disabled"], ["--baseline-runs", "2"], ["--preset", "cpu-tiny"],
                  ["--max-speedup", "2"], ["--loss-margin", "0.01"], ["--experiments", "4"],
                  ["--hours", "3"]):
        resume_conflicts(given(*flags), config)
    for flags, says in ((["--baseline-runs", "3"], "--baseline-runs 3: this session has 2"),
                        (["--wandb", "offline"], "--wandb offline: this session has disabled"),
                        (["--preset", "gpu-small"], "--preset gpu-small: this session has "),
                        (["--allow-flagged"], "--allow-flagged: this session has it off"),
                        (["--max-speedup", "3"], "--max-speedup 3.0: this session has 2.0"),
                        (["--loss-margin", "0.03"], "--loss-margin 0.03: this session has 0.01"),
                        (["--run-dir", "x"], "--run-dir x: a resumed session stays")):
        with pytest.raises(SessionStop, match=says):
            resume_conflicts(given(*flags), config)


def test_a_resume_stores_its_budget(fake_repo, env, tmp_path):
    """`--resume D --experiments 2` on a session of 3 runs to 2, and stores 2: status says
    "of 2", and a later plain resume does not run on to 3."""
    patches = tmp_path / "patches"
    patches.mkdir()
    for n in (1, 2, 3):
        (patches / f"{n:02d}.patch").write_text(
            f"--- a/model/speed.txt\n+++ b/model/speed.txt\n@@ -1 +1 @@\n-1.0\n+1.0{n}\n")
    (patches / "02.patch").rename(tmp_path / "02.patch")  # the proposer runs out after one
    (patches / "03.patch").rename(tmp_path / "03.patch")
    run_dir = tmp_path / "s"
    args = [*SESSION, "--proposer", "patches", "--proposer-arg", str(patches)]
    first = agent(fake_repo, env, "run", *args, "--experiments", "3", "--run-dir", str(run_dir))
    assert first.returncode == 0, first.stderr
    for n in (2, 3):
        (tmp_path / f"{n:02d}.patch").rename(patches / f"{n:02d}.patch")
    resumed = agent(fake_repo, env, "run", "--resume", str(run_dir), "--experiments", "2",
                    "--wandb", "disabled")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    status = agent(fake_repo, env, "status", str(run_dir)).stdout
    assert "experiments decided: 2 of 2" in status
    again = agent(fake_repo, env, "run", "--resume", str(run_dir))
    assert again.returncode == 0, again.stderr
    with Ledger(run_dir / LEDGER_FILE, create=False) as ledger:
        assert ledger.n_experiments() == 2 and ledger.session()["config"]["experiments"] == 2


def test_settings_are_loaded_strictly_one_way(tmp_path):
    """Every settings class is built from a dict by config.from_dict, which names a key it
    does not know instead of dropping it; a stored session with one refuses to load."""
    from agent.config import SessionConfig, SessionStop, stored

    with pytest.raises(ValueError, match=r"unknown session settings \['bogus'\]"):
        SessionConfig.from_dict({"preset": "cpu-tiny", "bogus": 1})
    with pytest.raises(ValueError, match=r"unknown judge settings \['alpah'\]"):
        SessionConfig(judge={"alpah": 0.1}).judge_config()
    with pytest.raises(ValueError, match=r"unknown acceptance settings \['max_sped'\]"):
        SessionConfig(acceptance={"max_sped": 3}).acceptance_config()
    with Ledger(tmp_path / LEDGER_FILE) as ledger:
        ledger.set_session({**asdict(SessionConfig()), "bogus": 1})
    with pytest.raises(SessionStop, match=r"ledger.sqlite: unknown session settings \['bogus'\]"):
        stored(tmp_path)
