"""The ledger: schema, every call, transactions, kill -9 of a writer, resume semantics."""

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent.judge import Decision
from agent.ledger import Ledger, LedgerError
from agent.rundir import LEDGER_FILE
from agent.store import SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "run" / LEDGER_FILE) as opened:
        yield opened


def with_baseline(ledger: Ledger) -> int:
    """A baseline with two ok runs, accepted as the first champion."""
    base = ledger.add_candidate("baseline", parent_id=None, commit_sha="0" * 40)
    for seed in (1, 2):
        run = ledger.start_run(base, "baseline", seed)
        ledger.finish_run(run, "ok", {"status": "ok", "seed": seed, "val_loss": 3.3})
    ledger.record_decision(base, "accept", {"verdict": "accept", "reason": "baseline"},
                           speedup=1.0)
    return base


def test_schema_and_pragmas(tmp_path):
    with Ledger(tmp_path / "run" / LEDGER_FILE) as ledger:
        assert ledger.path == tmp_path / "run" / LEDGER_FILE and ledger.path.exists()
        db = ledger._db
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"meta", "session", "candidates", "runs", "champions", "events",
                          "holdout", "spend"}
    with Ledger(tmp_path / "run" / LEDGER_FILE, create=False) as again:  # reopening is fine
        assert again._db.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)


def test_threads_each_write_through_their_own_connection(tmp_path):
    """An LLM proposer drafting in a background thread logs its pauses and each request's
    cost while the loop's thread records runs: both land, none is lost or refused."""
    import threading

    ledger = Ledger(tmp_path / LEDGER_FILE)
    errors = []

    def writer(n):
        try:
            for i in range(20):
                ledger.log_event(f"thread {n} event {i}")
                ledger.add_spend("m", {"input_tokens": 1, "cost_usd": 0.5})
        except Exception as e:  # noqa: BLE001 (the assertion below shows it)
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    writer(3)
    for t in threads:
        t.join()
    assert errors == []
    assert len(ledger.events(1000)) == 80
    assert ledger.spend()["requests"] == 80 and ledger.spend()["cost_usd"] == 40.0
    ledger.close()


def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ledger at .*--run-dir"):
        Ledger(tmp_path / "missing" / LEDGER_FILE, create=False)
    assert not (tmp_path / "missing").exists()
    Ledger(tmp_path / "newer" / LEDGER_FILE).close()
    with sqlite3.connect(tmp_path / "newer" / LEDGER_FILE) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    newer = f"schema 99, newer than the {SCHEMA_VERSION} .*update speedloop"
    with pytest.raises(LedgerError, match=newer):
        Ledger(tmp_path / "newer" / LEDGER_FILE)
    (tmp_path / "other").mkdir()
    with sqlite3.connect(tmp_path / "other" / LEDGER_FILE) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(LedgerError, match="not a speedloop ledger"):
        Ledger(tmp_path / "other" / LEDGER_FILE)


def test_session(ledger):
    assert ledger.session() is None
    first = ledger.set_session({"preset": "cpu-tiny", "budgets": {"experiments": 3}})
    assert first["config"] == {"preset": "cpu-tiny", "budgets": {"experiments": 3}}
    again = ledger.set_session({"preset": "cpu-tiny", "budgets": {"experiments": 9}})
    assert (again["id"], again["created"]) == (first["id"], first["created"])
    assert ledger.session()["config"]["budgets"]["experiments"] == 9


