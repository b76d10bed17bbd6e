"""The ledger's SQLite file: its tables, connections, transactions and schema version.

One connection per thread (an LLM proposer drafting in a background thread logs its pauses
and costs while the loop's thread records runs; SQLite serialises the writers). Every
write is one transaction (`_write`: BEGIN IMMEDIATE ... COMMIT), so after a kill it is
wholly in the file or not at all, and every write is a step boundary of the fault
injection (agent/faults.py). Readers in other processes see a consistent state (WAL).

What this module must never do: let a reader see half of a write, or read a file whose
schema is not the one it knows.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from agent import faults

SCHEMA_VERSION = 5
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE session (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),  -- one session per ledger
    id TEXT NOT NULL,           -- e.g. 20260101-221500-3fa2: W&B group, report title
    created REAL NOT NULL,      -- unix seconds, like every time in this file
    config TEXT NOT NULL        -- JSON: preset, objective, proposer, budgets, judge, commit
);
CREATE TABLE candidates (
    id INTEGER PRIMARY KEY,
    parent_id INTEGER REFERENCES candidates(id),  -- champion it was made from; NULL: baseline
    commit_sha TEXT,
    ref TEXT,                   -- the git ref that keeps the commit, accepted or not
    diff TEXT NOT NULL,
    description TEXT NOT NULL,
    hypothesis TEXT NOT NULL,
    category TEXT NOT NULL,
    proposer TEXT NOT NULL,
    created REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('proposed', 'running', 'held', 'decided', 'refused')),
    verdict TEXT CHECK (verdict IN ('accept', 'reject', 'refused', 'held', 'rebased')),
    decision TEXT,              -- JSON: the judge's Decision (+ checks, review), or the refusal
    decided_at REAL,            -- when it was decided, refused or held
    usage TEXT,                 -- JSON: the proposer's LLM tokens and cost for it, if any
    caught_by TEXT,             -- the integrity checks that caught it, comma-separated; or NULL
    CHECK ((state IN ('held', 'decided', 'refused')) = (verdict IS NOT NULL)),
    CHECK ((state = 'refused') = (verdict IS 'refused')),
    CHECK ((state = 'held') = (verdict IS 'held'))
);
CREATE UNIQUE INDEX one_baseline ON candidates((parent_id IS NULL)) WHERE parent_id IS NULL;
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    candidate_id INTEGER NOT NULL REFERENCES candidates(id),
    role TEXT NOT NULL CHECK (role IN ('baseline', 'screen', 'confirm', 'champion')),
    seed INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('running', 'finished', 'discarded')),
    outcome TEXT,               -- the runner's class (runner.STATUSES); NULL unless finished
    result TEXT,                -- JSON: train.py's result, when it wrote one
    error TEXT,                 -- failure tail, or why the run was discarded
    log_path TEXT,
    wall_seconds REAL,
    started_at REAL NOT NULL,
    finished_at REAL,
    slot TEXT,                  -- the slot it ran on (agent/slots.py): "0", "1", ...
    lock_path TEXT,             -- the device lock the run needs
    lock_at REAL,               -- when it got it; NULL while it waits (or never took one)
    lock_wait_s REAL,           -- how long it waited for it (another process held it)
    CHECK ((state = 'finished') = (outcome IS NOT NULL))
);
CREATE INDEX runs_of_candidate ON runs(candidate_id);
CREATE TABLE champions (
    id INTEGER PRIMARY KEY,
    candidate_id INTEGER NOT NULL REFERENCES candidates(id),
    since REAL NOT NULL,
    speedup REAL NOT NULL       -- vs the baseline, as the loop measured it then
);
CREATE TABLE events (id INTEGER PRIMARY KEY, time REAL NOT NULL, text TEXT NOT NULL);
CREATE TABLE holdout (          -- a checkpoint's losses on the val and holdout slices
    run_id INTEGER PRIMARY KEY REFERENCES runs(id),
    val_loss REAL NOT NULL,
    val_bpb REAL,
    holdout_loss REAL NOT NULL,
    holdout_bpb REAL,
    created REAL NOT NULL
);
CREATE TABLE spend (            -- one row per LLM request, written as it is paid for
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    model TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cache_creation_input_tokens INTEGER NOT NULL,
    cache_read_input_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL
);
"""


# Candidates with their experiment number: 1, 2, ... in order of creation, baseline excluded.
CANDIDATES = """
SELECT * FROM (
    SELECT *, CASE WHEN parent_id IS NULL THEN NULL
                   ELSE ROW_NUMBER() OVER (PARTITION BY parent_id IS NULL ORDER BY id) END
              AS experiment
    FROM candidates)
"""




