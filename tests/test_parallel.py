"""Parallel slots: several experiments in flight, each run on a slot of its own, the champion
measured on every slot, and candidates re-based when the champion changes under them.
Real sessions on the fast fake harness (tests/fakes/harness.py), whose speed is the product
of model/speed*.txt, so that changes of different files compose."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes.harness import patch_of

from agent import child, measure
from agent.config import SessionConfig, SessionStop
from agent.faults import FAULT_AT, FAULT_TRACE
from agent.ledger import Ledger
from agent.loop import Session
from agent.proposers import make_proposer
from agent.rundir import LEDGER_FILE
from agent.simulate import session_pairs
from agent.slots import Slot, SlotPool, parse_devices
from agent.status import status_text


@pytest.fixture(autouse=True)
def quiet(monkeypatch, tmp_path):
    monkeypatch.setenv("SPEEDLOOP_LOCKS", str(tmp_path / "locks"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def patches(repo: Path, folder: Path, edits: list[dict[str, str]]) -> Path:
    folder.mkdir()
    for n, edit in enumerate(edits):
        (folder / f"{n:02d}.patch").write_text(patch_of(repo, edit))
    return folder


def session(repo: Path, run_dir: Path, folder: Path, **config) -> Session:
    config = SessionConfig(repo=str(repo), objective="throughput", baseline_runs=2,
                           proposer="patches", proposer_arg=str(folder), wandb="disabled",
                           **config)  # fmt: skip
    return Session.create(run_dir, config, make_proposer("patches", str(folder), {}),
                          say=lambda text: None)  # fmt: skip


def test_devices_name_slots_or_say_what_would_do():
    assert parse_devices(None, "cpu") == [Slot("0", "cpu")]
    two = parse_devices("cpu:2", "cpu")
    assert [s.name for s in two] == ["0", "1"] and not set(two[0].cores) & set(two[1].cores)
    for spec, says in [("cpu:0", "1 to"), ("cpu:99", "1 to"), ("cpu:x", "cpu:N needs"),
                       ("0,1", "names GPUs")]:
        with pytest.raises(ValueError, match=says):
            parse_devices(spec, "cpu")
    with pytest.raises(ValueError, match="for a CPU session"):
        parse_devices("cpu:2", "cuda")


def test_a_retired_slot_is_never_lent_again_and_none_left_stops_the_session():
    """A slot whose worker died is retired: a run that asked for it by name takes another,
    one already holding it does not give it back, and with none left the session stops."""
    pool = SlotPool([Slot("a", "cpu"), Slot("b", "cpu")])
    with pool.take("a") as held:
        pool.retire("a")
        with pool.take("a") as other:  # "a" is gone: any slot will do
            assert other.name == "b"
    assert held.name == "a" and pool.names == ["b"] and [s.name for s in pool.retired] == ["a"]
    with pool.take() as last:
        assert last.name == "b"
    pool.retire("b")
    with pytest.raises(SessionStop, match=r"every slot of the session is lost \(a, b\)"):
        with pool.take():
            pass


def test_a_two_slot_session_runs_on_both_and_records_each_run_once(fake_repo, tmp_path):
    """--devices cpu:2: the baseline's replicates on both slots, experiments two at a time,
    every run finished, on a slot, with its own seed."""
    folder = patches(fake_repo, tmp_path / "p", [{"model/speed.txt": f"{x}\n"}
                                                 for x in ("0.9", "0.95", "0.8", "0.85")])
    s = session(fake_repo, tmp_path / "s", folder, devices="cpu:2")
    s.run()
    runs = [r for c in s.ledger.candidates() for r in s.ledger.runs_of(c["id"])]
    assert {r["slot"] for r in runs} == {"0", "1"}
    assert {r["slot"] for r in s.ledger.runs_of(s.ledger.baseline()["id"])} == {"0", "1"}
    assert not s.ledger.running_runs()
    seeds = [r["seed"] for r in runs]
    assert len(seeds) == len(set(seeds))
    assert [c["verdict"] for c in s.ledger.candidates()[1:]] == ["reject"] * 4
    assert (s.run_dir.root / "worktree-1" / ".git").exists()  # each slot its own worktree
    assert "on 2 slots (slot 0 " in status_text(s.run_dir.root)


def test_the_champion_changing_under_three_candidates_in_flight(fake_repo, tmp_path):
    """Four slots, four good candidates at once: the first accepted becomes the champion;
    the other three, in flight on the old one, are re-based (their runs kept as evidence
    against it) and judged afresh against the new one, or dropped when their change no
    longer applies. No verdict is ever recorded against a champion that is not current."""
    folder = patches(fake_repo, tmp_path / "p", [
        {"model/speed.txt": "1.3\n"}, {"model/speed_b.txt": "1.1\n"},
        {"model/speed_c.txt": "1.1\n"}, {"model/speed.txt": "1.2\n"}])
    s = session(fake_repo, tmp_path / "s", folder)
    # Four slots of the whole CPU: their runs take turns on the CPU's lock, but four
    # candidates are judged side by side, which is what this test is about.
    s.measurer.pool = SlotPool([Slot(str(i), "cpu") for i in range(4)])
    s.run()
    cands = s.ledger.candidates()
    rebased = [c for c in cands if c["verdict"] == "rebased"]
    assert len(rebased) >= 3  # every other first candidate, at least once
    history = [(h["since"], h["candidate_id"]) for h in s.ledger.champions()]
    for c in cands[1:]:
        if c["verdict"] in ("accept", "reject"):
            before = [cid for since, cid in history if since < c["decided_at"]]
            assert c["parent_id"] == before[-1], f"#{c['experiment']} judged on an old champion"
        if c["verdict"] == "rebased":
            copy = c["decision"]["rebased_as"]
            assert copy is None or s.ledger.candidate(copy)["description"] == c["description"]
            assert copy is not None or "does not apply" in c["decision"]["reason"]
    # The first three were in flight with runs when the first accept came: kept, as
    # evidence against their old parent.
    assert all(s.ledger.runs_of(c["id"]) for c in rebased[:3])
    # Four slots, so a champion was measured on each before anything was judged on it.
    judged_on = {c["parent_id"] for c in cands[1:] if c["verdict"] in ("accept", "reject")}
    assert judged_on
    for champion_id in judged_on:
        slots = {r["slot"] for r in s.ledger.runs_of(champion_id, ok_only=True)}
        assert slots == {"0", "1", "2", "3"}
    assert s.ledger.n_experiments() == len([c for c in cands[1:] if c["verdict"] != "rebased"])
    # The file changes compose: speed_b and speed_c both end in the champion, with one of
    # the two speed.txt edits (the other no longer applies on top of it).
    champion = s.ledger.champion()
    files = {p: s.workspace.file_at(champion["commit_sha"], f"model/{p}")
             for p in ("speed.txt", "speed_b.txt", "speed_c.txt")}
    assert files["speed_b.txt"] == files["speed_c.txt"] == "1.1\n"
    assert files["speed.txt"] in ("1.3\n", "1.2\n")
    assert champion["speedup"] > 1.3  # at least 1.2 x 1.1 x 1.1 = 1.45, measured
    assert not s.ledger.running_runs()


def test_a_parallel_session_killed_mid_flight_resumes_with_nothing_lost(fake_repo, data_cache,
                                                                        tmp_path):
    """`run --devices cpu:2` killed with SIGKILL once an experiment is decided and another
    runs (the head dies with work in flight on a slot), then `run --resume`: every patch
    decided once (a re-based one once more, as its copy), no run left running, each
    counted run its own seed, the status saying so."""
    folder = patches(fake_repo, tmp_path / "p", [
        {"model/speed.txt": "1.3\n"}, {"model/speed_b.txt": "1.1\n"},
        {"model/speed_c.txt": "0.8\n"}, {"model/speed_d.txt": "0.9\n"}])
    env = {**os.environ, "SPEEDLOOP_DATA": str(data_cache), "WANDB_MODE": "disabled",
           "SPEEDLOOP_LOCKS": str(tmp_path / "locks")}  # fmt: skip
    for name in (FAULT_AT, FAULT_TRACE):
        env.pop(name, None)
    run_dir = tmp_path / "s"
    start = [sys.executable, "-m", "agent", "run", "--preset", "cpu-tiny", "--objective",
             "throughput", "--baseline-runs", "2", "--proposer", "patches", "--proposer-arg",
             str(folder), "--experiments", "4", "--wandb", "disabled", "--devices", "cpu:2",
             "--run-dir", str(run_dir)]  # fmt: skip
    head = subprocess.Popen(start, cwd=fake_repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while head.poll() is None and time.monotonic() < deadline:
        if (run_dir / LEDGER_FILE).exists():
            with Ledger(run_dir / LEDGER_FILE, create=False) as ledger:
                decided = [c for c in ledger.candidates() if c["experiment"] and c["verdict"]]
                if decided and ledger.running_runs():
                    head.kill()
        time.sleep(0.02)
    assert head.wait() == -signal.SIGKILL, "the session ended before it could be killed"
    resumed = subprocess.run([sys.executable, "-m", "agent", "run", "--resume", str(run_dir)],
                             cwd=fake_repo, env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "discarded unfinished run" in resumed.stdout
    with Ledger(run_dir / LEDGER_FILE, create=False) as ledger:
        assert not ledger.running_runs()
        assert not ledger.candidates(["proposed", "running"])
        final = [c["description"] for c in ledger.candidates()[1:] if c["verdict"] != "rebased"]
        assert sorted(final) == [f"patch {i:02d}.patch: {i:02d}" for i in range(4)]
        runs = [r for c in ledger.candidates() for r in ledger.runs_of(c["id"])]
        assert len({r["seed"] for r in runs}) == len(runs)
        assert {r["slot"] for r in runs} == {"0", "1"}
    assert ": 4 experiments done" in status_text(run_dir)


@pytest.mark.parametrize("sig, why", [(signal.SIGTERM, "a SIGTERM"),
                                      (signal.SIGINT, "the user (Ctrl-C)")])
def test_a_session_sent_sigterm_stops_as_on_ctrl_c(fake_repo, data_cache, tmp_path, sig, why):
    """`kill PID` (a job scheduler's stop), or Ctrl-C, with a run in flight: the session
    exits 130, says how to resume, the ledger says it stopped and why, and no process of its
    runs is left."""
    folder = patches(fake_repo, tmp_path / "p", [{"model/speed.txt": "1.3\n"}])
    env = {**os.environ, "SPEEDLOOP_DATA": str(data_cache), "WANDB_MODE": "disabled",
           "SPEEDLOOP_LOCKS": str(tmp_path / "locks")}  # fmt: skip
    for name in (FAULT_AT, FAULT_TRACE):
        env.pop(name, None)
    run_dir = tmp_path / "s"
    head = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--preset", "cpu-tiny", "--objective",
         "throughput", "--baseline-runs", "2", "--proposer", "patches", "--proposer-arg",
         str(folder), "--experiments", "1", "--wandb", "disabled", "--run-dir", str(run_dir)],
        cwd=fake_repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # As from a terminal: a test run started in the background inherits SIGINT ignored,
        # and a session keeps an ignored SIGINT ignored (a background job's convention).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while head.poll() is None and time.monotonic() < deadline:
        if (run_dir / LEDGER_FILE).exists():
            with Ledger(run_dir / LEDGER_FILE, create=False) as ledger:
                if any(r["lock_at"] for r in ledger.running_runs()):  # its child starts
                    head.send_signal(sig)
                    break
        time.sleep(0.02)
    out, _ = head.communicate(timeout=120)
    assert head.returncode == 130, out[-2000:]
    assert "interrupted: the run in flight was stopped" in out
    with Ledger(run_dir / LEDGER_FILE, create=False) as ledger:
        assert any(f"interrupted by {why}" in e["text"] for e in ledger.events(limit=50))
    def left() -> list[str]:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(run_dir).encode() in cmdline.read_bytes():
                    found.append(cmdline.parent.name)
            except OSError:
                pass  # ended while we looked
        return found

    deadline = time.monotonic() + 10  # a killed process group is reaped asynchronously
    while left() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left()


def test_a_stop_signal_whose_interrupt_was_swallowed_still_stops_the_session(fake_repo,
                                                                             tmp_path):
    """Python ignores a KeyboardInterrupt raised where it cannot propagate (an at-fork
    callback: seen in a full test run). The signal's stop ends every child anyway, and
    the session reads the Cancelled that follows as the signal's stop, not as an error."""
    folder = patches(fake_repo, tmp_path / "p", [{"model/speed.txt": "1.3\n"}])
    s = session(fake_repo, tmp_path / "s", folder)
    event = s.event

    def stop_at_the_screen(text: str) -> None:
        event(text)
        if text.startswith("experiment #1"):
            child.stop("SIGTERM")  # as the handler does, but its raise lost
            while not child.cancelled():  # the stop's thread sets it
                time.sleep(0.001)

    s.event = stop_at_the_screen
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            s.run()
    finally:
        child._stop_signal.clear()
        child.cancel_all(False)
    texts = [e["text"] for e in s.ledger.events(limit=20)]
    assert any("interrupted by a SIGTERM" in t for t in texts)
    assert not any("an error" in t for t in texts)
    assert s.ledger.candidates()[1]["verdict"] is None  # nothing recorded for it


# A coding agent for --proposer command that takes a while: it adds a file of its own to
# the speed product (each candidate a distinct change, a slower one) and notes when it ran.
SLOW_AGENT = """\
import os, pathlib, sys, time, uuid
started = time.time()
time.sleep(1.0)
pathlib.Path(f"model/speed_{uuid.uuid4().hex[:8]}.txt").write_text("0.9\\n")
with open(sys.argv[1], "a") as f:
    f.write(f"{started} {time.time()}\\n")
"""


def test_an_llm_proposer_drafts_one_candidate_per_slot_at_once(fake_repo, tmp_path):
    """With two slots, an LLM proposer (here the command proposer running a slow script)
    has two conversations going at once, each in its own worktree, and the experiments
    budget still bounds what is drafted: four experiments, none left over."""
    script, times = tmp_path / "agent.py", tmp_path / "times.txt"
    script.write_text(SLOW_AGENT)
    command = f"{sys.executable} {script} {times}"
    options = {"checks": False, "sandbox": False}
    config = SessionConfig(repo=str(fake_repo), objective="throughput", baseline_runs=2,
                           proposer="command", proposer_arg=command, wandb="disabled",
                           devices="cpu:2", experiments=4, proposer_options=options)
    s = Session.create(tmp_path / "s", config, make_proposer("command", command, options),
                       say=lambda text: None)
    assert s.drafter.width == 2
    s.run()
    spans = [tuple(map(float, line.split())) for line in times.read_text().splitlines()]
    assert len(spans) == 4  # one conversation per experiment: none drafted past the budget
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:])
    made = s.ledger.candidates()[1:]
    assert [c["verdict"] for c in made] == ["reject"] * 4
    assert len({c["diff"] for c in made}) == 4
    assert (s.run_dir.root / "propose-1" / ".git").exists()  # the second draft's worktree


