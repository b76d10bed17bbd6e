"""report.md, progress.png, results.tsv and the status text, from a ledger of fake runs."""

import math
import struct

import pytest

from agent.judge import Decision
from agent.ledger import Ledger
from agent.report import write_report
from agent.rundir import LEDGER_FILE
from agent.stats import speedup_vs_baseline
from agent.status import status_text

DIFF_ACCEPTED = """--- a/model/recipe.py
+++ b/model/recipe.py
@@ -1 +1 @@
-lr = 0.01
+lr = 0.02
```
"""


def result(seed: int, time_to_target: float | None, val_loss: float = 3.30) -> dict:
    """A train.py result of the fields the report reads."""
    return {"status": "ok", "seed": seed, "time_to_target": time_to_target,
            "train_seconds": time_to_target or 20.0, "tokens_per_sec": 9000.0,
            "val_loss": val_loss, "val_bpb": val_loss / 3, "mfu": None,
            "peak_memory_bytes": 3 * 2**30, "untimed": {"startup": 1.0, "evaluation": 0.5},
            "curve": [{"tokens": 1000 * i, "seconds": 2.0 * i, "val_loss": 5.0 - i / 2,
                       "val_bpb": 1.5} for i in range(4)]}


def decision(verdict: str, effect: float | None, reason: str) -> Decision:
    ci = (None, None) if effect is None else (effect * 0.95, effect * 1.05)
    return Decision(verdict, reason, effect, *ci, None if effect is None else 0.01, 0.02, 3,
                    3, None if effect is None else 0.001)


def run(ledger, cand, role, seed, outcome="ok", res=None, error=None):
    run_id = ledger.start_run(cand, role, seed, f"logs/{cand}-{seed}.log")
    ledger.finish_run(run_id, outcome, res, error, wall_seconds=21.0)
    return run_id


def build_session(run_dir) -> dict:
    """A session: baseline (3 runs), accepted, rejected, crashed, refused, early-stopped, and
    one candidate with a run in flight. Returns the candidates' ids by name."""
    ledger = Ledger(run_dir / LEDGER_FILE)
    ledger.set_session({"preset": "cpu-tiny", "objective": "time-to-loss", "proposer": "sweep",
                        "experiments": 8, "judge": {"alpha": 0.05}})
    ids = {"base": ledger.add_candidate("the recipe as cloned", parent_id=None,
                                        commit_sha="a" * 40, proposer="-")}
    for seed, t in [(1, 20.0), (2, 22.0), (3, 18.0)]:
        run(ledger, ids["base"], "baseline", seed, res=result(seed, t))
    ledger.record_decision(ids["base"], "accept", {"verdict": "accept", "reason": "baseline"},
                  speedup=1.0)

    ids["fast"] = ledger.add_candidate(
        "lr 0.02 | wider [warmup]", parent_id=ids["base"], commit_sha="b" * 40,
        ref="refs/speedloop/c2", diff=DIFF_ACCEPTED, hypothesis="a larger lr converges sooner",
        category="optimizer", proposer="sweep")
    for seed, t in [(11, 10.0), (12, 11.0), (13, 9.0)]:
        run(ledger, ids["fast"], "screen" if seed == 11 else "confirm", seed, res=result(seed, t))
    ledger.record_decision(ids["fast"], "accept", decision("accept", 2.0, "speed ratio 2.000"),
                  speedup=2.0)

    ids["slow"] = ledger.add_candidate("batch 64", parent_id=ids["fast"], commit_sha="c" * 40,
                                       diff="--- a/x\n+++ b/x\n+slow\n", proposer="sweep")
    run(ledger, ids["slow"], "screen", 21, res=result(21, 40.0))
    ledger.record_decision(ids["slow"], "reject", decision("reject", 0.25, "screen: worse"))

    ids["crash"] = ledger.add_candidate("fused kernel", parent_id=ids["fast"],
                                        commit_sha="d" * 40, proposer="llm")
    run(ledger, ids["crash"], "screen", 31, outcome="crash", error="Traceback: boom")
    ledger.record_decision(ids["crash"], "reject",
                           decision("reject", None, "run with seed 31 failed"))

    ids["refused"] = ledger.add_candidate("edit train.py", parent_id=ids["fast"],
                                          proposer="llm")
    ledger.refuse(ids["refused"], "train.py is outside the research surface")

    ids["stopped"] = ledger.add_candidate("no warmup", parent_id=ids["fast"],
                                          commit_sha="e" * 40, proposer="sweep")
    run(ledger, ids["stopped"], "screen", 41, outcome="early-stopped", res=result(41, None))
    ledger.record_decision(ids["stopped"], "reject", decision("reject", None, "early-stopped"))

    ids["running"] = ledger.add_candidate("muon momentum 0.9", parent_id=ids["fast"],
                                          proposer="sweep")
    run(ledger, ids["running"], "screen", 51, res=result(51, 9.5))
    ids["running_run"] = ledger.start_run(ids["running"], "confirm", 52, "logs/c7-52.log")
    ledger.log_event("screen passed for candidate 7 [confirming]")
    ledger.close()
    return ids


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("session")
    ids = build_session(run_dir)
    return run_dir, ids, write_report(run_dir)