def now() -> float:
    return time.time()


def candidate_row(row: sqlite3.Row) -> dict:
    out = dict(row)
    out["decision"] = json.loads(out["decision"]) if out["decision"] else None
    out["usage"] = json.loads(out["usage"]) if out["usage"] else None
    return out


def run_row(row: sqlite3.Row) -> dict:
    out = dict(row)
    out["result"] = json.loads(out["result"]) if out["result"] else None
    return out


class LedgerError(RuntimeError):
    """A ledger file or a call that breaks the ledger's rules; the message says which."""


class Store:
    """The SQLite file at `path` with the tables of SCHEMA, made when `create` and the file
    is new; agent/ledger.py says what its rows mean and how they may change."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        self.run_dir = self.path.parent
        if not self.path.exists():
            if not create:
                raise FileNotFoundError(f"no ledger at {self.path}: is {self.run_dir} the "
                                        "--run-dir of a `python -m agent run` session?")
            self.run_dir.mkdir(parents=True, exist_ok=True)
        # One connection per thread: an LLM proposer drafting in a background thread logs
        # its pauses and costs here while the loop's thread records runs. SQLite serialises
        # the writers (BEGIN IMMEDIATE waits up to the connect timeout for the lock).
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._check_schema(create)

    @property
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            # isolation_level=None: no implicit transactions, every write says BEGIN itself.
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                 check_same_thread=False)  # close() may come from any thread
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA journal_mode = WAL")
            # FULL: fsync the WAL at every commit. WAL is atomic under kill -9 either way;
            # FULL also keeps the last decisions through a power loss or kernel panic of the
            # machine overnight. It costs a few ms per write, a few writes a minute.
            db.execute("PRAGMA synchronous = FULL")
            self._local.db = db
            with self._connections_lock:
                self._connections.append(db)
        return db

    def close(self) -> None:
        with self._connections_lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transactions ---------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        faults.boundary(lambda: "ledger " + faults.caller(("<lambda>", "boundary", "_write")))
        try:  # a Ctrl-C that lands right after BEGIN must roll back too
            self._db.execute("BEGIN IMMEDIATE")  # take the write lock now, not half-way
            yield self._db
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextmanager
    def snapshot(self):
        """Read several things from one consistent state while the loop goes on writing."""
        try:
            self._db.execute("BEGIN")
            yield self
        finally:
            if self._db.in_transaction:
                self._db.execute("COMMIT")

    def _one(self, sql: str, args: Iterable = ()) -> sqlite3.Row | None:
        return self._db.execute(sql, tuple(args)).fetchone()

    def _execute_script(self, db: sqlite3.Connection, script: str) -> None:
        """Statement by statement: executescript would commit outside our transaction."""
        statement = ""
        for line in script.splitlines(keepends=True):
            statement += line
            if sqlite3.complete_statement(statement):
                db.execute(statement)
                statement = ""

    def _check_schema(self, create: bool) -> None:
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master "
                                                 "WHERE type = 'table'")}
        if not tables:
            if not create:
                raise LedgerError(f"{self.path} is empty: its session has not started yet")
            with self._write() as db:
                self._execute_script(db, SCHEMA)
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            return
        if "meta" not in tables:
            raise LedgerError(f"{self.path} is an SQLite file but not a speedloop ledger "
                              "(no meta table): point --run-dir at a session's directory")
        row = self._one("SELECT value FROM meta WHERE key = 'schema_version'")
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise LedgerError(f"{self.path} has ledger schema {version}, newer than the "
                              f"{SCHEMA_VERSION} this speedloop reads: update speedloop")
        if version != SCHEMA_VERSION:
            raise LedgerError(f"{self.path} has ledger schema {version} and this speedloop "
                              f"reads only {SCHEMA_VERSION}: finish that session with the "
                              "speedloop that began it, or start a new run directory")

    @classmethod
    def build(cls, path: str | Path, init):
        """A new file at `path` holding what `init(store)` writes, or none at all: it is
        built beside `path` and renamed into place, so a kill at any moment leaves either
        no file (the session can be started again) or a whole one (it can be resumed)."""
        path = Path(path)
        if path.exists():
            raise LedgerError(f"{path} exists already: resume its session, or choose another "
                              "run directory")
        building = path.with_name(path.name + ".new")
        for leftover in (building, *(building.with_name(building.name + x)
                                     for x in ("-wal", "-shm"))):
            leftover.unlink(missing_ok=True)  # a creation that was killed half-way
        with cls(building) as store:
            init(store)
            store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # all in the main file
        os.replace(building, path)
        return cls(path, create=False)
