"""The engine's checks before a run (bench/INTEGRITY.md): the advisory diff scan and the
fixed-file hashes, each on small real patches of the surface, and an honest candidate that
passes them. (What a run itself cannot be fooled by is tests/test_adversarial.py's.)

- The diff scan runs through the real engine: an edit of the session's worktree is
  submitted (`Session.submit`), captured as a commit and refused with the rule named in
  the ledger. It is an early refusal of the obvious; nothing relies on it.
- The fixed-file hashes run through the Measurer's benchmark: a commit that changes a fixed
  file fails as an integrity violation without train.py ever starting.
"""

from pathlib import Path

import pytest
from fakes.repo import git, working_tree_repo

from agent import integrity
from agent.proposers import Proposal

ROOT = Path(__file__).resolve().parent.parent
RECIPE, GPT, INIT = "model/recipe.py", "model/gpt.py", "model/__init__.py"


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {path}"
    path.write_text(text.replace(old, new))


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


# -- the cheats the diff scan must catch: (id, rule, file, edit) ------------------------------
# Each edit is a small real patch of the surface, applied to the champion's worktree.

RECIPE_LOGITS = "    def logits(self, x: torch.Tensor) -> torch.Tensor:\n"
RECIPE_BUILD = "    hp = PRESETS[preset]\n"
SCAN_CHEATS = [
    ("patched-perf-counter", "clock", INIT,
     lambda p: append(p, "import time\n_real = time.perf_counter\n"
                         "time.perf_counter = lambda: _real() * 0.5  # a faster clock\n")),
    ("from-time-import", "clock", RECIPE,
     lambda p: edit(p, "import torch\n", "import torch\nfrom time import monotonic\n")),
    ("noop-cuda-sync", "cuda-timing", RECIPE,
     lambda p: append(p, "torch.cuda.synchronize = lambda *args, **kwargs: None\n")),
    ("global-seed", "global-seed", RECIPE,
     lambda p: edit(p, RECIPE_BUILD, RECIPE_BUILD + "    torch.manual_seed(1234)\n")),
    ("aliased-seed", "global-seed", GPT,
     lambda p: append(p, "import numpy as xp\nxp.random.seed(7)\n")),
    ("gc-disable", "gc", GPT, lambda p: append(p, "import gc\n\ngc.disable()\n")),
    ("env-write", "env-write", RECIPE,
     lambda p: append(p, "import os\n\nos.environ['OMP_NUM_THREADS'] = '64'\n")),
    ("env-update", "env-write", INIT,
     lambda p: append(p, "from os import environ\n\nenviron.update(SPEEDLOOP_DATA='/tmp')\n")),
    ("subprocess", "subprocess", "kernels/__init__.py",
     lambda p: append(p, "import subprocess\n\nsubprocess.Popen(['sleep', '60'])\n")),
    ("file-read", "file-io", RECIPE,
     lambda p: append(p, "CACHED = open('/tmp/val_logits.bin', 'rb').read()\n")),
    ("import-train", "harness-import", RECIPE,
     lambda p: edit(p, RECIPE_LOGITS, RECIPE_LOGITS + "        import train  # noqa\n")),
    ("import-evaluator", "harness-import", INIT,
     lambda p: append(p, "from bench.evaluator import evaluate  # noqa\n")),
    ("sys-modules", "sys-modules", INIT,
     lambda p: append(p, "import sys\n\nsys.modules['train'].Clock.elapsed = "
                         "lambda self, sync=True: 1.0\n")),
    ("settrace", "tracing", GPT, lambda p: append(p, "import sys\n\nsys.settrace(None)\n")),
    ("thread", "threads", GPT, lambda p: append(p, "import threading  # noqa\n")),
    ("inspect", "inspect", INIT,
     lambda p: append(p, "import inspect\n\nCALLER = inspect.stack()\n")),
    ("dynamic-import", "dynamic-code", GPT,
     lambda p: append(p, "clock = __import__('ti' + 'me')\n")),
    ("builtins", "builtins", INIT, lambda p: append(p, "import builtins  # noqa\n")),
]  # fmt: skip


def honest_edit(p: Path) -> None:
    edit(p, "    matrix_lr: float = 0.04", "    matrix_lr: float = 0.05")


