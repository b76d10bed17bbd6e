"""The Anthropic proposer with the real SDK against a loopback fake of the Messages API:
scripted conversations that edit a copy of the surface, tool errors the model can act on,
retries, outages, the cost accounting and the budget stop."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fakes.messages_api import FakeMessagesAPI, text, tool_use
from fakes.repo import surface_repo

from agent.costs import PRICES, BudgetExhausted, ProposerStop, UnknownPrice
from agent.proposers.anthropic import AnthropicProposer, ConversationFailed, LLMConfig
from agent.proposers.base import ProposalFailed
from agent.proposers.messages_api import MissingApiKey
from agent.proposers.tools import TOOL_SPECS

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "model/recipe.py"
# The edit the scripted model makes: one more digit on the warmdown default, whatever it is.
OLD = re.search(r"^    warmdown: float = [0-9.]+", (ROOT / RECIPE).read_text(), re.M).group(0)
NEW = OLD + "1"
OLD_LINE = (ROOT / RECIPE).read_text().splitlines().index(
    next(line for line in (ROOT / RECIPE).read_text().splitlines() if line.startswith(OLD))) + 1
CONTEXT = {"preset": "cpu-tiny", "objective": "time-to-loss", "champion": {},
           "champion_results": []}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return surface_repo(tmp_path_factory.mktemp("template") / "tree")


@pytest.fixture
def worktree(template, tmp_path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(template, tree, symlinks=True)
    return tree


@pytest.fixture
def api():
    with FakeMessagesAPI() as fake:
        yield fake


@pytest.fixture
def brief(tmp_path) -> Path:
    path = tmp_path / "program.md"
    path.write_text("Make it fast.\n")
    return path


def make(api, brief, sleeps=None, says=None, **settings) -> AnthropicProposer:
    settings = {"sdk_max_retries": 0, "require_checks": False, **settings}
    config = LLMConfig(base_url=api.url, brief=str(brief), **settings)
    return AnthropicProposer(
        config, api_key="test-key",
        say=(says.append if says is not None else lambda s: None),
        sleep=(sleeps.append if sleeps is not None else lambda s: None),
    )


def submit(description="schedule: a longer warmdown", category="schedule"):
    return tool_use("submit", description=description, hypothesis="a longer decay",
                    expected_effect="2% faster", category=category)


def test_good_edit_is_read_checked_and_submitted(api, brief, worktree):
    context = {**CONTEXT, "preset": "gpu-small"}  # the smoke also builds gpu-small on meta
    api.reply(text("Let me look."), tool_use("list_files"),
              usage={"input_tokens": 3000, "cache_creation_input_tokens": 2000})
    api.reply(tool_use("read_file", path=RECIPE, start_line=20, end_line=35),
              tool_use("search_surface", pattern=r"warmdown: float", regex=True),
              usage={"cache_read_input_tokens": 2000})
    api.reply(tool_use("replace_in_file", path=RECIPE, old=OLD, new=NEW))
    api.reply(tool_use("run_checks"))
    api.reply(submit())
    proposer = make(api, brief, require_checks=True)
    proposal = proposer.propose(worktree, [], context)

    assert NEW in (worktree / RECIPE).read_text()
    assert proposal.description == "schedule: a longer warmdown"
    assert proposal.category == "schedule" and "2% faster" in proposal.hypothesis
    assert proposal.usage["requests"] == 5 and proposal.usage["cost_usd"] > 0

    first = api.requests[0]
    headers = first["headers"]  # the SDK sends the key as a bearer token or as x-api-key
    assert "test-key" in (headers.get("x-api-key"), headers.get("authorization", "")[7:])
    body = first["body"]
    assert [t["name"] for t in body["tools"]] == [t["name"] for t in TOOL_SPECS]
    assert body["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert "Make it fast." in body["system"][0]["text"]
    assert "# History" in body["messages"][0]["content"][0]["text"]
    listing = api.tool_results(1)[0]
    assert not listing["is_error"] and "model/recipe.py" in listing["content"]
    assert "train.py" not in listing["content"]  # only the surface is listed
    read, search = api.tool_results(2)
    assert OLD.strip() in read["content"] and "   20| " in read["content"]
    assert "model/recipe.py:" in search["content"]
    assert api.tool_results(3)[0]["content"].startswith("replaced")
    checks = api.tool_results(4)[0]
    assert not checks["is_error"], checks["content"]
    assert "smoke: ok" in checks["content"] and "gpu-small: the recipe builds" in checks["content"]
    # The conversation's cache breakpoint sits on the newest block only.
    last = api.requests[4]["body"]["messages"]
    marks = [b for m in last for b in m["content"] if isinstance(b, dict) and "cache_control" in b]
    assert marks == [last[-1]["content"][-1]]
    # The assistant turns go back unchanged, tool_use ids answered by tool_results.
    assert last[1]["content"][1]["name"] == "list_files"
    assert api.tool_results(1)[0]["tool_use_id"] == last[1]["content"][1]["id"]


def test_paths_outside_the_surface_are_errors_and_nothing_is_written(api, brief, worktree):
    (worktree / "model" / "escape").symlink_to(worktree / "bench")
    api.reply(tool_use("replace_in_file", path="train.py", old="# the", new="# a"),
              tool_use("create_file", path="bench/cheat.py", content="x = 1\n"),
              tool_use("read_file", path="../../etc/passwd"),
              tool_use("read_file", path="model/escape/evaluator.py"),
              tool_use("create_file", path="/tmp/abs.py", content="x = 1\n"))
    api.reply(text("I give up."))
    with pytest.raises(ConversationFailed, match="did not submit within 2 turns"):
        make(api, brief, max_turns=2).propose(worktree, [], CONTEXT)
    results = api.tool_results(1)
    assert len(results) == 5 and all(r["is_error"] for r in results)
    assert "outside the research surface" in results[0]["content"]
    assert "model/, kernels/" in results[1]["content"]
    assert "symlink" in results[3]["content"]
    assert (worktree / "train.py").read_text() == "# the fixed harness\n"
    assert not (worktree / "bench" / "cheat.py").exists()
    nudge = api.requests[1]["body"]["messages"][-1]["content"][-1]["text"]
    assert "1 turn(s) left" in nudge


def test_bad_snippets_are_errors_the_model_can_fix(api, brief, worktree):
    original = (worktree / RECIPE).read_text()
    api.reply(tool_use("replace_in_file", path=RECIPE, old=OLD + "\n    no_such: int", new="x"),
              tool_use("replace_in_file", path=RECIPE, old="float", new="int"),
              tool_use("replace_in_file", path=RECIPE, old=OLD, new=OLD + " + ("),
              tool_use("submit", description="nothing", hypothesis="", expected_effect="",
                       category="schedule"),
              tool_use("create_file", path=RECIPE, content=""),
              tool_use("no_such_tool"),
              tool_use("read_file", nonsense=1),
              tool_use("submit", description="two\nlines", hypothesis="", expected_effect="",
                       category="schedule"),
              tool_use("submit", description="x", hypothesis="", expected_effect="",
                       category="magic"),
              tool_use("replace_in_file", path=RECIPE, old=OLD, new=NEW))
    api.reply(text("Done."))
    with pytest.raises(ConversationFailed):
        make(api, brief, max_turns=2).propose(worktree, [], CONTEXT)
    r = api.tool_results(1)
    assert r[0]["is_error"] and "does not occur" in r[0]["content"]
    assert f"first line appears at line(s) {OLD_LINE}:" in r[0]["content"]
    assert r[1]["is_error"] and "times" in r[1]["content"] and "(at lines" in r[1]["content"]
    assert r[2]["is_error"] and "syntax error" in r[2]["content"]
    assert r[3]["is_error"] and "nothing is changed" in r[3]["content"]
    assert r[4]["is_error"] and "exists already" in r[4]["content"]
    assert r[5]["is_error"] and "no tool" in r[5]["content"]
    assert r[6]["is_error"] and "bad arguments" in r[6]["content"]
    assert r[7]["is_error"] and "one line" in r[7]["content"]
    assert r[8]["is_error"] and "choose one of kernel" in r[8]["content"]
    assert not r[9]["is_error"], r[9]["content"]
    # The conversation failed, so its one successful edit was taken back.
    assert (worktree / RECIPE).read_text() == original


def test_failed_conversation_restores_edits_and_created_files(api, brief, worktree):
    original = (worktree / RECIPE).read_text()
    api.reply(tool_use("replace_in_file", path=RECIPE, old=OLD, new=NEW),
              tool_use("create_file", path="kernels/new_op.py", content="y = 2\n"))
    api.reply(tool_use("create_file", path="model/half.py", content="def f("),
              stop_reason="max_tokens")  # cut off: its input may be incomplete
    api.reply(text("still thinking"))
    api.reply(text("and thinking"))
    with pytest.raises(ProposalFailed, match="within 4 turns"):
        make(api, brief, max_turns=4).propose(worktree, [], CONTEXT)
    assert "Continue with tool calls" in str(api.requests[3]["body"]["messages"][-1])
    assert (worktree / RECIPE).read_text() == original
    assert not (worktree / "kernels" / "new_op.py").exists()
    cut = api.tool_results(2)[0]
    assert cut["is_error"] and "not run" in cut["content"]
    assert not (worktree / "model" / "half.py").exists()


def test_a_refused_first_request_stops_the_session_a_later_one_the_candidate(
        api, brief, worktree):
    api.fail(400, "thinking.type=enabled is not supported for this model")
    with pytest.raises(ProposerStop, match="not supported(.|\n)*check the LLM settings"):
        make(api, brief).propose(worktree, [], CONTEXT)
    api.reply(tool_use("list_files"))
    api.fail(400, "prompt is too long")
    with pytest.raises(ConversationFailed, match="prompt is too long"):
        make(api, brief).propose(worktree, [], CONTEXT)


def test_submit_needs_passing_checks_after_the_last_edit(api, brief, worktree):
    api.reply(tool_use("replace_in_file", path=RECIPE, old=OLD, new=NEW), submit())
    api.reply(text("ok"))
    with pytest.raises(ConversationFailed):
        make(api, brief, max_turns=2, require_checks=True).propose(worktree, [], CONTEXT)
    assert "run run_checks after your last edit" in api.tool_results(1)[1]["content"]


def test_duplicate_of_a_tried_change_is_refused_then_a_new_one_accepted(api, brief, worktree):
    recipe = worktree / RECIPE
    spaced = NEW.replace("warmdown: float", "warmdown:   float")  # same change, other spacing
    recipe.write_text(recipe.read_text().replace(OLD, spaced))
    tried = subprocess.run(["git", "diff"], cwd=worktree, capture_output=True, text=True).stdout
    subprocess.run(["git", "checkout", "-q", "--", RECIPE], cwd=worktree, check=True)
    history = [
        {"experiment": None, "description": "baseline", "diff": "", "verdict": "accept"},
        {"experiment": 1, "description": "longer warmdown", "diff": tried, "verdict": "reject",
         "decision": {"effect": 0.99, "reason": "no significant gain"}},
    ]
    other = OLD + "2"
    api.reply(tool_use("replace_in_file", path=RECIPE, old=OLD, new=NEW), submit())
    api.reply(tool_use("replace_in_file", path=RECIPE, old=NEW, new=other),
              submit("schedule: an even longer warmdown"))
    proposal = make(api, brief).propose(worktree, history, CONTEXT)
    refusal = api.tool_results(1)[1]
    assert refusal["is_error"]
    assert "tried already: #1 reject x0.990: longer warmdown — no significant gain" \
        in refusal["content"]
    assert proposal.description == "schedule: an even longer warmdown"
    assert other in recipe.read_text()


def _short_conversation(api):
    api.reply(tool_use("replace_in_file", path=RECIPE, old=OLD, new=NEW), submit())


def test_rate_limit_then_overload_are_retried_by_the_sdk(api, brief, worktree):
    api.fail(429)
    api.fail(529)
    _short_conversation(api)
    sleeps = []
    proposal = make(api, brief, sleeps=sleeps, sdk_max_retries=2).propose(
        worktree, [], CONTEXT)
    assert proposal.description.startswith("schedule")
    assert len(api.requests) == 3 and sleeps == []  # the SDK's retries, not ours


def test_server_errors_pause_and_resume_with_backoff(api, brief, worktree):
    api.fail(500)
    api.fail(503)
    api.fail(529)
    _short_conversation(api)
    sleeps, says = [], []
    proposer = make(api, brief, sleeps=sleeps, says=says, retry_initial_s=2, retry_max_s=3)
    proposal = proposer.propose(worktree, [], CONTEXT)
    assert proposal is not None
    assert sleeps == [2, 3, 3]  # doubling, capped at retry_max_s
    assert "InternalServerError 500" in says[0] and "pausing 2 s" in says[0]
    assert proposal.usage["requests"] == 1  # failed requests cost nothing


def test_a_long_outage_fails_the_candidate_not_the_session(api, brief, worktree):
    api.default = (500, api.error_body(500, "down for maintenance"))
    sleeps = []
    proposer = make(api, brief, sleeps=sleeps, retry_initial_s=10, outage_max_wait_s=25)
    with pytest.raises(ConversationFailed, match="unavailable for 25 s.*down for maintenance"):
        proposer.propose(worktree, [], CONTEXT)
    assert sleeps == [10, 15]
    assert not subprocess.run(["git", "status", "--porcelain"], cwd=worktree,
                              capture_output=True, text=True).stdout


def test_outage_pauses_end_with_the_session(api, brief, worktree):
    """An outage near --hours or --deadline: the pauses stop at the session's end, and the
    session stops (not one more candidate that waits as long again)."""
    import time

    api.default = (529, api.error_body(529, "overloaded"))
    sleeps = []
    proposer = make(api, brief, sleeps=sleeps, retry_initial_s=10, outage_max_wait_s=3600)
    proposer.stop_at = time.time() + 25
    with pytest.raises(ProposerStop, match="until the session's end.*overloaded"):
        proposer.propose(worktree, [], CONTEXT)
    assert sum(sleeps) <= 25 and len(sleeps) == 2  # 10, then the 15 or so that are left
    proposer.stop_at = time.time() - 1  # the session's time is up: not one pause
    sleeps.clear()
    with pytest.raises(ProposerStop, match="until the session's end"):
        proposer.propose(worktree, [], CONTEXT)
    assert sleeps == []


def test_a_refused_connection_before_any_answer_stops_the_session(brief, worktree):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    sleeps = []
    proposer = AnthropicProposer(
        LLMConfig(base_url=url, brief=str(brief), sdk_max_retries=0), api_key="test-key",
        say=lambda s: None, sleep=sleeps.append)  # fmt: skip
    with pytest.raises(ProposerStop, match=f"cannot connect to the Messages API at {url}"):
        proposer.propose(worktree, [], CONTEXT)
    assert sleeps == []  # no pause: the URL is wrong, not the API down


def test_a_rejected_key_stops_the_session(api, brief, worktree):
    api.fail(401, "invalid x-api-key")
    with pytest.raises(ProposerStop, match="invalid x-api-key.*ANTHROPIC_API_KEY"):
        make(api, brief).propose(worktree, [], CONTEXT)


def test_missing_key_is_an_error_at_construction(monkeypatch, brief, tmp_path):
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("ANTHROPIC_CONFIG_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/anthropic profile either
    with pytest.raises(MissingApiKey, match="ANTHROPIC_API_KEY"):
        AnthropicProposer(LLMConfig(brief=str(brief)))


def test_config_errors_are_caught_at_construction(brief):
    with pytest.raises(UnknownPrice, match="no price for model 'claude-future-9'"):
        AnthropicProposer(LLMConfig(model="claude-future-9", brief=str(brief)), api_key="k")
    prices = {"input": 1, "output": 2, "cache_write": 1.25, "cache_read": 0.1}
    p = AnthropicProposer(LLMConfig(model="claude-future-9", prices=prices, brief=str(brief)),
                          api_key="k")
    assert p.price.output == 2.0
    with pytest.raises(FileNotFoundError, match="research brief"):
        AnthropicProposer(LLMConfig(brief="/nonexistent/program.md"), api_key="k")
    with pytest.raises(ValueError, match="unknown LLM settings"):
        LLMConfig.from_dict({"modle": "x"})
    with pytest.raises(ValueError, match="not even one candidate fits"):
        LLMConfig(budget_usd=1, max_usd_per_candidate=2).validate()


def test_cost_follows_usage_and_the_price_table(api, brief, worktree):
    api.reply(tool_use("replace_in_file", path=RECIPE, old=OLD, new=NEW),
              usage={"input_tokens": 1200, "output_tokens": 300,
                     "cache_creation_input_tokens": 5000, "cache_read_input_tokens": 0})
    api.reply(submit(), usage={"input_tokens": 200, "output_tokens": 400,
                               "cache_creation_input_tokens": 300,
                               "cache_read_input_tokens": 5000})
    proposer = make(api, brief)
    usage = proposer.propose(worktree, [], CONTEXT).usage
    p = PRICES["claude-sonnet-5-5"]
    expected = (1400 * p.input + 700 * p.output + 5300 * p.cache_write
                + 5000 * p.cache_read) / 1e6
    assert usage == {"model": "claude-sonnet-5-5", "input_tokens": 1400, "output_tokens": 700,
                     "cache_creation_input_tokens": 5300, "cache_read_input_tokens": 5000,
                     "requests": 2, "cost_usd": pytest.approx(expected)}
    assert proposer.session_usage.cost(p) == pytest.approx(expected)


def test_budget_stops_before_a_candidate_that_might_not_fit(api, brief, worktree):
    history = [{"experiment": 1, "description": "x", "usage": {"cost_usd": 7.5}}]
    proposer = make(api, brief, budget_usd=10.0, max_usd_per_candidate=3.0)
    with pytest.raises(BudgetExhausted, match=r"\$7.50 of \$10.00 spent"):
        proposer.propose(worktree, history, CONTEXT)
    assert api.requests == []  # nothing was spent on it
    history[0]["usage"] = '{"cost_usd": 6.5}'  # as the ledger's JSON column
    _short_conversation(api)
    assert proposer.propose(worktree, history, CONTEXT) is not None


def test_a_conversation_stops_at_its_cost_cap(api, brief, worktree):
    api.reply(tool_use("list_files"), usage={"output_tokens": 20_000})  # $0.20 at $10/MTok
    with pytest.raises(ConversationFailed, match="max_usd_per_candidate"):
        make(api, brief, max_usd_per_candidate=0.3, max_tokens=16_000).propose(
            worktree, [], CONTEXT)
    assert len(api.requests) == 1