def test_speedup_vs_baseline_is_a_ratio_of_geometric_means_with_ci():
    base = [result(s, t) for s, t in [(1, 100.0), (2, 110.0), (3, 90.0)]]
    cand = [result(s, t) for s, t in [(4, 50.0), (5, 55.0), (6, 45.0)]]
    s = speedup_vs_baseline(base, cand, "time-to-loss")
    assert s.ratio == pytest.approx(2.0) and s.n == 3
    assert s.ci_low < 2.0 < s.ci_high
    # A candidate run that missed the target measured no speed; a lone run has no interval.
    one = speedup_vs_baseline(base, [cand[0], result(7, None)], "time-to-loss")
    assert one.n == 1 and one.ci_low is None
    assert one.ratio == pytest.approx(math.exp(sum(math.log(t) for t in (100, 110, 90)) / 3)
                                      / 50.0)
    # Throughput: higher is better.
    fast = [{**r, "tokens_per_sec": 2 * r["tokens_per_sec"]} for r in cand]
    assert speedup_vs_baseline(base, fast, "throughput").ratio == pytest.approx(2.0)
    assert speedup_vs_baseline(base, [{"status": "crash", "seed": 9}], "time-to-loss") is None


def test_report_md(session):
    run_dir, ids, paths = session
    text = paths.report.read_text()
    assert text.startswith("# speedloop session ")
    assert "| preset | cpu-tiny |" in text and '| judge | {"alpha": 0.05} |' in text
    assert "## Baseline noise" in text and "3 ok baseline runs" in text
    assert f"Candidate {ids['fast']} (lr 0.02 \\| wider [warmup])" in text
    assert "**×2.000 [" in text  # the champion's speedup vs baseline with its interval
    table = [line for line in text.splitlines() if line.startswith("| ") and " | sweep | "
             in line or " | llm | " in line]
    assert len(table) == 6  # every experiment, the one still running included
    assert "| crash | reject |" in text and "| refused | refused |" in text
    assert "| early-stopped | reject |" in text and "| running | pending |" in text
    assert "2.000 [1.900, 2.100] | 0.01 | 3 | +0.0010 | speed ratio 2.000 |" in text
    # The accepted diff, in a fence longer than the backticks inside it; no rejected diff.
    assert "<details><summary>diff</summary>" in text and "````diff\n--- a/model" in text
    assert "+lr = 0.02" in text and "+slow" not in text
    assert "Hypothesis: a larger lr converges sooner" in text
    # Where the runs' seconds went: the 9 runs with a result (not the crash), 21 s each.
    assert ("of a run's 21.0 s on average: training 17.7 s, start-up 1.0 s, evaluations "
            "0.5 s, the rest 1.8 s)") in text


def test_results_tsv(session):
    run_dir, ids, paths = session
    lines = paths.results.read_text().splitlines()
    header = lines[0].split("\t")
    assert header[:5] == ["commit", "time_to_target", "memory_gb", "status", "description"]
    assert header[5:] == ["speedup", "speedup_ci_low", "speedup_ci_high", "effect", "ci_low",
                          "ci_high", "p_value", "runs", "val_loss", "outcome", "proposer",
                          "candidate", "caught_by"]
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    assert all(len(line.split("\t")) == len(header) for line in lines)
    assert [r["status"] for r in rows] == ["keep", "keep", "discard", "crash", "discard",
                                           "discard"]  # running candidate not yet listed
    base, fast, slow, crash, refused, stopped = rows
    assert base["commit"] == "aaaaaaa" and base["description"].startswith("baseline: ")
    assert float(base["time_to_target"]) == pytest.approx(20.0)
    assert fast["time_to_target"] == "10.000000" and fast["memory_gb"] == "3.0"
    assert float(fast["speedup"]) == pytest.approx(2.0, rel=0.01)
    assert float(fast["speedup_ci_low"]) < 2.0 < float(fast["speedup_ci_high"])
    assert fast["p_value"] == "0.01" and fast["runs"] == "3" and fast["val_loss"] == "3.3000"
    assert crash["time_to_target"] == "0.000000" and crash["memory_gb"] == "0.0"
    assert crash["outcome"] == "crash" and crash["speedup"] == "" and crash["runs"] == "1"
    assert refused["outcome"] == "refused" and refused["commit"] == "-"
    assert stopped["outcome"] == "early-stopped" and slow["speedup"] == "0.4983"  # 19.93/40
    assert [r["candidate"] for r in rows[1:]] == [str(ids[k]) for k in
                                                  ("fast", "slow", "crash", "refused",
                                                   "stopped")]


