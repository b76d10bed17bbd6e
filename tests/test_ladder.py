"""The nanogpt-speedrun ladder: its manifest, its patches in order, two training steps of
cpu-tiny at every rung, the integrity scan of every patch, and the loader's errors."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent import integrity
from agent.workspace import apply_patch
from bench.leaderboards import LadderError, ladder_names, load_ladder, surface_fingerprint
from bench.locks import LOCK_HELD_ENV
from tests.fakes.repo import ROOT, git, working_tree_repo

LADDER = load_ladder("nanogpt-speedrun")

# Runs train.py's main for each rung's tree in turn, in one process (a process per rung costs
# ~10 s of imports and first-call overhead on two cores). Before each rung, every module
# imported from the previous tree is dropped, so the rung's own model/ and kernels/ run.
# It also checks that the rung's optimizers cover each parameter exactly once.
DRIVER = r"""
import importlib, json, os, sys
previous = None
for tree, out in zip(sys.argv[1::2], sys.argv[2::2]):
    if previous:
        for name, module in list(sys.modules.items()):
            if (getattr(module, "__file__", None) or "").startswith(previous + os.sep):
                del sys.modules[name]
        sys.path.remove(previous)
    sys.path.insert(0, tree)
    importlib.invalidate_caches()
    os.chdir(tree)
    previous = tree
    import torch, train
    from model import build_recipe
    code = train.main(["--preset", "cpu-tiny", "--budget-tokens", "4096", "--out", out])
    recipe = build_recipe("cpu-tiny", torch.device("cpu"), 512, False)
    owned = [id(p) for opt in recipe.optimizers for g in opt.param_groups for p in g["params"]]
    params = {id(p) for p in recipe.model.parameters()}
    print("RUNG " + json.dumps(dict(tree=tree, code=code, model=train.__file__,
          optimized_once=sorted(owned) == sorted(params))), flush=True)
"""


def test_manifest_is_complete_and_fits_the_baseline():
    assert "nanogpt-speedrun" in ladder_names()
    assert len(LADDER.rungs) >= 8
    assert LADDER.target_loss == 3.28 and LADDER.p_value == 0.01
    ids = [r.id for r in LADDER.rungs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for rung in LADDER.rungs:
        assert rung.kind in ("ml", "systems")
        assert rung.patch.is_file() and rung.patch.parent == LADDER.root
        assert rung.title and rung.reference and rung.published
        if rung.published_speedup is None:  # no figure of its own: the text says why
            assert "not found" in rung.published, rung.id
        else:
            assert 1.0 < rung.published_speedup < 2.0, rung.id
    assert LADDER.base_surface == surface_fingerprint(ROOT), (
        "model/ or kernels/ changed since the nanogpt-speedrun ladder was made: its first "
        "patch no longer applies to this baseline. Rebuild the ladder: in a clone, apply the "
        "patches of bench/leaderboards/nanogpt-speedrun in order onto the new baseline "
        "(git apply -3, fix conflicts), commit each, regenerate each with "
        "`git diff HEAD~1 -- model kernels`, and set base_surface to "
        "bench.leaderboards.surface_fingerprint of the new baseline repository"
    )


@pytest.fixture(scope="module")
def rung_trees(tmp_path_factory) -> list[Path]:
    """A full copy of the working tree at every rung: the patches applied in order."""
    tmp = tmp_path_factory.mktemp("ladder")
    repo = working_tree_repo(tmp / "repo")
    trees = []
    for rung in LADDER.rungs:
        apply_patch(repo, rung.patch.read_text())  # PatchError names the rung's hunk
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", rung.id)
        tree = tmp / rung.id
        shutil.copytree(repo, tree, ignore=shutil.ignore_patterns(".git", "__pycache__"))
        trees.append(tree)
    return trees


def test_patches_apply_in_order_and_touch_only_the_surface(rung_trees):
    for rung in LADDER.rungs:
        paths = [line.split(" b/")[-1] for line in rung.patch.read_text().splitlines()
                 if line.startswith("diff --git ")]  # fmt: skip
        assert paths, rung.id
        assert all(p.split("/")[0] in ("model", "kernels") for p in paths), (rung.id, paths)
    # The last tree differs from the baseline only in the surface, so the fixed side is
    # the one every rung is measured with.
    last = rung_trees[-1]
    for fixed in ("train.py", "bench/evaluator.py", "data/loader.py"):
        assert (last / fixed).read_bytes() == (ROOT / fixed).read_bytes()


def test_every_patch_passes_the_integrity_scan(rung_trees):
    for rung, tree in zip(LADDER.rungs, rung_trees):
        diff = rung.patch.read_text()
        assert integrity.added_lines(diff), rung.id
        findings = integrity.scan_diff(diff, lambda path, tree=tree: (tree / path).read_text())
        assert findings == [], f"{rung.id}: {integrity.describe(findings)}"


def test_every_rung_trains_on_cpu_tiny(rung_trees, data_cache, tmp_path):
    # Two drivers, each on half of the rungs, at one thread each: both cores of a two-core
    # machine (OpenMP threads spinning against other processes cost far more than a
    # second core gains). They share the CPU, so neither takes its lock: told it is held.
    env = {**os.environ, "SPEEDLOOP_DATA": str(data_cache), "OMP_NUM_THREADS": "1",
           LOCK_HELD_ENV: "cpu"}
    outs = [tmp_path / f"{tree.name}.json" for tree in rung_trees]
    args = [str(a) for pair in zip(rung_trees, outs) for a in pair]
    half = 2 * (len(rung_trees) // 2)  # args hold a (tree, out) pair per rung
    drivers = [subprocess.Popen([sys.executable, "-c", DRIVER, *part], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for part in (args[:half], args[half:]) if part]
    reports = []
    for proc in drivers:
        out, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, err[-4000:]
        reports += [json.loads(line[5:]) for line in out.splitlines() if line.startswith("RUNG ")]
    assert [Path(r["tree"]) for r in reports] == rung_trees
    for rung, tree, report, out in zip(LADDER.rungs, rung_trees, reports, outs):
        assert Path(report["model"]).parent == tree  # this rung's code ran, not another's
        result = json.loads(out.read_text())
        assert report["code"] == 0 and result["status"] == "ok", (rung.id, result["integrity"])
        assert result["steps"] >= 2 and result["tokens"] >= 4096, rung.id
        assert math.isfinite(result["val_loss"]) and result["val_loss"] < 9.0, rung.id
        assert report["optimized_once"], f"{rung.id}: a parameter has no optimizer, or two"


def test_fp8_head_matches_the_plain_matmul(rung_trees):
    """The FP8 head runs only on GPUs (a no-op on CPU), but its arithmetic can be checked
    here: torch._scaled_mm has a CPU implementation."""
    check = """
