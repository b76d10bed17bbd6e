"""The command proposer with a small script standing in for the external coding agent: it
gets the prompt, edits the surface, describes its change; timeouts, failures, commits,
repeats and broken edits are each reported, never taken as a candidate."""

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes.repo import ROOT, surface_repo

from agent.proposers import make_proposer
from agent.proposers.base import ProposalFailed
from agent.proposers.command import CommandConfig, CommandProposer

RECIPE = "model/recipe.py"
OLD = re.search(r"^    warmdown: float = [0-9.]+", (ROOT / RECIPE).read_text(), re.M).group(0)
NEW = OLD + "1"
CONTEXT = {"preset": "cpu-tiny", "objective": "time-to-loss", "champion": {},
           "champion_results": []}

AGENT = """\
import json, os, pathlib, subprocess, sys
prompt = sys.stdin.read()
assert prompt == pathlib.Path(os.environ["SPEEDLOOP_PROMPT"]).read_text()
assert "# Research brief" in prompt and "# History" in prompt, prompt[:200]
assert pathlib.Path(os.environ["SPEEDLOOP_WORKTREE"]) == pathlib.Path.cwd()
old, new, mode = sys.argv[1:4]
recipe = pathlib.Path("model/recipe.py")
recipe.write_text(recipe.read_text().replace(old, new))
if mode == "describe":
    json.dump({"description": "schedule: longer warmdown", "hypothesis": "decay later",
               "expected_effect": "3% faster", "category": "schedule"},
              open(os.environ["SPEEDLOOP_PROPOSAL"], "w"))
if mode == "commit":  # the sandbox keeps git's files read-only: it fails, the edit stays
    done = subprocess.run(["git", "-c", "user.name=a", "-c", "user.email=a@a", "commit",
                           "-qam", "x"], capture_output=True, text=True)
    assert done.returncode != 0 and "Read-only file system" in done.stderr, done
if mode == "escape":  # everything but the surface is read-only, for the agent too
    for target in ("train.py", "bench/evaluator.py", os.environ["HOME"] + "/speedloop-x"):
        try:
            pathlib.Path(target).write_text("x")
        except OSError as e:
            print("refused:", target, e.strerror)
        else:
            sys.exit(f"wrote {target}")
print("agent: edited the recipe")
"""


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return surface_repo(tmp_path_factory.mktemp("template") / "tree")


@pytest.fixture
def worktree(template, tmp_path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(template, tree, symlinks=True)
    return tree


@pytest.fixture
def brief(tmp_path) -> Path:
    path = tmp_path / "program.md"
    path.write_text("Make it fast.\n")
    return path


def agent(tmp_path: Path, old: str = OLD, new: str = NEW, mode: str = "describe") -> str:
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    return shlex.join([sys.executable, str(script), old, new, mode])


def make(command: str, brief: Path, **settings) -> CommandProposer:
    return CommandProposer(command, CommandConfig(brief=str(brief), **{"checks": False,
                                                                        **settings}))


def git(tree: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True).stdout


def test_agent_edits_the_surface_and_describes_it(worktree, brief, tmp_path):
    proposal = make(agent(tmp_path), brief).propose(worktree, [], CONTEXT)
    assert NEW in (worktree / RECIPE).read_text()
    assert proposal.description == "schedule: longer warmdown"
    assert proposal.category == "schedule"
    assert proposal.hypothesis == "decay later\n\nExpected: 3% faster"
    assert proposal.usage["wall_seconds"] >= 0
    # The description file lived outside the worktree: only the edit is in the diff.
    assert git(worktree, "status", "--porcelain").split() == ["M", RECIPE]


def test_an_agent_cannot_commit_its_edit_is_taken_with_a_default_description(
        worktree, brief, tmp_path):
    head = git(worktree, "rev-parse", "HEAD")
    proposal = make(agent(tmp_path, mode="commit"), brief).propose(worktree, [], CONTEXT)
    assert git(worktree, "rev-parse", "HEAD") == head
    assert NEW in (worktree / RECIPE).read_text()
    assert proposal.description == f"command: edit {RECIPE}" and proposal.category == "other"


def test_the_agent_writes_the_surface_and_nothing_else(worktree, brief, tmp_path):
    harness = (worktree / "train.py").read_text()
    proposal = make(agent(tmp_path, mode="escape"), brief).propose(worktree, [], CONTEXT)
    assert NEW in (worktree / RECIPE).read_text() and proposal is not None
    assert (worktree / "train.py").read_text() == harness
    assert not (Path.home() / "speedloop-x").exists()


def test_a_timeout_kills_the_agent_and_fails_the_proposal(worktree, brief):
    start = time.time()
    with pytest.raises(ProposalFailed, match=r"timed out after 1 s(.|\n)*started"):
        make("echo started; sleep 30 & sleep 30", brief, timeout_s=1).propose(
            worktree, [], CONTEXT)
    assert time.time() - start < 10


def test_a_failing_command_fails_with_its_output(worktree, brief):
    with pytest.raises(ProposalFailed, match=r"exited with status 3(.|\n)*boom"):
        make("echo boom >&2; exit 3", brief).propose(worktree, [], CONTEXT)


def test_an_exact_repeat_of_a_tried_change_is_refused(worktree, brief, tmp_path):
    recipe = worktree / RECIPE
    recipe.write_text(recipe.read_text().replace(OLD, NEW))
    tried = git(worktree, "diff")
    git(worktree, "checkout", "--", RECIPE)
    history = [{"experiment": 4, "description": "warmdown up", "diff": tried,
                "verdict": "reject", "decision": {"effect": 1.001, "reason": "no gain"}}]
    with pytest.raises(ProposalFailed, match="tried already: #4 reject x1.001: warmdown up"):
        make(agent(tmp_path), brief).propose(worktree, history, CONTEXT)


def test_an_edit_that_breaks_the_model_fails_the_quick_checks(worktree, brief, tmp_path):
    command = agent(tmp_path, new=OLD + " +")
    with pytest.raises(ProposalFailed, match="fails the quick checks(.|\n)*SyntaxError"):
        make(command, brief, checks=True).propose(worktree, [], CONTEXT)


def test_make_proposer_needs_the_command(brief):
    with pytest.raises(ValueError, match="needs the agent's command line"):
        make_proposer("command", None, {"brief": str(brief)})
    proposer = make_proposer("command", "claude -p", {"brief": str(brief), "timeout_s": 60})
    assert proposer.config.timeout_s == 60