def test_candidate_lifecycle(ledger):
    base = with_baseline(ledger)
    assert ledger.champion()["id"] == base and ledger.champion()["speedup"] == 1.0
    with pytest.raises(LedgerError, match="a baseline exists already"):
        ledger.add_candidate("second baseline", parent_id=None)
    with pytest.raises(LedgerError, match="parent 99 is not a candidate"):
        ledger.add_candidate("orphan", parent_id=99)
    with pytest.raises(LedgerError, match="needs a description"):
        ledger.add_candidate("  ", parent_id=base)

    cid = ledger.add_candidate("lr 0.02", parent_id=base, diff="+lr", commit_sha="1" * 40,
                               ref="refs/speedloop/c2", hypothesis="h", category="optimizer",
                               proposer="sweep")
    cand = ledger.candidate(cid)
    assert (cand["state"], cand["verdict"], cand["experiment"]) == ("proposed", None, 1)
    assert (cand["parent_id"], cand["diff"], cand["proposer"]) == (base, "+lr", "sweep")
    run = ledger.start_run(cid, "screen", 11, "logs/r.log")
    assert ledger.candidate(cid)["state"] == "running"
    with pytest.raises(LedgerError, match="run .* is still running"):
        ledger.record_decision(cid, "reject", {})
    ledger.finish_run(run, "ok", {"status": "ok", "time_to_target": 9.0}, None, 12.5)
    with pytest.raises(LedgerError, match="pass speedup= exactly when accepting"):
        ledger.record_decision(cid, "accept", {})
    judged = Decision("accept", "faster", 1.2, 1.1, 1.3, 0.01, 0.02, 2, 3, 0.001)
    ledger.record_decision(cid, "accept", judged, speedup=1.2)
    cand = ledger.candidate(cid)
    assert cand["state"] == "decided" and cand["verdict"] == "accept"
    assert cand["decision"] == dataclasses.asdict(judged) and cand["decided_at"] > 0
    assert ledger.champion()["id"] == cid
    with pytest.raises(LedgerError, match="it is decided"):
        ledger.record_decision(cid, "reject", {})  # never decided (or counted) twice
    with pytest.raises(LedgerError, match="no more screen runs"):
        ledger.start_run(cid, "screen", 12)

    refused = ledger.add_candidate("edit train.py", parent_id=cid)
    ledger.refuse(refused, "train.py is outside the research surface")
    row = ledger.candidate(refused)
    assert (row["state"], row["verdict"], row["experiment"]) == ("refused", "refused", 2)
    assert row["decision"]["reason"] == "train.py is outside the research surface"
    late = ledger.add_candidate("x", parent_id=cid)
    ledger.start_run(late, "screen", 99)
    with pytest.raises(LedgerError, match="cannot refuse candidate .* it is running"):
        ledger.refuse(late, "too late: it runs")
    assert ledger.n_experiments() == 2  # the baseline is no experiment, a running one not yet
    assert [c["experiment"] for c in ledger.candidates()] == [None, 1, 2, 3]
    assert [c["id"] for c in ledger.candidates(states=["proposed", "running"])] == [4]


def test_argument_checks(ledger):
    base = with_baseline(ledger)
    cid = ledger.add_candidate("c", parent_id=base)
    with pytest.raises(LedgerError, match="role 'warmup'"):
        ledger.start_run(cid, "warmup", 1)
    with pytest.raises(LedgerError, match="'baseline' is for the baseline's runs only"):
        ledger.start_run(cid, "baseline", 1)
    with pytest.raises(LedgerError, match="not an accepted champion"):
        ledger.start_run(cid, "champion", 1)
    run = ledger.start_run(cid, "screen", 1)
    with pytest.raises(LedgerError, match="outcome 'segfault' is not one of"):
        ledger.finish_run(run, "segfault")
    ledger.finish_run(run, "crash", None, "Traceback ...", 1.0)
    with pytest.raises(LedgerError, match="cannot finish run .*: it is finished"):
        ledger.finish_run(run, "ok")
    with pytest.raises(LedgerError, match="verdict 'maybe'"):
        ledger.record_decision(cid, "maybe", {})
    with pytest.raises(LedgerError, match="speedup nan is not a positive finite ratio"):
        ledger.record_decision(cid, "accept", {}, speedup=float("nan"))
    assert ledger.candidate(cid)["state"] == "running"  # the failed decide left nothing
    with pytest.raises(LedgerError, match="no candidate 42"):
        ledger.candidate(42)