def test_paired_runs_sit_back_to_back_on_one_slot_with_one_seed_in_abba_order(fake_repo,
                                                                              tmp_path,
                                                                              monkeypatch):
    """--paired on two slots: every candidate run has a champion run of its seed right
    before or after it on the same slot, the champion first in every other pair; the
    champion is never re-measured on its own; a 5% gain is accepted, a loss rejected; the
    champion keeps final weights for the holdout check of CHAMPION_CHECKPOINTS runs only."""
    monkeypatch.setattr(measure, "CHAMPION_CHECKPOINTS", 3)
    folder = patches(fake_repo, tmp_path / "p", [{"model/speed.txt": f"{x}\n"}
                                                 for x in ("0.8", "1.05")]
                     + [{"model/speed_b.txt": "0.97\n"}])
    s = session(fake_repo, tmp_path / "s", folder, devices="cpu:2", judge={"paired": True})
    s.run()
    cands = s.ledger.candidates()
    verdicts = [c["verdict"] for c in cands[1:] if c["verdict"] != "rebased"]
    assert verdicts == ["reject", "accept", "reject"]
    assert not any("re-measuring" in e["text"] for e in s.ledger.events(limit=1000))
    runs = sorted((r for c in cands for r in s.ledger.runs_of(c["id"])), key=lambda r: r["id"])
    by_slot = {slot: [r for r in runs if r["slot"] == slot] for slot in ("0", "1")}  # in time
    for c in cands[1:]:
        sides = []
        for run in s.ledger.runs_of(c["id"]):
            line = by_slot[run["slot"]]
            at = line.index(run)
            near = [line[i] for i in (at - 1, at + 1) if 0 <= i < len(line)]
            (mate,) = [r for r in near if r["role"] == "champion" and r["seed"] == run["seed"]]
            assert mate["candidate_id"] == c["parent_id"]
            sides.append(mate["id"] < run["id"])
        assert all(a != b for a, b in zip(sides, sides[1:])), sides  # ABBA
    baseline = s.ledger.baseline()["id"]
    assert s.measurer.champion_checkpoints(baseline) == 3
    # The 0.8 screen failed on its pair; the 1.05 ran the judge's three pairs.
    assert len(s.ledger.runs_of(cands[1]["id"])) == 1
    assert len(s.ledger.runs_of(cands[2]["id"])) == 3
    # Each baseline replicate's seed ran twice: the pairs' noise before any candidate's.
    seeds = [r["seed"] for r in s.ledger.runs_of(baseline, roles=["baseline"], ok_only=True)]
    assert len(seeds) == 2 * s.config.baseline_runs and len(set(seeds)) == len(seeds) / 2
    for seed in set(seeds):  # back to back on one slot
        a, b = [r for r in runs if r["candidate_id"] == baseline and r["seed"] == seed]
        assert a["slot"] == b["slot"] and by_slot[a["slot"]].index(b) == \
            by_slot[a["slot"]].index(a) + 1
    # The session's pair noise, the floor of the judge: the twins' and the 1.05's three
    # pairs, each about its mean (the 0.8's lone pair has no spread to give).
    twins_df = s.config.baseline_runs - 1
    assert s.recorder.pair_noise(cands[2]).df == twins_df
    assert s.recorder.pair_noise(cands[-1]).df == twins_df + 2
    # The replay's reading of the session: its pairs in the order they ran.
    _, fresh, pairs = session_pairs(s.run_dir.root)
    assert len(fresh) == s.config.baseline_runs
    made = [p.candidate for p in pairs]
    assert made.count(baseline) == s.config.baseline_runs
    assert made.count(cands[1]["id"]) == 1 and made.count(cands[2]["id"]) == 3
    assert len(made) == len(seeds) / 2 + sum(len(s.ledger.runs_of(c["id"], ok_only=True))
                                              for c in cands[1:])
    assert all(p.champion["seed"] == p.mine["seed"] for p in pairs)
    first = {r["seed"]: r["started_at"] for r in sorted(runs, key=lambda r: -r["id"])}
    assert [p.at for p in pairs] == sorted(first[p.mine["seed"]] for p in pairs)