import torch
from model.fp8 import fp8_linear
x = torch.randn(64, 128, requires_grad=True)
w = (0.05 * torch.randn(256, 128)).requires_grad_()
g = torch.randn(64, 256)
(fp8_linear(x, w).float() * g).sum().backward()
fp8 = [x.grad, w.grad]
x.grad = w.grad = None
ref = x @ w.T
(ref * g).sum().backward()
def err(a, b): return ((a.float() - b).norm() / b.norm()).item()
print(err(fp8_linear(x, w), ref.detach()), err(fp8[0], x.grad), err(fp8[1], w.grad))
"""
    tree = next(t for t in rung_trees if (t / "model" / "fp8.py").is_file())
    proc = subprocess.run(
        [sys.executable, "-c", check], cwd=tree, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = [float(v) for v in proc.stdout.split()]
    # e4m3 keeps 3 mantissa bits and e5m2 2: a few percent of relative error, not more.
    assert all(e < 0.1 for e in errors), errors


# -- the loader's errors name the file, the rung and the field ---------------------------------

GOOD_RUNG = """
[[rung]]
id = "01-a"
title = "a"
patch = "01.patch"
kind = "ml"
reference = "r"
published = "not found"
"""
HEADER = """name = "t"
title = "t"
reference = "r"
target_loss = 3.28
p_value = 0.01
base_surface = "{}"
""".format("0" * 64)


@pytest.mark.parametrize(
    "manifest, rung, field",
    [
        (HEADER + GOOD_RUNG.replace('"ml"', '"magic"'), "01-a", "kind"),
        (HEADER + GOOD_RUNG.replace('"01.patch"', '"02.patch"'), "01-a", "patch"),
        (HEADER + GOOD_RUNG + GOOD_RUNG, "01-a", "duplicate id"),
        (HEADER + GOOD_RUNG.replace('published = "not found"\n', ""), "01-a", "published"),
        (HEADER + GOOD_RUNG.replace("kind", "knd"), "01-a", "knd"),
        (HEADER + GOOD_RUNG + "published_speedup = -1\n", "01-a", "published_speedup"),
        (HEADER.replace("p_value = 0.01\n", "") + GOOD_RUNG, None, "p_value"),
        (HEADER.replace("0" * 64, "abc") + GOOD_RUNG, None, "base_surface"),
    ],
    ids=["kind", "missing-patch", "duplicate", "missing-field", "unknown-field", "speedup",
         "missing-ladder-field", "fingerprint"],
)  # fmt: skip
def test_broken_manifests_name_file_rung_and_field(tmp_path, manifest, rung, field):
    (tmp_path / "01.patch").write_text("")
    (tmp_path / "manifest.toml").write_text(manifest)
    with pytest.raises(LadderError) as e:
        load_ladder(tmp_path)
    message = str(e.value)
    assert str(tmp_path / "manifest.toml") in message and field in message
    if rung is not None:
        assert rung in message


def test_unknown_ladder_lists_the_known_ones():
    with pytest.raises(LadderError, match="nanogpt-speedrun"):
        load_ladder("no-such-ladder")


def test_fingerprint_follows_the_surface_only(tmp_path):
    for name in ("model", "kernels", "bench"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.py").write_text("x = 1\n")
    before = surface_fingerprint(tmp_path)
    (tmp_path / "bench" / "a.py").write_text("x = 2\n")
    (tmp_path / "model" / "notes.txt").write_text("not python")
    assert surface_fingerprint(tmp_path) == before
    (tmp_path / "kernels" / "a.py").write_text("x = 2\n")
    assert surface_fingerprint(tmp_path) != before