def test_progress_png(session):
    _, _, paths = session
    data = paths.progress.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1210, 660)


def test_status_text(session):
    from agent.liveness import session_lock

    run_dir, ids, _ = session
    with session_lock(run_dir):  # as a running session holds it
        text = status_text(run_dir, last=4, width=120)
    assert "preset cpu-tiny, objective time-to-loss, proposer sweep" in text
    assert "experiments decided: 5 of 8" in text
    assert f"champion: candidate {ids['fast']} (lr 0.02 | wider [warmup]), speedup ×2.000" \
        in text
    assert "last 4 experiments" in text and "batch 64" not in text  # only the last four
    assert "early-stopped" in text and "refused" in text
    assert (f"running now: candidate {ids['running']} (muon momentum 0.9), confirm run "
            f"{ids['running_run']}, seed 52") in text
    assert "screen passed for candidate 7 [confirming]" in text  # brackets are not markup
    assert "\x1b[" not in text  # plain text, no terminal codes


def test_report_and_status_of_an_empty_session(tmp_path):
    Ledger(tmp_path / LEDGER_FILE).close()
    paths = write_report(tmp_path)
    assert "No champion yet" in paths.report.read_text()
    assert paths.results.read_text().count("\n") == 1  # the header only
    assert paths.progress.stat().st_size > 0
    text = status_text(tmp_path)
    assert "champion: none yet" in text and "running now: nothing" in text


