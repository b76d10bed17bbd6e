"""The session workspace: its own worktree, candidates as commits under refs, the surface
enforced before anything runs, the user's checkout untouched."""

import subprocess
from pathlib import Path

import pytest

from agent.workspace import (
    EmptyChange,
    GitError,
    PatchError,
    RefusedChange,
    Workspace,
    apply_patch,
    git,
)
from bench.surface import in_surface, outside_surface


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    (root / "model").mkdir(parents=True)
    (root / "model" / "recipe.py").write_text("lr = 0.1\n")
    (root / "train.py").write_text("print('fixed')\n")
    (root / ".gitignore").write_text("runs/\n__pycache__/\n")
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=root, check=True)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "start")
    return root


def test_surface_paths():
    assert in_surface("model/gpt.py") and in_surface("kernels/new/op.py")
    assert not in_surface("train.py") and not in_surface("model")
    assert not in_surface("model/../train.py") and not in_surface("/model/x.py")
    assert outside_surface(["model/a.py", "bench/evaluator.py", "agent/loop.py"]) == [
        "bench/evaluator.py",
        "agent/loop.py",
    ]


def test_candidate_is_a_commit_under_a_ref_and_the_worktree_returns_to_champion(repo):
    ws = Workspace.create(repo, repo / "runs" / "s1" / "worktree", "s1")
    start = ws.champion
    (ws.path / "model/recipe.py").write_text("lr = 0.2\n")
    (ws.path / "kernels").mkdir()
    (ws.path / "kernels/fast.py").write_text("x = 1\n")
    cand = ws.capture(1, "try lr 0.2")
    assert cand.paths == ["kernels/fast.py", "model/recipe.py"]
    assert "+lr = 0.2" in cand.diff and "+x = 1" in cand.diff
    assert git(repo, "rev-parse", "refs/speedloop/s1/candidates/1").strip() == cand.commit
    assert git(repo, "rev-parse", f"{cand.commit}^").strip() == start
    # Not promoted: the worktree is back at the champion, the new file gone.
    assert (ws.path / "model/recipe.py").read_text() == "lr = 0.1\n"
    assert not (ws.path / "kernels/fast.py").exists()
    ws.move_champion(cand.commit)
    assert ws.champion == cand.commit
    # The user's checkout did not move.
    assert git(repo, "rev-parse", "HEAD").strip() == start
    assert (repo / "model" / "recipe.py").read_text() == "lr = 0.1\n"


def test_change_outside_surface_is_refused_with_the_path(repo):
    ws = Workspace.create(repo, repo / "runs" / "s2" / "worktree", "s2")
    (ws.path / "model/recipe.py").write_text("lr = 0.3\n")
    (ws.path / "train.py").write_text("print('patched clock')\n")
    with pytest.raises(RefusedChange, match="train.py") as info:
        ws.capture(1, "sneaky")
    assert info.value.paths == ["train.py"] and "patched clock" in info.value.diff
    assert (ws.path / "train.py").read_text() == "print('fixed')\n"
    with pytest.raises(GitError):
        git(repo, "rev-parse", "--verify", "refs/speedloop/s2/candidates/1")



def test_empty_change_and_patches(repo):
    ws = Workspace.create(repo, repo / "runs" / "s3" / "worktree", "s3")
    with pytest.raises(EmptyChange):
        ws.capture(1, "nothing")
    patch = "--- a/model/recipe.py\n+++ b/model/recipe.py\n@@ -1 +1 @@\n-lr = 0.1\n+lr = 0.5\n"
    apply_patch(ws.path, patch)
    cand = ws.capture(2, "patch")
    assert "+lr = 0.5" in cand.diff
    with pytest.raises(PatchError, match="recipe.py"):
        apply_patch(ws.path, patch.replace("0.1", "0.9"))


def test_open_for_resume(repo):
    path = repo / "runs" / "s4" / "worktree"
    Workspace.create(repo, path, "s4")
    assert Workspace.open(repo, path, "s4").champion
    with pytest.raises(FileNotFoundError, match="cannot be resumed"):
        Workspace.open(repo, repo / "runs" / "nope", "s4")


def test_a_creation_killed_half_way_is_finished_from_the_branch_it_made(repo):
    """A kill between `git branch` and `git worktree add` (or during the add) left the
    branch without its worktree: creating again finishes the job from that branch, even
    when the user's HEAD has moved since."""
    start = git(repo, "rev-parse", "HEAD").strip()
    git(repo, "branch", "speedloop/s5/champion", start)
    (repo / "model" / "recipe.py").write_text("lr = 0.7\n")
    git(repo, "commit", "-q", "-am", "the user goes on")
    path = repo / "runs" / "s5" / "worktree"
    path.mkdir(parents=True)
    (path / "half.py").write_text("a worktree add that was killed\n")
    ws = Workspace.create(repo, path, "s5")
    assert ws.champion == start and (ws.path / "model/recipe.py").read_text() == "lr = 0.1\n"
    assert not (ws.path / "half.py").exists()
    assert Workspace.create(repo, path, "s5").champion == start  # and again: nothing to do
