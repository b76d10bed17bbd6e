"""The proposers that need no LLM: the knob sweep edits the real recipe file; patches
apply in order and a patch that does not fit is reported, not skipped silently."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.proposers import PatchesProposer, ProposalFailed, SweepProposer, make_proposer
from agent.proposers.sweep import read_knobs, read_value, steps

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def worktree(tmp_path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "model", tree / "model", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q"], cwd=tree, check=True)
    return tree


def test_sweep_edits_the_recipe_and_the_edit_takes_effect(worktree):
    recipe = worktree / "model" / "recipe.py"
    knobs = read_knobs(recipe)
    first = next(iter(knobs))
    before = read_value(recipe, first)
    proposal = SweepProposer().propose(worktree, [], {})
    after = read_value(recipe, first)
    assert after == steps(before, *knobs[first])[0] != before
    assert proposal.description == f"sweep: {first} {before:g} -> {after:g}"
    # The edited file is still the recipe: it imports and carries the new default.
    code = f"import sys; sys.path.insert(0, '{worktree}'); import model.recipe as r; "
    code += f"print(r.Hyperparameters.__dataclass_fields__['{first}'].default)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert float(out.stdout) == after, out.stderr


def test_sweep_leaves_alone_the_knobs_a_preset_sets_itself(worktree):
    """gpt2-124m sets embed_lr and matrix_lr in its PRESETS entry: a new default of either
    would be a no-op on that preset that still costs a whole judge cycle."""
    from agent.proposers.sweep import overridden

    recipe = worktree / "model" / "recipe.py"
    assert overridden(recipe, "gpt2-124m") >= {"embed_lr", "matrix_lr"}
    assert overridden(recipe, "cpu-tiny") & set(read_knobs(recipe)) == set()
    original = recipe.read_text()
    history, turned = [], set()
    while (proposal := SweepProposer().propose(worktree, history, {"preset": "gpt2-124m"})):
        turned.add(proposal.description.split()[1])
        history.append({"description": proposal.description})
        recipe.write_text(original)  # each proposal is made on the champion
    assert turned and not turned & {"embed_lr", "matrix_lr"}


def test_sweep_skips_what_was_tried_and_ends(worktree):
    recipe = worktree / "model" / "recipe.py"
    original = recipe.read_text()
    history, seen = [], set()
    while True:
        recipe.write_text(original)  # every proposal starts from the same champion
        proposal = SweepProposer().propose(worktree, history, {})
        if proposal is None:
            break
        assert proposal.description not in seen
        seen.add(proposal.description)
        history.append({"description": proposal.description})
    assert len(seen) == 2 * len(read_knobs(recipe))  # one step up and one down per knob


def test_steps_stay_in_range():
    assert steps(0.04, 0.005, 0.3, "log") == [0.08, 0.02]
    assert steps(0.2, 0.005, 0.3, "log") == [0.3, 0.1]
    assert steps(0.0, 0.0, 0.5, "linear") == [0.1]


def _patch(old: str, new: str) -> str:
    return (
        "From 1 Mon Sep 17 00:00:00 2001\nSubject: [PATCH] change lr\n\n---\n"
        "--- a/model/recipe.py\n+++ b/model/recipe.py\n@@ -1 +1 @@\n"
        f"-{old}\n+{new}\n"
    )


def test_patches_apply_in_order_and_a_misfit_is_reported(tmp_path):
    tree = tmp_path / "tree"
    (tree / "model").mkdir(parents=True)
    (tree / "model" / "recipe.py").write_text("lr = 1\n")
    subprocess.run(["git", "init", "-q"], cwd=tree, check=True)
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "01-up.patch").write_text(_patch("lr = 1", "lr = 2"))
    (patches / "02-misfit.patch").write_text(_patch("lr = 7", "lr = 8"))
    proposer = make_proposer("patches", str(patches))
    first = proposer.propose(tree, [], {})
    assert first.description == "patch 01-up.patch: change lr"
    assert (tree / "model" / "recipe.py").read_text() == "lr = 2\n"
    (tree / "model" / "recipe.py").write_text("lr = 1\n")
    history = [{"description": first.description}]
    with pytest.raises(ProposalFailed, match="02-misfit.patch") as info:
        proposer.propose(tree, history, {})
    history.append({"description": info.value.description})
    assert proposer.propose(tree, history, {}) is None


def test_bad_proposer_arguments():
    with pytest.raises(ValueError, match="unknown proposer"):
        make_proposer("genius")
    with pytest.raises(ValueError, match="needs a directory"):
        make_proposer("patches")
    with pytest.raises(FileNotFoundError):
        PatchesProposer("/nonexistent/dir")