def test_runs_results_and_seeds(ledger):
    base = with_baseline(ledger)
    cid = ledger.add_candidate("c", parent_id=base)
    screen = ledger.start_run(cid, "screen", 7, Path("logs/7.log"))
    ledger.finish_run(screen, "ok", {"status": "ok", "seed": 7, "val_loss": 3.2,
                                     "curve": [{"tokens": 1, "val_loss": 5.0}]}, None, 3.0)
    confirm = ledger.start_run(cid, "confirm", 8)
    ledger.finish_run(confirm, "early-stopped", {"status": "ok", "val_loss": 4.0})
    crash = ledger.start_run(cid, "confirm", 9)
    ledger.finish_run(crash, "crash", None, "boom", 1.0)
    ledger.start_run(ledger.add_candidate("d", parent_id=base), "screen", 10)

    runs = ledger.runs_of(cid)
    assert [r["id"] for r in runs] == [screen, confirm, crash]
    assert runs[0]["result"]["curve"] == [{"tokens": 1, "val_loss": 5.0}]
    assert runs[0]["log_path"] == "logs/7.log" and runs[0]["wall_seconds"] == 3.0
    assert runs[2]["result"] is None and runs[2]["error"] == "boom"
    assert [r["id"] for r in ledger.runs_of(cid, roles=["confirm"])] == [confirm, crash]
    assert [r["id"] for r in ledger.runs_of(cid, ok_only=True)] == [screen]
    # The judge's input: the runner's outcome wins over the JSON's status.
    assert [(r["status"], r["seed"]) for r in ledger.results_of(cid)] == \
        [("ok", 7), ("early-stopped", 8), ("crash", 9)]
    assert ledger.results_of(cid)[1]["val_loss"] == 4.0
    assert ledger.used_seeds() == {1, 2, 7, 8, 9, 10}
    assert ledger.used_seeds(cid) == {7, 8, 9}
    assert [r["seed"] for r in ledger.running_runs()] == [10]
    assert ledger.run(screen)["state"] == "finished"


def test_discard_unfinished_runs_on_resume(tmp_path):
    with Ledger(tmp_path / LEDGER_FILE) as ledger:
        base = with_baseline(ledger)
        cid = ledger.add_candidate("c", parent_id=base)
        done = ledger.start_run(cid, "screen", 5)
        ledger.finish_run(done, "ok", {"status": "ok"})
        left = ledger.start_run(cid, "confirm", 6)  # the session dies here
    with Ledger(tmp_path / LEDGER_FILE, create=False) as resumed:
        assert resumed.discard_unfinished_runs() == [left]
        assert resumed.discard_unfinished_runs() == []
        run = resumed.run(left)
        assert run["state"] == "discarded" and "discarded on resume" in run["error"]
        assert run["outcome"] is None and run["finished_at"] is not None
        assert [r["id"] for r in resumed.runs_of(cid)] == [done]  # never counted
        assert 6 not in resumed.used_seeds()  # so the replicate can run again with its seed
        assert resumed.candidate(cid)["state"] == "running"  # still to be judged
        with pytest.raises(LedgerError, match="it is discarded"):
            resumed.finish_run(left, "ok")
        again = resumed.start_run(cid, "confirm", 6)
        resumed.finish_run(again, "ok", {"status": "ok"})
        assert [r["seed"] for r in resumed.runs_of(cid)] == [5, 6]


def test_champion_history_and_events(ledger):
    base = with_baseline(ledger)
    faster = ledger.add_candidate("x1.02", parent_id=base)
    ledger.record_decision(faster, "accept", {"reason": "faster"}, speedup=1.02)
    assert ledger.champion()["id"] == faster and ledger.champion()["speedup"] == 1.02
    assert [c["speedup"] for c in ledger.champions()] == [1.0, 1.02]
    for i in range(5):
        ledger.log_event(f"event {i}")
    assert [e["text"] for e in ledger.events(3)] == ["event 2", "event 3", "event 4"]


