"""The research context: every tried candidate in the digest, the accepted diffs in full,
the champion's metrics with their spread, the hardware and the profile."""

import pytest

from agent.context import (
    history_digest,
    read_brief,
    research_context,
    stable_prompt,
)

DIFF = "diff --git a/model/optim.py b/model/optim.py\n--- a/model/optim.py\n+++ " \
       "b/model/optim.py\n@@ -1 +1 @@\n-steps = 5\n+steps = 6\n"


def _decision(effect, low, high, p, reason, loss=None):
    return {"verdict": "x", "effect": effect, "ci_low": low, "ci_high": high, "p_value": p,
            "reason": reason, "loss_delta": loss}


HISTORY = [
    {"experiment": None, "description": "baseline", "verdict": "accept", "diff": ""},
    {"experiment": 1, "description": "muon: 6 Newton-Schulz steps", "category": "optimizer",
     "verdict": "accept", "diff": DIFF,
     "decision": _decision(1.05, 1.02, 1.08, 0.001, "faster, loss no worse", -0.002)},
    {"experiment": 2, "description": "fused rms_norm kernel", "category": "kernel",
     "verdict": "reject", "diff": "diff --git a/kernels/x.py ...",
     "decision": _decision(0.98, 0.95, 1.01, 0.62, "no significant gain")},
    {"experiment": 3, "description": "edit train.py", "category": "other",
     "verdict": "refused", "diff": "",
     "decision": {"verdict": "refused", "reason": "touches train.py, outside the surface"}},
    {"experiment": 4, "description": "longer warmdown", "category": "schedule",
     "verdict": None, "state": "running", "diff": "", "decision": None},
]


def _result(tps, loss, ttt):
    return {"status": "ok", "tokens_per_sec": tps, "val_loss": loss, "time_to_target": ttt,
            "target_loss": 3.5, "device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3",
            "cpu": "x86_64", "torch_version": "2.13.0", "triton_version": "3.7.1",
            "kernels": "triton", "compile": True}


CONTEXT = {
    "preset": "gpu-small",
    "objective": "time-to-loss",
    "champion": {"experiment": 1, "description": "muon: 6 Newton-Schulz steps",
                 "speedup": 1.05},
    "champion_results": [_result(99_000, 3.40, 100.0), _result(101_000, 3.42, 102.0),
                         {"status": "crash"}],
    "profile": "aten::mm 41.0%\ntriton_rms_norm 7.5%",
}


def test_digest_lists_every_candidate_with_its_outcome():
    digest = history_digest(HISTORY)
    lines = digest.splitlines()
    assert len(lines) == 4  # the baseline is the champion's ancestor, not a candidate
    assert lines[0] == ("#1 [optimizer] accept x1.050 (CI 1.020-1.080, p=0.001), val loss "
                        "-0.0020: muon: 6 Newton-Schulz steps — faster, loss no worse")
    assert lines[1].startswith("#2 [kernel] reject x0.980 (CI 0.950-1.010, p=0.62): fused")
    assert lines[2] == ("#3 [other] refused: edit train.py — touches train.py, outside the "
                        "surface")
    assert lines[3] == "#4 [schedule] running: longer warmdown"


def test_a_long_history_keeps_the_most_recent_and_counts_the_rest():
    rows = [{"experiment": i, "description": f"idea {i}", "verdict": "reject"}
            for i in range(1, 101)]
    lines = history_digest(rows, max_lines=80).splitlines()
    assert lines[0] == "(20 earlier candidates not listed: 20 reject)"
    assert lines[1].startswith("#21 ") and lines[-1].startswith("#100 ")


def test_context_has_metrics_hardware_profile_and_accepted_diffs():
    text = research_context(CONTEXT, HISTORY)
    assert "Preset: gpu-small; objective: time-to-loss." in text
    assert "Champion: #1 'muon: 6 Newton-Schulz steps', x1.050 vs the baseline" in text
    assert "Target val loss: 3.5000" in text
    assert "over 2 run(s)" in text  # the crashed run is not a measurement
    assert "- tokens/s: 100,000 ± 1,414" in text
    assert "- time to target (s): 101.00 ± 1.41" in text
    assert "- val loss: 3.4100 ± 0.0141" in text
    assert "NVIDIA H100 80GB HBM3" in text and "kernels backend triton" in text
    assert "aten::mm 41.0%" in text
    assert "## #1 muon: 6 Newton-Schulz steps\n```diff\n" + DIFF.rstrip() in text
    assert "kernels/x.py" not in text  # rejected diffs are only listed, not shown
    for row in HISTORY[1:]:
        assert row["description"] in text


def test_first_candidate_context_is_explicit_about_what_is_missing():
    text = research_context({"preset": "cpu-tiny", "objective": "throughput"}, [])
    assert "No successful runs of the champion yet." in text
    assert "No candidates tried yet" in text and "No candidate has been accepted" in text
    assert "Hardware: not measured yet." in text


def test_brief_goes_into_the_stable_prompt(tmp_path):
    path = tmp_path / "program.md"
    path.write_text("Try FP8.\n")
    prompt = stable_prompt(read_brief(path))
    assert prompt.rstrip().endswith("Try FP8.") and "model/, kernels/" in prompt
    with pytest.raises(FileNotFoundError, match="research brief .*missing.md not found"):
        read_brief(tmp_path / "missing.md")
