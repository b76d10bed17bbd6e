"""The proposers that need no LLM: the knob sweep edits the real recipe file; patches
apply in order and a patch that does not fit is reported, not skipped silently."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.judge import Decision
from agent.ledger import Ledger
from agent.proposers import PatchesProposer, ProposalFailed, SweepProposer, make_proposer
from agent.proposers.knobs import RecipeText, check, edits, valid_choices
from agent.proposers.sweep import (
    RECIPE,
    point_key,
    read_knobs,
    read_value,
    recipe_at,
    warm_step,
    write_value,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def worktree(tmp_path) -> Path:
    """A git repository holding a copy of model/, its first commit the baseline."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "model", tree / "model", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q"], cwd=tree, check=True)
    commit(tree, "baseline")
    return tree


def commit(tree: Path, message: str) -> str:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tree)]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", message], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def presets_of(tree: Path) -> dict:
    """PRESETS of the recipe in `tree`, imported for real in a fresh interpreter."""
    code = (f"import sys, json, dataclasses; sys.path.insert(0, {str(tree)!r}); "
            "import model.recipe as r; "
            "print(json.dumps({k: dataclasses.asdict(v) for k, v in r.PRESETS.items()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_knob_space_is_read_from_the_recipe_without_importing_it(worktree):
    code = ("import sys; from pathlib import Path; from agent.proposers.sweep import read_knobs; "
            f"k = read_knobs(Path({str(worktree / RECIPE)!r})); "
            "print(k['n_layer'].scale, k['n_layer'].choices[:3], k['matrix_lr'].scale, "
            "k['warmdown'].high, 'model' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["int", "(1,", "2,", "3)", "log", "0.9", "False"], out.stderr


@pytest.mark.parametrize("knobs, message", [
    ("", "declares no KNOBS"),
    ("KNOBS = {'n_layer': (1, 4, 'cubic')}",
     r"KNOBS\['n_layer'\] = \(1, 4, 'cubic'\) is not a knob"),
    ("KNOBS = {'n_layer': [4, 2]}", "list of increasing positive integers"),
    ("KNOBS = {'matrix_lr': (0.0, 0.3, 'log')}", "a log range must start above 0"),
    ("KNOBS = {'dropout': (0.0, 0.5, 'linear')}", "knob 'dropout' has no value for preset"),
])
def test_a_bad_knob_declaration_names_the_file_the_value_and_the_fix(worktree, knobs, message):
    recipe = worktree / RECIPE
    text = recipe.read_text()
    start, end = text.index("KNOBS = {"), text.index("}\n", text.index("KNOBS = {")) + 2
    recipe.write_text(text[:start] + knobs + "\n" + text[end:])
    with pytest.raises(ValueError, match=message) as info:
        SweepProposer().propose(worktree, [], {"preset": "cpu-tiny"})
    assert str(recipe) in str(info.value)


def test_integer_knobs_offer_only_valid_shapes(worktree):
    recipe = worktree / RECIPE
    tiny = RecipeText(recipe.read_text(), "cpu-tiny")
    small = RecipeText(recipe.read_text(), "gpu-small")
    # The head dim is kept: 32 on cpu-tiny (96 is 3 heads), 64 on gpu-small (96 is no count).
    assert valid_choices(tiny, tiny.knobs["n_embd"], 128, 1)[:3] == [64, 96, 128]
    assert 96 not in valid_choices(small, small.knobs["n_embd"], 1024, 1)
    assert 192 in valid_choices(small, small.knobs["n_embd"], 1024, 1)
    # A batch must split over the GPUs.
    assert valid_choices(tiny, tiny.knobs["batch_size"], 128, 8)[0] == 8
    # A step may take at most a 16th of the token budget (or as much as the champion's).
    assert valid_choices(tiny, tiny.knobs["batch_size"], 128, 1, 65536) == [4, 8, 16, 32]
    assert valid_choices(tiny, tiny.knobs["seq_len"], 128, 1, 65536) == [64, 128, 256]
    assert valid_choices(tiny, tiny.knobs["batch_size"], 128, 1, 8192) == [4, 8, 16]
    with pytest.raises(ValueError, match="a step of 32 x 256 tokens is over 4,096"):
        edits(tiny, {"batch_size": 32, "seq_len": 256}, 128, 1, 65536)
    assert edits(small, {"n_embd": 768}, 1024) == {"model.n_embd": 768, "model.n_head": 12}
    with pytest.raises(ValueError, match="16 does not split over 3 GPUs: the champion itself"):
        SweepProposer().propose(worktree, [], {"preset": "cpu-tiny", "gpus": 3})
    with pytest.raises(ValueError, match="not a multiple of the head dim 64"):
        edits(small, {"n_embd": 96}, 1024)
    with pytest.raises(ValueError, match="does not split over 3 GPUs"):
        edits(tiny, {"batch_size": 8}, 128, gpus=3)
    with pytest.raises(ValueError, match="does not divide batch_size"):
        check({"batch_size": 12, "micro_batch_size": 8}, 128, 1, "x")
    with pytest.raises(ValueError, match="does not cover"):
        check({"seq_len": 256, "model.seq_len": 128}, 128, 1, "x")
    with pytest.raises(ValueError, match="not an even head dim"):
        check({"model.n_embd": 96, "model.n_head": 32}, 128, 1, "x")


def test_shape_edits_give_the_intended_config_when_imported(worktree):
    recipe = worktree / RECIPE
    tiny = RecipeText(recipe.read_text(), "cpu-tiny")
    point = {"n_layer": 2, "n_embd": 192, "seq_len": 256, "batch_size": 8, "matrix_lr": 0.08}
    recipe.write_text(tiny.with_values(edits(tiny, point, 128)))
    small = RecipeText(recipe.read_text(), "gpu-small")
    recipe.write_text(small.with_values(edits(small, {"batch_size": 256, "seq_len": 512},
                                              1024)))
    got = presets_of(worktree)
    model = got["cpu-tiny"]["model"]
    assert (model["n_layer"], model["n_embd"], model["n_head"], model["seq_len"]) == (
        2, 192, 6, 256)
    assert (got["cpu-tiny"]["batch_size"], got["cpu-tiny"]["micro_batch_size"],
            got["cpu-tiny"]["seq_len"], got["cpu-tiny"]["matrix_lr"]) == (8, 8, 256, 0.08)
    # gpu-small accumulates micro-batches of 64: it keeps them (memory); its model's
    # rotary table still covers the evaluation's rows of 1024.
    assert (got["gpu-small"]["batch_size"], got["gpu-small"]["micro_batch_size"],
            got["gpu-small"]["seq_len"], got["gpu-small"]["model"]["seq_len"]) == (
        256, 64, 512, 1024)
    # matrix_lr is a default that gpu-small shares; gpt2-124m sets its own.
    assert got["gpu-small"]["matrix_lr"] == 0.08 and got["gpt2-124m"]["matrix_lr"] == 0.05
    assert got["gpt2-124m"]["model"]["n_layer"] == 12


def test_a_knob_the_preset_sets_itself_is_edited_in_its_entry(worktree):
    """gpt2-124m sets embed_lr in its PRESETS entry: the sweep edits it there (a new default
    would not reach that preset's runs), and leaves the default to the other presets."""
    recipe = worktree / RECIPE
    write_value(recipe, "embed_lr", 1.2, preset="gpt2-124m")
    got = presets_of(worktree)
    assert got["gpt2-124m"]["embed_lr"] == 1.2 and got["cpu-tiny"]["embed_lr"] == 0.3
    assert read_value(recipe, "embed_lr", "gpt2-124m") == 1.2


def test_the_warm_start_moves_one_knob_at_a_time_in_order_and_the_edit_takes_effect(worktree):
    recipe = worktree / RECIPE
    knobs = read_knobs(recipe)
    first = next(iter(knobs))
    before = read_value(recipe, first)
    proposal = SweepProposer().propose(worktree, [], {})
    after = read_value(recipe, first)
    assert after == knobs[first].steps(before)[0] != before
    assert proposal.description == f"sweep: {first} {before:g} -> {after:g}"
    assert presets_of(worktree)["cpu-tiny"]["model"][first] == after


CONTEXT = {"preset": "cpu-tiny", "budget_tokens": 65536}  # as make demo's session has it


class Session:
    """A ledger and a repository as a session has them: every proposal made on the
    champion, committed, recorded and decided on its speed relative to the champion's
    (`outcome(point)`: a speed, None for a failed run)."""

    def __init__(self, tree: Path, ledger_path: Path):
        self.tree = tree
        self.ledger = Ledger.create(ledger_path, {"preset": "cpu-tiny"})
        self.champion = commit(tree, "champion")
        base = self.ledger.add_candidate("baseline", parent_id=None, commit_sha=self.champion)
        self.ledger.record_decision(base, "accept", decision(1.0), speedup=1.0)

    def step(self, proposer: SweepProposer, outcome) -> str | None:
        subprocess.run(["git", "checkout", "-q", self.champion, "--", "model"], cwd=self.tree,
                       check=True)
        proposal = proposer.propose(self.tree, self.ledger.candidates(), CONTEXT)
        if proposal is None:
            return None
        sha = commit(self.tree, proposal.description)
        parent = self.ledger.champion()
        cid = self.ledger.add_candidate(proposal.description, parent_id=parent["id"],
                                        commit_sha=sha, proposer="sweep",
                                        hypothesis=proposal.hypothesis)
        speed = outcome(RecipeText((self.tree / RECIPE).read_text(), "cpu-tiny").point())
        effect = None if speed is None else speed / outcome(
            recipe_at(self.tree, self.champion, "cpu-tiny").point())
        if effect is None:
            self.ledger.record_decision(cid, "reject", decision(None))
        elif effect > 1.2:
            self.ledger.record_decision(cid, "accept", decision(effect),
                                        speedup=parent["speedup"] * effect)
            self.champion = sha
        else:
            self.ledger.record_decision(cid, "reject", decision(effect))
        return proposal.description


def decision(effect):
    return Decision("accept" if effect and effect > 1.2 else "reject", "test", effect, None,
                    None, None, None, 3, 3, 0.0)


def shallow_and_fast(point) -> float | None:
    """A made-up landscape: fewer layers and a higher matrix_lr are faster; a batch of 4 fails."""
    if point["batch_size"] == 4:
        return None
    return (4 / point["n_layer"]) ** 0.3 * (point["matrix_lr"] / 0.04) ** 0.2


def tried_points(session: Session) -> list[tuple]:
    return [point_key(recipe_at(session.tree, c["commit_sha"], "cpu-tiny").point())
            for c in session.ledger.candidates() if c["commit_sha"]]


def test_tpe_proposes_untried_valid_points_deterministically_and_resumes(worktree, tmp_path):
    session = Session(worktree, tmp_path / "ledger.sqlite")
    for _ in range(6):  # a warm start of 4, then the sampler
        assert session.step(SweepProposer(seed=3, warm_start=4), shallow_and_fast)
    made = session.ledger.candidates()[1:]
    assert [c["hypothesis"].split(":")[0] for c in made[:4]] == ["warm start"] * 4
    assert all(c["hypothesis"].startswith("TPE (seed 3) over") for c in made[4:])
    assert made[0]["verdict"] == "accept" and made[0]["description"] == "sweep: n_layer 4 -> 2"
    # A fresh proposer on the same ledger (a resume) with the same seed proposes the same
    # point, twice; another seed another one; each is new to the session and valid.
    champion_text = subprocess.run(["git", "show", f"{session.champion}:{RECIPE}"],
                                   cwd=worktree, capture_output=True, text=True).stdout
    made = {}
    for seed in (3, 3, 4):
        (worktree / RECIPE).write_text(champion_text)
        proposal = SweepProposer(seed=seed, warm_start=4).propose(
            worktree, session.ledger.candidates(), CONTEXT)
        assert "TPE (seed" in proposal.hypothesis
        text = (worktree / RECIPE).read_text()
        point = RecipeText(text, "cpu-tiny").point()
        assert point_key(point) not in tried_points(session)
        made.setdefault(seed, set()).add(text)
    assert len(made[3]) == 1 and made[3] != made[4]
    got = presets_of(worktree)["cpu-tiny"]
    assert got["model"]["n_embd"] == got["model"]["n_head"] * 32
    assert got["batch_size"] % got["micro_batch_size"] == 0
    # Resumed: fresh proposers go on, never repeating a point of the session.
    for _ in range(6):
        assert session.step(SweepProposer(seed=3, warm_start=4), shallow_and_fast)
    points = tried_points(session)
    assert len(points) == len(set(points)) == 13
    assert all(dict(p)["batch_size"] * dict(p)["seq_len"] <= 65536 / 16 for p in points)


def test_the_warm_start_steps_each_knob_in_order_then_hands_over(worktree, tmp_path):
    """By default one proposal per knob, each its first step in KNOBS order, then the TPE
    sampler; a point tried once is never proposed again."""
    session = Session(worktree, tmp_path / "ledger.sqlite")
    knobs = read_knobs(worktree / RECIPE)
    made = [session.step(SweepProposer(), lambda point: 1.0) for _ in range(len(knobs) + 1)]
    assert [d.split()[1] for d in made[:len(knobs)]] == list(knobs)
    assert session.ledger.candidates()[-1]["hypothesis"].startswith("TPE (seed 0) over 10")
    points = tried_points(session)
    assert len(points) == len(set(points)) == len(knobs) + 2
    # Every first step tried, the warm start goes on with the second ones.
    champion = recipe_at(worktree, session.champion, "cpu-tiny").point()
    tried = {point_key({**champion, n: k.steps(champion[n])[0]}) for n, k in knobs.items()}
    assert warm_step(knobs, champion, tried) == {**champion, "n_layer": 8}


def test_steps_stay_in_range():
    knobs = read_knobs(ROOT / RECIPE)
    assert knobs["matrix_lr"].steps(0.04) == [0.08, 0.02]
    assert knobs["matrix_lr"].steps(0.2) == [0.3, 0.1]
    assert knobs["momentum_warmup"].steps(0.0) == [0.1]
    assert knobs["n_layer"].steps(4) == [2, 8]
    assert knobs["n_layer"].steps(1) == [2]
    assert knobs["n_embd"].steps(192) == [96, 384]


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


def test_null_candidates_change_nothing_and_the_judge_finds_no_effect(fake_repo, tmp_path,
                                                                     monkeypatch):
    """--proposer null: an A/A session. Each candidate adds one comment line to the recipe,
    each its own; on the fake harness (1% noise) none of them is found faster."""
    from agent.config import SessionConfig
    from agent.loop import Session

    monkeypatch.setenv("SPEEDLOOP_LOCKS", str(tmp_path / "locks"))
    config = SessionConfig(repo=str(fake_repo), objective="throughput", baseline_runs=2,
                           proposer="null", wandb="disabled", experiments=4)
    s = Session.create(tmp_path / "s", config, make_proposer("null"), say=lambda text: None)
    s.run()
    made = s.ledger.candidates()[1:]
    assert [c["description"] for c in made] == [f"no-op {n} (A/A)" for n in range(1, 5)]
    assert [c["verdict"] for c in made] == ["reject"] * 4
    for n, c in enumerate(made, 1):
        added = [line for line in c["diff"].splitlines()
                 if line.startswith("+") and not line.startswith("+++")]
        assert added == [f"+# A/A check {n}: this line changes nothing the recipe does."]
        assert "model/recipe.py" in c["diff"]