def test_a_failed_write_leaves_nothing(ledger):
    """decide() updates the candidate and inserts the champion: both or neither."""
    base = with_baseline(ledger)
    cid = ledger.add_candidate("c", parent_id=base)
    ledger._db.execute("CREATE TRIGGER fail BEFORE INSERT ON champions "
                       "BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(sqlite3.IntegrityError, match="disk full"):
        ledger.record_decision(cid, "accept", {"reason": "faster"}, speedup=1.5)
    assert ledger.candidate(cid)["state"] == "proposed" and ledger.champion()["id"] == base
    ledger.log_event("still writable")  # the failed transaction left no lock behind


def test_snapshot_reads_one_state(tmp_path):
    path = tmp_path / LEDGER_FILE
    with Ledger(path) as reader, Ledger(path) as writer:
        writer.log_event("before")
        with reader.snapshot():
            assert len(reader.events()) == 1
            writer.log_event("during")  # WAL: the writer is not blocked by the reader
            assert len(reader.events()) == 1
        assert len(reader.events()) == 2


# A writer that loops over the whole life of a candidate, one transaction per call, and
# prints each candidate's number once its decision is committed.
WRITER = """
import sys
from agent.ledger import Ledger

ledger = Ledger(sys.argv[1])
ledger.discard_unfinished_runs()
base = ledger.baseline()
base = base["id"] if base else ledger.add_candidate("baseline", parent_id=None)
if ledger.champion() is None:
    ledger.record_decision(base, "accept", {"reason": "baseline"}, speedup=1.0)
print("ready", flush=True)
for i in range(10**6):
    cid = ledger.add_candidate(f"candidate {i}", parent_id=base, diff="+x" * 500)
    run = ledger.start_run(cid, "screen", 1000 + i)
    ledger.finish_run(run, "ok", {"status": "ok", "i": i, "curve": list(range(200))},
                      None, 1.0)
    ledger.record_decision(cid, "accept" if i % 2 else "reject", {"reason": f"r{i}"},
                  speedup=1.0 + i if i % 2 else None)
    ledger.log_event(f"decided {cid}")
    print(cid, flush=True)
"""


def test_kill_9_of_a_writer_loses_no_committed_row_and_leaves_no_half(tmp_path):
    committed: list[int] = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for lines in (0, 3, 12, 25):  # kill at different moments, resuming in between
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / LEDGER_FILE)],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "ready\n"
        for _ in range(lines):
            committed.append(int(child.stdout.readline()))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        assert child.returncode == -signal.SIGKILL

    with Ledger(tmp_path / LEDGER_FILE, create=False) as ledger:
        assert ledger._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ledger.discard_unfinished_runs()
        candidates = {c["id"]: c for c in ledger.candidates()}
        champions = {c["candidate_id"] for c in ledger.champions()}
        for cid in committed:  # every committed row is intact
            cand = candidates[cid]
            i = int(cand["description"].split()[1])
            assert cand["state"] == "decided" and cand["diff"] == "+x" * 500
            assert cand["decision"] == {"reason": f"r{i}"}
            [run] = ledger.runs_of(cid)
            assert run["result"] == {"status": "ok", "i": i, "curve": list(range(200))}
        for cid, cand in candidates.items():  # nothing half-written anywhere
            accepted = cand["verdict"] == "accept"
            assert accepted == (cid in champions), cid
            if cand["state"] == "decided" and cand["experiment"] is not None:
                assert len(ledger.runs_of(cid)) == 1
        assert all(r["state"] != "running" for r in
                   map(dict, ledger._db.execute("SELECT state FROM runs")))
        decided = {int(e["text"].split()[1]) for e in ledger.events(10**6)}
        assert set(committed) <= decided


def test_held_candidates_wait_for_a_review(ledger):
    base = with_baseline(ledger)
    cid = ledger.add_candidate("x3 faster", parent_id=base, commit_sha="1" * 40)
    with pytest.raises(LedgerError, match="cannot hold candidate .* it is proposed"):
        ledger.hold(cid, {}, "implausible-speedup")  # only what ran can be held
    run = ledger.start_run(cid, "screen", 5)
    ledger.finish_run(run, "ok", {"status": "ok"}, None, 1.0)
    evidence = {"verdict": "held", "reason": "x3.0 > 2", "effect": 3.0, "checks": {}}
    ledger.hold(cid, evidence, "implausible-speedup")
    held = ledger.candidate(cid)
    assert (held["state"], held["verdict"], held["caught_by"]) == ("held", "held",
                                                                   "implausible-speedup")
    assert ledger.held() == [held] and ledger.n_experiments() == 1
    assert ledger.champion()["id"] == base  # held is not accepted
    with pytest.raises(LedgerError, match="cannot decide accept candidate .* it is held"):
        ledger.record_decision(cid, "accept", {}, speedup=3.0)  # only a review decides it
    with pytest.raises(LedgerError, match="pass speedup= exactly when accepting"):
        ledger.review(cid, "accept", "looks real")
    ledger.review(cid, "accept", "checked the diff: real", speedup=3.0)
    done = ledger.candidate(cid)
    assert (done["state"], done["verdict"], done["caught_by"]) == ("decided", "accept",
                                                                   "implausible-speedup")
    assert done["decision"]["effect"] == 3.0 and done["decision"]["reason"] == "x3.0 > 2"
    assert done["decision"]["review"]["note"] == "checked the diff: real"
    assert ledger.champion()["id"] == cid and ledger.champion()["speedup"] == 3.0
    with pytest.raises(LedgerError, match="cannot review reject candidate .* it is decided"):
        ledger.review(cid, "reject", "twice")


