"""The brake: a proposer that keeps failing the same way stops the session, instead of
cycling until --hours ends; its refusals ran nothing, so they trigger no re-measurement of
the champion. Real sessions on the fast fake harness (tests/fakes/harness.py)."""

from pathlib import Path

import pytest

from agent.config import SessionConfig
from agent.loop import Session, failure_cause
from agent.proposers import make_proposer


@pytest.fixture(autouse=True)
def quiet(monkeypatch, tmp_path):
    monkeypatch.setenv("SPEEDLOOP_LOCKS", str(tmp_path / "locks"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def session(fake_repo: Path, run_dir: Path, proposer: str, arg: str, **options) -> Session:
    config = SessionConfig(repo=str(fake_repo), objective="throughput", baseline_runs=2,
                           proposer=proposer, proposer_arg=arg, proposer_options=options,
                           wandb="disabled", experiments=20)  # fmt: skip
    return Session.create(run_dir, config, make_proposer(proposer, arg, options),
                          say=lambda text: None)  # fmt: skip


def test_patches_that_do_not_apply_stop_the_session_after_five(fake_repo, tmp_path):
    patches = tmp_path / "patches"
    patches.mkdir()
    for n in range(8):
        (patches / f"{n}.patch").write_text(
            f"--- a/model/speed.txt\n+++ b/model/speed.txt\n@@ -1 +1 @@\n-0.{n}\n+0.9\n")
    s = session(fake_repo, tmp_path / "s", "patches", str(patches))
    why = s.run()
    assert why == "the proposer failed 5 times in a row: does not apply to the champion"
    assert s.ledger.n_experiments() == 5  # not 8, and not until the budget of 20
    champion = s.ledger.champion()["id"]
    assert not s.ledger.runs_of(champion, roles=["champion"])  # refusals ran nothing
    assert s.ledger.last_event("session stopped: ")["text"] == f"session stopped: {why}"


@pytest.mark.parametrize("command, cause", [("echo broken; exit 1", "exited with status 1"),
                                            ("sleep 30", "timed out after 0 s")])
def test_a_command_that_fails_or_hangs_stops_the_session(fake_repo, tmp_path, command, cause):
    brief = tmp_path / "program.md"
    brief.write_text("Make it fast.\n")
    s = session(fake_repo, tmp_path / "s", "command", command, brief=str(brief),
                timeout_s=0.2)
    s.config.max_failures = 3  # a SessionConfig field
    assert s.run() == f"the proposer failed 3 times in a row: {cause}"
    assert s.ledger.n_experiments() == 3


def test_the_cause_is_the_same_for_each_repeat():
    def refused(reason, caught_by=None):
        return {"caught_by": caught_by, "decision": {"reason": reason}}

    assert failure_cause(refused("exited with status 1; its last output:\nboom")) == \
        "exited with status 1"
    assert failure_cause(refused("the API was unavailable for 3600 s (outage_max_wait_s): "
                                 "APIConnectionError")) == \
        "the API was unavailable for 3600 s (outage_max_wait_s)"
    assert failure_cause(refused("model/x.py:1: clock", "diff-scan:clock")) == "diff-scan:clock"
