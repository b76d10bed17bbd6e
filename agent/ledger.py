"""The ledger: a session's single source of truth, one SQLite file in the run directory.

Everything a session learns goes here first: its config, every candidate (parent, diff,
hypothesis, proposer, the judge's decision), every benchmark run (seed, outcome, result JSON,
log path), the champion history and a free-form event log. Status, report and W&B are
derived from it and nothing else, so a session killed at any instant (`kill -9`) can be
resumed from it.

Each public write is one transaction (agent/store.py): after a kill it is either wholly
in the file or not at all; so is a new ledger with its session row. A run that was in
flight when the session died is left in state 'running'; `discard_unfinished_runs` marks
such runs 'discarded' with the reason on resume, and discarded runs are never counted
(not in `runs_of`, `results_of`, `used_seeds`). A candidate moves proposed -> running ->
decided, or proposed -> refused, or running -> held -> decided (a step too large to
believe is held for a human, who decides it with `python -m agent review`), never back:
it cannot be decided (or counted) twice. A candidate an integrity check caught names that
check in `caught_by` (bench/INTEGRITY.md lists the names).

What the ledger must never do: hold state outside the file, delete or rewrite a finished
run or a decision, or let a reader see half of a write.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from agent.ledger_runs import RunRecords
from agent.store import CANDIDATES, LedgerError, candidate_row, now

VERDICTS = ("accept", "reject")  # what `record_decision` records; "refused" comes from
# `refuse`, "held" from `hold`, "rebased" from `rebase`


def _speedup(candidate_id: int, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise LedgerError(f"candidate {candidate_id}: speedup {value!r} is not a positive "
                          "finite ratio vs the baseline")
    return float(value)


def _payload(decision: Any) -> dict:
    return dataclasses.asdict(decision) if dataclasses.is_dataclass(decision) else dict(decision)


def _check_verdict(candidate_id: int, verdict: str, speedup: float | None,
                   caught_by: str | None) -> None:
    if verdict not in VERDICTS:
        raise LedgerError(f"verdict {verdict!r}: choose one of {VERDICTS}")
    if (verdict == "accept") != (speedup is not None):
        raise LedgerError(f"candidate {candidate_id}: pass speedup= exactly when "
                          f"accepting (verdict {verdict!r}, speedup {speedup!r})")
    if verdict == "accept" and caught_by is not None:
        raise LedgerError(f"candidate {candidate_id}: accepted, yet caught by {caught_by}")


class Ledger(RunRecords):
    """One session's ledger: the file `D/ledger.sqlite` of its run directory D (RunDir.ledger).

    `Ledger(RunDir(D).ledger)` opens it, creating it (and D) if needed; `create=False` (for
    `status` and `report`) refuses to make a new one. Any thread may use it (each gets its own
    connection); other processes may read while the loop writes (WAL), e.g.
    `python -m agent status D`.
    """

    @classmethod
    def create(cls, path: str | Path, config: Mapping[str, Any]) -> Ledger:
        """A new ledger at `path` with its session row, or none at all (Store.build)."""
        return cls.build(path, lambda ledger: ledger.set_session(config))

    # -- session --------------------------------------------------------------------------

    def set_session(self, config: Mapping[str, Any]) -> dict:
        """Store the session's config (JSON-able). The first call also fixes the session's id
        and creation time; a later call (a resume with new budgets) replaces the config."""
        with self._write() as db:
            if self._one("SELECT 1 FROM session") is None:
                session_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
                db.execute("INSERT INTO session VALUES (1, ?, ?, ?)",
                           (session_id, now(), json.dumps(dict(config))))
            else:
                db.execute("UPDATE session SET config = ?", (json.dumps(dict(config)),))
        return self.session()

    def session(self) -> dict | None:
        """{'id', 'created', 'config'}, or None before `set_session`."""
        row = self._one("SELECT id, created, config FROM session")
        if row is None:
            return None
        return {"id": row["id"], "created": row["created"], "config": json.loads(row["config"])}

    # -- candidates -----------------------------------------------------------------------

    def add_candidate(self, description: str, *, parent_id: int | None, **fields) -> int:
        """A new candidate in state 'proposed' (`fields`: those of `_insert_candidate`);
        parent_id=None makes it the session's one baseline. Returns its id."""
        with self._write() as db:
            return self._insert_candidate(db, description, parent_id=parent_id, **fields)

    def _insert_candidate(self, db: sqlite3.Connection, description: str, *,
                          parent_id: int | None, diff: str = "", commit_sha: str | None = None,
                          ref: str | None = None, hypothesis: str = "", category: str = "",
                          proposer: str = "", usage: Mapping[str, Any] | None = None) -> int:
        if not description.strip():
            raise LedgerError("a candidate needs a description (one line for the report)")
        try:
            cur = db.execute(
                "INSERT INTO candidates (parent_id, commit_sha, ref, diff, description, "
                "hypothesis, category, proposer, created, state, usage) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'proposed', ?)",
                (parent_id, commit_sha, ref, diff, description, hypothesis, category,
                 proposer, now(), None if usage is None else json.dumps(dict(usage))))
        except sqlite3.IntegrityError as err:
            what = "a baseline exists already" if parent_id is None else \
                f"parent {parent_id} is not a candidate"
            raise LedgerError(f"cannot add candidate {description!r}: {what} ({err})") from err
        return int(cur.lastrowid)

    def candidate(self, candidate_id: int) -> dict:
        row = self._one(CANDIDATES + " WHERE id = ?", (candidate_id,))
        if row is None:
            raise LedgerError(f"no candidate {candidate_id} in {self.path}")
        return candidate_row(row)

    def candidates(self, states: Iterable[str] | None = None) -> list[dict]:
        """All candidates in id order (optionally only those in `states`); each dict has the
        table's columns, `decision` parsed, and `experiment` (None for the baseline)."""
        rows = self._db.execute(CANDIDATES + " ORDER BY id").fetchall()
        wanted = None if states is None else set(states)
        return [candidate_row(r) for r in rows if wanted is None or r["state"] in wanted]

    def baseline(self) -> dict | None:
        row = self._one(CANDIDATES + " WHERE parent_id IS NULL")
        return None if row is None else candidate_row(row)

    def record_decision(self, candidate_id: int, verdict: str, decision: Any, *,
               speedup: float | None = None, caught_by: str | None = None) -> None:
        """Record the verdict ('accept' or 'reject') and the judge's Decision (a dataclass or
        a mapping). Accepting makes the candidate the champion in the same transaction, so
        `speedup` (vs the baseline) is required then; the baseline becomes the first
        champion this way too, with speedup 1.0, after its replicates. `caught_by` names the
        integrity checks behind a rejection."""
        _check_verdict(candidate_id, verdict, speedup, caught_by)
        with self._write() as db:
            self._check_idle(candidate_id, f"decide {verdict}")
            self._set_verdict(db, candidate_id, "decided", verdict, _payload(decision),
                              caught_by, speedup)

    def hold(self, candidate_id: int, decision: Any, caught_by: str) -> None:
        """Hold a candidate the loop would accept for a human (`review`): it is neither
        champion nor rejected until then. `decision` carries the evidence."""
        with self._write() as db:
            self._check_state(candidate_id, ("running",), "hold")
            self._set_verdict(db, candidate_id, "held", "held", _payload(decision), caught_by)

    def review(self, candidate_id: int, verdict: str, note: str, *,
               speedup: float | None = None) -> None:
        """A human's verdict on a held candidate: accept (it becomes the champion, with
        `speedup` vs the baseline) or reject. The held evidence is kept, with the review
        ({'verdict', 'note', 'at'}) added under 'review', and caught_by stays: the check
        held it, a human decided."""
        _check_verdict(candidate_id, verdict, speedup, None)
        with self._write() as db:
            self._check_state(candidate_id, ("held",), f"review {verdict}")
            row = self._one("SELECT decision, caught_by FROM candidates WHERE id = ?",
                            (candidate_id,))
            payload = json.loads(row["decision"] or "{}")
            payload["review"] = {"verdict": verdict, "note": note, "at": now()}
            self._set_verdict(db, candidate_id, "decided", verdict, payload, row["caught_by"],
                              speedup)

    def _set_verdict(self, db: sqlite3.Connection, candidate_id: int, state: str,
                     verdict: str, payload: dict, caught_by: str | None,
                     speedup: float | None = None) -> None:
        db.execute("UPDATE candidates SET state = ?, verdict = ?, decision = ?, "
                   "decided_at = ?, caught_by = ? WHERE id = ?",
                   (state, verdict, json.dumps(payload), now(), caught_by, candidate_id))
        if verdict == "accept":
            db.execute("INSERT INTO champions (candidate_id, since, speedup) VALUES (?, ?, ?)",
                       (candidate_id, now(), _speedup(candidate_id, speedup)))

    def refuse(self, candidate_id: int, reason: str, caught_by: str | None = None) -> None:
        """Refuse a candidate before it runs (its diff leaves the research surface, or the
        diff scan flags it: `caught_by` names the check)."""
        with self._write() as db:
            self._check_state(candidate_id, ("proposed",), "refuse")
            self._set_verdict(db, candidate_id, "refused", "refused",
                              {"verdict": "refused", "reason": reason}, caught_by)

    def add_refused(self, description: str, reason: str, *, parent_id: int, diff: str = "",
                    proposer: str = "", usage: Mapping[str, Any] | None = None,
                    caught_by: str | None = None) -> int:
        """A candidate refused before it could run, added and refused in one transaction (a
        kill between the two would leave a 'proposed' candidate with no commit to run).
        Returns its id."""
        with self._write() as db:
            cid = self._insert_candidate(db, description, parent_id=parent_id, diff=diff,
                                         proposer=proposer, usage=usage)
            self._set_verdict(db, cid, "refused", "refused",
                              {"verdict": "refused", "reason": reason}, caught_by)
        return cid

    def rebase(self, candidate_id: int, reason: str, *, onto: Mapping[str, Any] | None
               ) -> int | None:
        """Close a candidate whose champion was replaced while it ran (verdict 'rebased':
        its runs stay, as evidence against its old parent only) and, in the same
        transaction, add its copy `onto` the new champion (the fields of `add_candidate`:
        commit_sha, ref, diff, ...; the description, hypothesis, category and proposer are
        the old one's). Returns the copy's id; None when `onto` is None (the change did not
        apply to the new champion: it goes back to its proposer)."""
        with self._write() as db:
            self._check_idle(candidate_id, "re-base")
            old = candidate_row(self._one("SELECT * FROM candidates WHERE id = ?",
                                          (candidate_id,)))
            new_id = None
            if onto is not None:
                fields = {k: old[k] for k in ("hypothesis", "category", "proposer")}
                new_id = self._insert_candidate(db, old["description"], **{**fields, **onto})
            self._set_verdict(db, candidate_id, "decided", "rebased",
                              {"verdict": "rebased", "reason": reason, "rebased_as": new_id},
                              None)
        return new_id

    def held(self) -> list[dict]:
        """Candidates held for a human's review, oldest first."""
        return self.candidates(["held"])

    def _check_idle(self, candidate_id: int, action: str) -> None:
        """A candidate may be decided (or re-based) while proposed or running, with no run
        still going."""
        self._check_state(candidate_id, ("proposed", "running"), action)
        busy = self._one("SELECT id FROM runs WHERE candidate_id = ? AND state = 'running'",
                         (candidate_id,))
        if busy is not None:
            raise LedgerError(f"cannot {action} candidate {candidate_id}: run {busy[0]} is "
                              "still running; finish or discard it first")

    def _check_state(self, candidate_id: int, allowed: tuple[str, ...], action: str) -> None:
        row = self._one("SELECT state FROM candidates WHERE id = ?", (candidate_id,))
        if row is None:
            raise LedgerError(f"cannot {action}: no candidate {candidate_id} in {self.path}")
        if row["state"] not in allowed:
            raise LedgerError(f"cannot {action} candidate {candidate_id}: it is "
                              f"{row['state']} (needs {' or '.join(allowed)})")

    # -- champion -------------------------------------------------------------------------

    def champion(self) -> dict | None:
        """The current champion's candidate dict plus `champion_since` and `speedup`."""
        row = self._one("SELECT candidate_id, since, speedup FROM champions "
                        "ORDER BY id DESC LIMIT 1")
        if row is None:
            return None
        return {**self.candidate(row["candidate_id"]), "champion_since": row["since"],
                "speedup": row["speedup"]}

    def champions(self) -> list[dict]:
        """The champion history, oldest first: {'candidate_id', 'since', 'speedup'}."""
        return [dict(r) for r in self._db.execute(
            "SELECT candidate_id, since, speedup FROM champions ORDER BY id")]

    # -- budgets and events ---------------------------------------------------------------

    def n_experiments(self) -> int:
        """Candidates decided, held or refused, the baseline excluded: the experiments
        budget. A re-based candidate is not counted: its experiment goes on as its copy."""
        return self._one("SELECT COUNT(*) FROM candidates WHERE parent_id IS NOT NULL AND "
                         "state IN ('decided', 'held', 'refused') AND "
                         "verdict IS NOT 'rebased'")[0]

    def add_spend(self, model: str, usage: Mapping[str, Any]) -> None:
        """One LLM request's tokens and cost (agent.costs.Usage.as_dict), recorded when the
        response arrives, from whichever thread made the request."""
        columns = ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                   "cache_read_input_tokens")
        with self._write() as db:
            db.execute(f"INSERT INTO spend (time, model, {', '.join(columns)}, cost_usd) "
                       f"VALUES (?, ?, {', '.join('?' * len(columns))}, ?)",
                       (now(), model, *(int(usage.get(c) or 0) for c in columns),
                        float(usage.get("cost_usd") or 0.0)))

    def spend(self) -> dict:
        """The session's LLM spend so far: cost_usd, requests and the token sums."""
        row = self._one("SELECT COUNT(*) AS requests, TOTAL(cost_usd) AS cost_usd, "
                        "TOTAL(input_tokens) AS input_tokens, "
                        "TOTAL(output_tokens) AS output_tokens, "
                        "TOTAL(cache_creation_input_tokens) AS cache_creation_input_tokens, "
                        "TOTAL(cache_read_input_tokens) AS cache_read_input_tokens FROM spend")
        return {k: (row[k] if k == "cost_usd" else int(row[k])) for k in row.keys()}

    def log_event(self, text: str) -> None:
        with self._write() as db:
            db.execute("INSERT INTO events (time, text) VALUES (?, ?)", (now(), text))

    def last_event(self, prefix: str) -> dict | None:
        """The latest event whose text starts with `prefix`: {'id', 'time', 'text'}."""
        row = self._one("SELECT * FROM events WHERE substr(text, 1, ?) = ? ORDER BY id DESC "
                        "LIMIT 1", (len(prefix), prefix))
        return None if row is None else dict(row)

    def events(self, limit: int = 20) -> list[dict]:
        """The last `limit` events, oldest first: {'id', 'time', 'text'}."""
        rows = self._db.execute("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
        return [dict(r) for r in reversed(rows.fetchall())]