class Cheater:
    """The session's proposer, as the ledger names it: the tests submit its edits."""

    name = "test"


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """A session on a copy of the repository, with a baseline champion, ready to take
    candidates (nothing runs train.py; the fixed files' hashes are taken at its first run)."""
    from agent.config import SessionConfig
    from agent.judge import Decision
    from agent.loop import Session

    repo = working_tree_repo(tmp_path_factory.mktemp("repo"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        proposer = Cheater()
        config = SessionConfig(repo=str(repo))
        s = Session.create(tmp_path_factory.mktemp("s") / "run", config, proposer, say=print)
        base = s.ledger.add_candidate("baseline", parent_id=None, commit_sha=s.workspace.champion)
        decision = Decision("accept", "baseline", 1.0, None, None, None, None, 0, 3, None)
        s.ledger.record_decision(base, "accept", decision, speedup=1.0)
        yield s


def propose(session, description: str, path: str, change) -> dict:
    def edit(worktree: Path) -> Proposal:
        change(worktree / path)
        return Proposal(description, "it is faster", "other")

    return session.submit(edit)


@pytest.mark.parametrize("cheat", SCAN_CHEATS, ids=[c[0] for c in SCAN_CHEATS])
def test_the_scan_refuses_a_cheating_candidate(session, cheat):
    name, rule, path, change = cheat
    taken = propose(session, f"cheat {name}", path, change)
    assert taken["state"] == "refused" and taken["commit_sha"] is None
    reason = taken["decision"]["reason"]
    assert f"{path}:" in reason and f": {rule} (" in reason, reason
    assert taken["diff"]  # the refused diff is kept, for the proposer's history


def test_an_honest_candidate_is_taken(session):
    taken = propose(session, "matrix_lr 0.05", RECIPE, honest_edit)
    assert taken["state"] == "proposed" and taken["commit_sha"]
    source = lambda path: session.workspace.file_at(taken["commit_sha"], path)  # noqa: E731
    assert integrity.scan_diff(taken["diff"], source) == []


def test_allow_flagged_lets_a_flagged_candidate_run(session):
    session.config.allow_flagged = True
    try:
        taken = propose(session, "seed, allowed", RECIPE, SCAN_CHEATS[3][3])
    finally:
        session.config.allow_flagged = False
    assert taken["state"] == "proposed"
    assert any("allowed by allow_flagged" in str(e) for e in session.ledger.events())


def test_a_changed_fixed_file_fails_the_run_without_running_it(session):
    """A commit that changes train.py (made behind the workspace's back: capture refuses
    such a change) is caught by the hashes of session start, with the path named."""
    ws = session.workspace
    ws.checkout(session.ledger.champion()["commit_sha"])
    edit(ws.path / "train.py", "CPU_EXTRA_FRACTION, CPU_EXTRA_S = ",
         "CPU_EXTRA_FRACTION, CPU_EXTRA_S = 9.0, 9.0  # a kinder check: ")
    git(ws.path, "commit", "-qam", "edit the harness")
    commit = git(ws.path, "rev-parse", "HEAD").strip()
    ws.reset()
    cid = session.ledger.add_candidate(
        "edits train.py", parent_id=session.ledger.champion()["id"], commit_sha=commit
    )
    result = session.measurer.benchmark(session.ledger.candidate(cid), "screen")
    assert result["status"] == "integrity-violation"
    assert result["integrity"]["changed"] == ["train.py"]
    (run,) = session.ledger.runs_of(cid)
    assert run["outcome"] == "integrity-violation" and "train.py" in run["error"]
    assert not Path(run["log_path"]).exists()  # train.py never ran


def test_fixed_hashes_name_what_changed(tmp_path):
    repo = working_tree_repo(tmp_path / "repo")
    before = integrity.fixed_hashes(repo)
    assert "train.py" in before and "bench/evaluator.py" in before
    assert not any(p.startswith(("model/", "kernels/")) for p in before)
    assert integrity.changed_fixed(repo, before) == []
    append(repo / RECIPE, "# a surface edit is not a fixed-file change\n")
    append(repo / "bench/evaluator.py", "\nevaluate = None\n")
    (repo / "data/cache.py").unlink()
    assert integrity.changed_fixed(repo, before) == ["bench/evaluator.py", "data/cache.py"]


def test_the_regex_fallback_scans_a_file_that_does_not_parse():
    diff = (
        "diff --git a/model/x.py b/model/x.py\n--- a/model/x.py\n+++ b/model/x.py\n"
        "@@ -1,2 +1,4 @@\n context\n+import time\n+def broken(:\n-gone\n context\n"
        "+torch.manual_seed(0)\n"
    )
    findings = integrity.scan_diff(diff, lambda path: "import time\ndef broken(:\n")
    assert [(f.line, f.rule) for f in findings] == [(2, "clock"), (5, "global-seed")]
    # Lines that are not added, files outside the surface and non-Python files are ignored.
    other = diff.replace("model/x.py", "bench/x.py")
    assert integrity.scan_diff(other) == []
    assert integrity.scan_diff(diff.replace("model/x.py", "model/notes.md")) == []


def test_local_names_and_generators_are_not_flagged():
    text = (
        "import torch\n\n\ndef f(time, data):\n    g = torch.Generator().manual_seed(0)\n"
        "    return time + data, g\n"
    )
    lines = text.splitlines()
    diff = "diff --git a/model/x.py b/model/x.py\n--- /dev/null\n+++ b/model/x.py\n"
    diff += f"@@ -0,0 +1,{len(lines)} @@\n" + "".join(f"+{line}\n" for line in lines)
    assert integrity.scan_diff(diff, lambda path: text) == []