def test_a_paired_run_left_without_its_partner_gets_it_first(fake_repo, tmp_path):
    """A session stopped between the two runs of a pair: on resume the judge first makes
    the missing champion run, with the orphan's seed, then goes on in pairs."""
    folder = patches(fake_repo, tmp_path / "p", [{"model/speed.txt": "1.05\n"}])
    s = session(fake_repo, tmp_path / "s", folder, judge={"paired": True})
    s.resume_state()
    s.measure_baseline()
    candidate = s.drafter.next_candidate()
    orphan = s.measurer.benchmark(candidate, "screen")  # its pair's champion run never came
    assert s.recorder.judge(candidate).verdict == "accept"
    champion_runs = s.ledger.runs_of(candidate["parent_id"], roles=["champion"])
    assert champion_runs[0]["seed"] == orphan["seed"]
    assert {r["seed"] for r in s.ledger.runs_of(candidate["id"])} == \
        {r["seed"] for r in champion_runs}


def test_a_paired_baseline_replicate_left_without_its_twin_gets_it_on_resume(fake_repo,
                                                                           tmp_path):
    folder = patches(fake_repo, tmp_path / "p", [{"model/speed.txt": "1.05\n"}])
    s = session(fake_repo, tmp_path / "s", folder, judge={"paired": True})
    s.resume_state()
    bid = s.ledger.add_candidate("baseline", parent_id=None, proposer="baseline",
                                 commit_sha=s.workspace.champion)
    s.measurer.twin(s.ledger.candidate(bid), "baseline")
    s.measurer.benchmark(s.ledger.candidate(bid), "baseline")  # a stop before its twin
    s.measure_baseline()
    seeds = [r["seed"] for r in s.ledger.runs_of(bid, ok_only=True)]
    assert len(seeds) == 2 * s.config.baseline_runs
    assert all(seeds.count(seed) == 2 for seed in seeds)


def test_a_champion_whose_holdout_scoring_fails_holds_the_accept_for_a_human(fake_repo,
                                                                            tmp_path):
    """The holdout-gap test needs the champion's gaps: when the scorer fails on the
    champion's checkpoints (here: unreadable) and none were scored before, the candidate
    the judge would accept is held, never accepted with the test skipped."""
    folder = patches(fake_repo, tmp_path / "p", [{"model/speed.txt": "1.3\n"}])
    s = session(fake_repo, tmp_path / "s", folder)
    s.resume_state()
    s.measure_baseline()
    for run in s.ledger.runs_of(s.ledger.baseline()["id"]):
        s.run_dir.run_checkpoint(run).write_text("not a checkpoint")
    candidate = s.drafter.next_candidate()
    decision = s.recorder.judge(candidate)
    assert decision.verdict == "accept"
    s.recorder.record(candidate, decision)
    held = s.ledger.candidate(candidate["id"])
    assert (held["state"], held["caught_by"]) == ("held", "holdout-gap")
    assert "the champion's holdout evaluation failed" in held["decision"]["reason"]
    assert s.ledger.champion()["id"] == s.ledger.baseline()["id"]
