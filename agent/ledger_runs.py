"""The ledger's benchmark runs (agent/ledger.py's `Ledger` is made of these and its
candidates): a run started for a candidate in a role, on a slot, waiting for its device
lock and then running, finished with its outcome and result or discarded with the reason
(a kill on resume, a disturbed run), and the holdout scores of its checkpoint.

A discarded run is never counted (not in `runs_of`, `results_of`, `used_seeds`); a
finished run is never changed again, except to add its holdout scores once.

What this module must never do: count a run twice, or let a run of one candidate pass for
another's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from agent.runner import STATUSES
from agent.store import LedgerError, Store, now, run_row
from bench.telemetry import flagged

ROLES = ("baseline", "screen", "confirm", "champion")


class RunRecords(Store):
    def start_run(self, candidate_id: int, role: str, seed: int,
                  log_path: str | Path | Callable[[int], str | Path] | None = None,
                  lock_path: str | Path | None = None, slot: str = "0") -> int:
        """A benchmark run about to start (state 'running'); moves a proposed candidate to
        'running'. Returns the run's id. `log_path` may be a function of that id, so that
        a run's files are named by it (a re-run with the same seed gets files of its own).
        `lock_path`: the device lock it will wait for (`lock_taken` says when it has it);
        `slot`: the slot it runs on (agent/slots.py)."""
        if role not in ROLES:
            raise LedgerError(f"role {role!r}: choose one of {ROLES}")
        with self._write() as db:
            row = self._one("SELECT parent_id, state, verdict FROM candidates WHERE id = ?",
                            (candidate_id,))
            if row is None:
                raise LedgerError(f"cannot start a run: no candidate {candidate_id}")
            is_baseline = row["parent_id"] is None
            if (role == "baseline") != is_baseline and role != "champion":
                raise LedgerError(f"role {role!r} for candidate {candidate_id}: 'baseline' is "
                                  "for the baseline's runs only, screen/confirm for the others")
            if role == "champion" and row["verdict"] != "accept":
                raise LedgerError(f"candidate {candidate_id} is not an accepted champion: "
                                  "it cannot have a 'champion' re-measurement")
            if role != "champion" and row["state"] not in ("proposed", "running"):
                raise LedgerError(f"candidate {candidate_id} is {row['state']}: no more "
                                  f"{role} runs")
            run_id = db.execute("INSERT INTO runs (candidate_id, role, seed, state, "
                                "started_at, lock_path, slot) VALUES (?, ?, ?, 'running', ?, "
                                "?, ?)", (candidate_id, role, int(seed), now(),
                                          None if lock_path is None else str(lock_path),
                                          str(slot))).lastrowid
            if callable(log_path):
                log_path = log_path(run_id)
            db.execute("UPDATE runs SET log_path = ? WHERE id = ?",
                       (None if log_path is None else str(log_path), run_id))
            db.execute("UPDATE candidates SET state = 'running' WHERE id = ? AND "
                       "state = 'proposed'", (candidate_id,))
        return int(run_id)

    def lock_taken(self, run_id: int, waited_s: float) -> None:
        """A running run got its device lock, after waiting `waited_s` seconds for it: from
        now on it runs, before it waited (status tells them apart; the wait was not the
        device idling)."""
        with self._write() as db:
            db.execute("UPDATE runs SET lock_at = ?, lock_wait_s = ? WHERE id = ? AND "
                       "state = 'running'", (now(), float(waited_s), run_id))

    def finish_run(self, run_id: int, outcome: str, result: Mapping | None = None,
                   error: str | None = None, wall_seconds: float | None = None) -> None:
        """Record a run's outcome (one of runner.STATUSES), its result JSON if any, the error
        tail of a failure and its wall-clock time; a run whose GPU throttled (the result's
        telemetry, bench/telemetry.py) gets a `run N throttled: reasons` event with it."""
        if outcome not in STATUSES:
            raise LedgerError(f"run {run_id}: outcome {outcome!r} is not one of {STATUSES}")
        with self._write() as db:
            self._check_running(run_id, "finish")
            db.execute("UPDATE runs SET state = 'finished', outcome = ?, result = ?, error = ?, "
                       "wall_seconds = ?, finished_at = ? WHERE id = ?",
                       (outcome, None if result is None else json.dumps(dict(result)), error,
                        wall_seconds, now(), run_id))
            throttled = flagged(result)
            if throttled:  # its time is slower than the GPU is: flagged where status shows it
                db.execute("INSERT INTO events (time, text) VALUES (?, ?)",
                           (now(), f"run {run_id} throttled: {', '.join(throttled)}"))

    def _check_running(self, run_id: int, verb: str) -> None:
        row = self._one("SELECT state FROM runs WHERE id = ?", (run_id,))
        if row is None or row["state"] != "running":
            state = "missing" if row is None else row["state"]
            raise LedgerError(f"cannot {verb} run {run_id}: it is {state}, not running")

    def discard_run(self, run_id: int, reason: str, result: Mapping | None,
                    wall_seconds: float | None) -> None:
        """Record a finished run that must not count (measured while the machine was
        disturbed): discarded with `reason`, its result kept for the record, an event said."""
        with self._write() as db:
            self._check_running(run_id, "discard")
            db.execute("UPDATE runs SET state = 'discarded', result = ?, error = ?, "
                       "wall_seconds = ?, finished_at = ? WHERE id = ?",
                       (None if result is None else json.dumps(dict(result)), reason,
                        wall_seconds, now(), run_id))
            db.execute("INSERT INTO events (time, text) VALUES (?, ?)",
                       (now(), f"run {run_id} discarded, to be run again: {reason}"))

    def discard_unfinished_runs(self, reason: str = "the session stopped while it ran "
                                "(discarded on resume, never counted)") -> list[int]:
        """On resume: mark every run still 'running' as discarded with `reason`, in one
        transaction. Returns their ids; their candidates stay as they were, to be re-run."""
        with self._write() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM runs WHERE state = 'running' "
                                            "ORDER BY id")]
            db.execute("UPDATE runs SET state = 'discarded', error = ?, finished_at = ? "
                       "WHERE state = 'running'", (reason, now()))
        return ids

    def runs_of(self, candidate_id: int, roles: Iterable[str] | None = None,
                ok_only: bool = False) -> list[dict]:
        """The candidate's finished runs in order (never running or discarded ones), as
        dicts with `result` parsed; optionally only some roles or only outcome 'ok'."""
        sql, args = "SELECT * FROM runs WHERE candidate_id = ? AND state = 'finished'", \
            [candidate_id]
        if roles is not None:
            roles = list(roles)
            sql += f" AND role IN ({', '.join('?' * len(roles))})"
            args += roles
        if ok_only:
            sql += " AND outcome = 'ok'"
        return [run_row(r) for r in self._db.execute(sql + " ORDER BY id", args)]

    def results_of(self, candidate_id: int, roles: Iterable[str] | None = None) -> list[dict]:
        """The judge's input: one result dict per finished run, with `status` set to the
        runner's outcome, `seed` to the run's seed and `slot` to its slot (a crash without a
        result JSON becomes {'status': 'crash', 'seed': s, 'slot': n}; an early-stopped run
        is not 'ok' whatever its JSON says)."""
        return [{**(r["result"] or {}), "status": r["outcome"], "seed": r["seed"],
                 "slot": r["slot"]} for r in self.runs_of(candidate_id, roles)]

    def running_runs(self) -> list[dict]:
        """Runs in state 'running': what runs now (or what a killed session left behind)."""
        return [run_row(r) for r in self._db.execute(
            "SELECT * FROM runs WHERE state = 'running' ORDER BY id")]

    def run(self, run_id: int) -> dict:
        row = self._one("SELECT * FROM runs WHERE id = ?", (run_id,))
        if row is None:
            raise LedgerError(f"no run {run_id} in {self.path}")
        return run_row(row)

    def used_seeds(self, candidate_id: int | None = None) -> set[int]:
        """Seeds of all runs not discarded (of one candidate, if given): the judge needs a
        fresh seed for every replicate."""
        sql = "SELECT DISTINCT seed FROM runs WHERE state != 'discarded'"
        rows = self._db.execute(sql, ()) if candidate_id is None else \
            self._db.execute(sql + " AND candidate_id = ?", (candidate_id,))
        return {r[0] for r in rows}

    # -- the holdout slice: checkpoints scored afresh (acceptance) -------------------------

    def set_holdout(self, run_id: int, val: Mapping, holdout: Mapping) -> None:
        """A run's checkpoint evaluated on the val and holdout slices ({'loss', 'bpb'} each).
        Written once: a checkpoint's numbers do not change."""
        with self._write() as db:
            if self._one("SELECT 1 FROM holdout WHERE run_id = ?", (run_id,)) is not None:
                raise LedgerError(f"run {run_id} already has its holdout evaluation")
            db.execute("INSERT INTO holdout VALUES (?, ?, ?, ?, ?, ?)",
                       (run_id, float(val["loss"]), val.get("bpb"), float(holdout["loss"]),
                        holdout.get("bpb"), now()))

    def holdout_of(self, run_ids: Iterable[int]) -> dict[int, dict]:
        """run id -> {'val_loss', 'val_bpb', 'holdout_loss', 'holdout_bpb'} for the runs whose
        checkpoint was evaluated."""
        ids = list(run_ids)
        if not ids:
            return {}
        rows = self._db.execute(f"SELECT * FROM holdout WHERE run_id IN "
                                f"({', '.join('?' * len(ids))})", ids)
        return {r["run_id"]: dict(r) for r in rows}