def test_report_needs_a_ledger(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ledger at"):
        write_report(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_llm_spend_is_every_request_the_ledger_recorded(tmp_path):
    """Spend comes from the ledger's per-request rows, so a draft that never became a
    candidate (a failed conversation, one the session stopped before) still counts."""
    from agent.report import llm_spend

    ledger = Ledger(tmp_path / LEDGER_FILE)
    assert llm_spend(ledger.spend(), []) == ""
    for usage in ({"input_tokens": 1000, "output_tokens": 10, "cost_usd": 0.5},
                  {"cache_read_input_tokens": 2000, "cost_usd": 0.125},
                  {"output_tokens": 5, "cost_usd": 0.125}):
        ledger.add_spend("claude-sonnet-5-5", usage)
    rows = [{"usage": {"requests": 2, "cost_usd": 0.625}}, {"usage": None}]
    assert llm_spend(ledger.spend(), rows) == (
        "LLM spend: $0.750 over 3 requests (1 candidates); tokens in 1,000, out 15, "
        "cache read 2,000, cache write 0"
    )


def test_checks_and_held_candidates_are_shown(tmp_path):
    """The check that caught a candidate, in report.md, results.tsv and status; a held
    candidate listed with the command that decides it, and its review once decided."""
    ledger = Ledger(tmp_path / LEDGER_FILE)
    ledger.set_session({"preset": "cpu-tiny", "objective": "time-to-loss"})
    base = ledger.add_candidate("baseline", parent_id=None, commit_sha="a" * 40)
    for seed, t in [(1, 20.0), (2, 22.0)]:
        run(ledger, base, "baseline", seed, res=result(seed, t))
    ledger.record_decision(base, "accept", {"reason": "baseline"}, speedup=1.0)
    scanned = ledger.add_candidate("reads the clock", parent_id=base)
    ledger.refuse(scanned, "model/gpt.py:3: clock (reads the clock)", "diff-scan:clock")
    gap = ledger.add_candidate("learns the val slice", parent_id=base, commit_sha="b" * 40)
    run(ledger, gap, "screen", 3, res=result(3, 15.0))
    ledger.record_decision(gap, "reject", {**vars(decision("reject", 1.3, "")),
                                           "reason": "holdout-gap: rise of +0.2"},
                           caught_by="holdout-gap")
    held = ledger.add_candidate("three times faster", parent_id=base, commit_sha="c" * 40)
    run(ledger, held, "screen", 4, res=result(4, 7.0))
    ledger.hold(held, {**vars(decision("accept", 3.0, "")), "reason": "implausible-speedup: "
                "x3.000 above 2"}, "implausible-speedup")
    ledger.close()

    text = write_report(tmp_path).report.read_text()
    assert "| refused | refused | diff-scan:clock |" in text
    assert "| ok | reject | holdout-gap |" in text and "| ok | held | implausible-speedup |" in text
    section = text.split("## Held for review")[1].split("## Accepted changes")[0]
    assert f"(id {held}) three times faster" in section and f"D {held} --accept" in section
    rows = (tmp_path / "results.tsv").read_text().splitlines()
    assert [r.split("\t")[-1] for r in rows] == ["caught_by", "", "diff-scan:clock",
                                                  "holdout-gap", "implausible-speedup"]
    status = status_text(tmp_path, width=160)
    assert "diff-scan:clock" in status and "holdout-gap" in status
    assert f"held for review: candidate {held} (#3 three times faster), x3.000" in status

    with Ledger(tmp_path / LEDGER_FILE) as ledger:
        ledger.review(held, "accept", "the diff is real", speedup=3.0)
    text = write_report(tmp_path).report.read_text()
    assert "Reviewed by a human: accept: the diff is real." in text
    assert text.split("## Held for review")[1].split("##")[0].strip() == "None."


def test_a_session_without_a_sandbox_says_so_everywhere(tmp_path):
    """--no-sandbox is for machines where bubblewrap cannot run: the session goes on, and
    its report and status say first that its numbers are not evidence."""
    ledger = Ledger(tmp_path / LEDGER_FILE)
    ledger.set_session({"preset": "cpu-tiny", "objective": "throughput", "sandbox": False})
    base = ledger.add_candidate("baseline", parent_id=None, commit_sha="a" * 40)
    for seed in (1, 2):
        run = ledger.start_run(base, "baseline", seed, tmp_path / f"{seed}.log")
        ledger.finish_run(run, "ok", {"status": "ok", "seed": seed, "sandbox": False,
                                      "tokens_per_sec": 1000.0, "val_loss": 5.0,
                                      "train_seconds": 2.0, "curve": []})
    ledger.close()
    write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert report.splitlines()[2].startswith("**UNTRUSTED: candidate code ran without a sandbox")
    assert "(2 of 2 runs)" in report
    assert status_text(tmp_path).startswith("UNTRUSTED: ")


def test_a_sandboxed_session_has_no_such_warning(session):
    run_dir, _, _ = session
    assert "UNTRUSTED" not in (run_dir / "report.md").read_text()
    assert "UNTRUSTED" not in status_text(run_dir)


def test_the_progress_chart_draws_each_interval_over_the_baseline_noise(session, tmp_path):
    from matplotlib.container import ErrorbarContainer

    from agent import progress_chart
    from agent.report import collect

    run_dir, ids, _ = session
    s = collect(run_dir)
    data = progress_chart.chart_data(s)
    low, high = data.band
    assert low < 1.0 < high and math.isclose(low * high, 1.0)  # symmetric on the log scale
    fast = next(p for p in data.points if p.description.startswith("lr 0.02"))
    assert fast.ci_low < fast.ratio < fast.ci_high
    fig = progress_chart.plot(tmp_path / "p.png", s)
    ax = fig.axes[0]
    whiskers = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    drawn = sorted(y for c in whiskers for seg in c.lines[2][0].get_segments()
                   for y in seg[:, 1])
    expected = sorted(y for p in data.points if p.ci_low is not None
                      for y in (p.ci_low, p.ci_high))
    assert expected and drawn == pytest.approx(expected)
    assert any(t.get_text().startswith("baseline noise") for t in ax.get_legend().get_texts())


def test_the_timed_share_counts_only_what_the_harness_measured():
    from agent.shares import timed_share

    def ran(train, startup, evaluation, wall, slot="0"):
        return {"slot": slot, "wall_seconds": wall, "result": {
            "train_seconds": train, "untimed": {"startup": startup, "evaluation": evaluation}}}

    runs = [ran(6.0, 3.0, 2.0, 14.0), ran(4.0, 3.0, 1.0, 10.0, slot="1"),
            {"slot": "0", "wall_seconds": 30.0, "result": None},  # a crash: nothing counted
            {"slot": "1", "wall_seconds": 5.0, "result": {"train_seconds": 1.0}}]  # old schema
    share = timed_share(runs, since=100.0, until=150.0, n_slots=2)
    assert (share.runs, share.wall, share.train, share.rest) == (2, 24.0, 10.0, 5.0)
    assert share.share == pytest.approx(10.0 / 100.0)  # of 50 s on each of two slots
    assert share.text().startswith("timed training was 10% of the slots' time (of a run's "
                                   "12.0 s on average: training 5.0 s, start-up 3.0 s")
    assert timed_share(runs[2:], 100.0, 150.0, 2) is None
    assert timed_share(runs, 100.0, 100.0, 2) is None