def test_caught_by_names_the_check(ledger):
    base = with_baseline(ledger)
    refused = ledger.add_candidate("reads the clock", parent_id=base)
    ledger.refuse(refused, "model/gpt.py:3: clock (...)", "diff-scan:clock")
    cheat = ledger.add_candidate("learns val", parent_id=base)
    ledger.finish_run(ledger.start_run(cheat, "screen", 3), "ok", {"status": "ok"})
    ledger.record_decision(cheat, "reject", {"reason": "gap"}, caught_by="holdout-gap")
    honest = ledger.add_candidate("lr", parent_id=base)
    ledger.finish_run(ledger.start_run(honest, "screen", 4), "ok", {"status": "ok"})
    with pytest.raises(LedgerError, match="accepted, yet caught by holdout-gap"):
        ledger.record_decision(honest, "accept", {}, speedup=1.1, caught_by="holdout-gap")
    ledger.record_decision(honest, "reject", {"reason": "slower"})
    assert [c["caught_by"] for c in ledger.candidates()] == [
        None, "diff-scan:clock", "holdout-gap", None]


def test_holdout_numbers_are_written_once(ledger):
    base = with_baseline(ledger)
    run = ledger.runs_of(base)[0]["id"]
    assert ledger.holdout_of([run]) == {}
    ledger.set_holdout(run, {"loss": 3.3, "bpb": 1.1}, {"loss": 3.35, "bpb": None})
    row = ledger.holdout_of([run, 999])[run]
    assert (row["val_loss"], row["val_bpb"], row["holdout_loss"], row["holdout_bpb"]) == (
        3.3, 1.1, 3.35, None)
    with pytest.raises(LedgerError, match="already has its holdout evaluation"):
        ledger.set_holdout(run, {"loss": 1.0}, {"loss": 1.0})


# The schema of version 1 (before held candidates, caught_by and the holdout table).


def test_a_ledger_of_another_schema_is_refused_with_what_to_do(tmp_path):
    """There are no migrations: a session is finished by the speedloop that began it."""
    path = tmp_path / LEDGER_FILE
    Ledger(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with pytest.raises(LedgerError, match="schema 1 and this speedloop reads only .*new run"):
        Ledger(path)


def test_a_new_ledger_appears_with_its_session_or_not_at_all(tmp_path):
    """Ledger.create builds the file beside its place and renames it there: what a killed
    creation left (ledger.sqlite.new) is cleared, and an existing ledger is never reused."""
    path = tmp_path / LEDGER_FILE
    (tmp_path / (LEDGER_FILE + ".new")).write_text("a creation that was killed")
    with Ledger.create(path, {"preset": "cpu-tiny"}) as ledger:
        assert ledger.session()["config"] == {"preset": "cpu-tiny"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER_FILE]
    with pytest.raises(LedgerError, match="exists already"):
        Ledger.create(path, {"preset": "cpu-tiny"})


def test_a_refused_candidate_is_added_and_refused_in_one_write(ledger):
    base = with_baseline(ledger)
    cid = ledger.add_refused("edits train.py", "outside the surface", parent_id=base,
                             diff="+x", proposer="command", caught_by="surface")
    c = ledger.candidate(cid)
    assert (c["state"], c["verdict"], c["caught_by"]) == ("refused", "refused", "surface")
    assert c["decision"]["reason"] == "outside the surface" and c["experiment"] == 1
    with pytest.raises(LedgerError):  # a bad parent: nothing is written, not even half
        ledger.add_refused("orphan", "x", parent_id=99)
    assert [c["id"] for c in ledger.candidates()] == [base, cid]


def test_a_runs_log_path_may_name_it_by_its_id(ledger):
    cid = ledger.add_candidate("c", parent_id=with_baseline(ledger), commit_sha="1" * 40)
    run = ledger.start_run(cid, "screen", 7, lambda run_id: f"logs/r{run_id}.log")
    assert ledger.run(run)["log_path"] == f"logs/r{run}.log"
