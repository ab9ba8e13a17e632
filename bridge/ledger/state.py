"""Durable progress: the cursor and the per-instance ledger, in SQLite inside `state_dir`.

SQLite in WAL mode with synchronous=FULL makes every commit survive kill -9 and power loss, and
the ledger row of an instance is written in the same transaction as the cursor that passes it,
so the two can never disagree. A lock file keeps a second bridge off the same state.

The ledger keeps all-time totals per state and per (target, state), maintained by triggers in
the transaction of each write, so counting costs nothing however long the bridge has run and
whatever retention has pruned. Readers that must never wait for a transfer (the status page,
/metrics) use `State.reader`: a read-only connection of their own, which WAL lets read while
the writer commits.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from bridge.errors import StateError
from bridge.outcomes import (
    FINISHED,
    PENDING,
    PROBLEMS,
    PRUNABLE,
    Delivery,
    Entry,
)

log = logging.getLogger(__name__)

# Below this, a write may fail for want of room (a WAL checkpoint needs some).
_MIN_FREE_BYTES = 16 * 1024 * 1024
# 1: the ledger of 2026-12-03 (no version recorded, no totals). 2: totals, (state, updated).
SCHEMA_VERSION = 2

# The tables as version 1 made them (its index on state alone is replaced in version 2).
_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY,
    seq INTEGER,
    state TEXT NOT NULL,
    source_syntax TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    first_seen REAL NOT NULL,
    updated REAL NOT NULL,
    seconds REAL,
    deleted_original INTEGER NOT NULL DEFAULT 0
);
-- The outcome of each instance at each target; `instances` holds the overall one.
CREATE TABLE IF NOT EXISTS deliveries (
    instance_id TEXT NOT NULL,
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    updated REAL NOT NULL,
    PRIMARY KEY (instance_id, target)
);
"""

# Version 2. Totals are kept by triggers rather than by `record`: every write that changes a
# state (an upsert, requeue's UPDATE, any future one, even a bridge of version 1 run again on
# this file) keeps them exact, in its own transaction. Deleting a row (retention) leaves them:
# they are all-time counts. (state, updated) serves retention's scan and the page's latest
# problems; it makes version 1's index on (state) alone redundant.
_VERSION_2 = """
CREATE TABLE IF NOT EXISTS totals (
    state TEXT PRIMARY KEY, n INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS delivery_totals (
    target TEXT NOT NULL, state TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (target, state)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS instances_state_updated ON instances (state, updated);
DROP INDEX IF EXISTS instances_state;
CREATE TRIGGER IF NOT EXISTS instances_added AFTER INSERT ON instances BEGIN
    INSERT INTO totals (state, n) VALUES (new.state, 1)
        ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS instances_moved AFTER UPDATE OF state ON instances
WHEN old.state != new.state BEGIN
    UPDATE totals SET n = n - 1 WHERE state = old.state;
    INSERT INTO totals (state, n) VALUES (new.state, 1)
        ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS deliveries_added AFTER INSERT ON deliveries BEGIN
    INSERT INTO delivery_totals (target, state, n) VALUES (new.target, new.state, 1)
        ON CONFLICT (target, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS deliveries_moved AFTER UPDATE OF state ON deliveries
WHEN old.state != new.state BEGIN
    UPDATE delivery_totals SET n = n - 1 WHERE target = old.target AND state = old.state;
    INSERT INTO delivery_totals (target, state, n) VALUES (new.target, new.state, 1)
        ON CONFLICT (target, state) DO UPDATE SET n = n + 1;
END;
"""

# Counted once, when a version 1 ledger is migrated; `WHERE true` lets SQLite parse the
# upsert-free INSERT ... SELECT unambiguously.
_FILL_TOTALS = """
DELETE FROM totals;
DELETE FROM delivery_totals;
INSERT INTO totals (state, n) SELECT state, count(*) FROM instances WHERE true GROUP BY state;
INSERT INTO delivery_totals (target, state, n)
    SELECT target, state, count(*) FROM deliveries WHERE true GROUP BY target, state;
"""


class Pruned(NamedTuple):
    """What one batch of retention did."""

    rows: int
    seconds: float  # the write lock held, about


class LedgerReads:
    """The reads of the cursor and the ledger, each served by an index or the totals."""

    dir: Path
    _db: sqlite3.Connection
    _lock: threading.Lock
    # False only for a read-only look at a version 1 ledger, which has no totals yet.
    _totals = True

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StateError(f"cannot read the state in {self.dir}: {exc}") from None

    def cursor(self) -> int:
        """The last change sequence whose work is finished (0 before the first run)."""
        rows = self._query("SELECT value FROM meta WHERE key = 'cursor'")
        return int(str(rows[0][0])) if rows else 0

    def counts(self) -> dict[str, int]:
        """How many instances are in each state, all time (pruned rows included)."""
        if not self._totals:
            return _counted(self._query("SELECT state, count(*) FROM instances GROUP BY state"))
        return _counted(self._query("SELECT state, n FROM totals WHERE n != 0"))

    def delivery_counts(self) -> dict[str, dict[str, int]]:
        """How many instances are in each state, per target, all time."""
        sql = (
            "SELECT target, state, n FROM delivery_totals WHERE n != 0"
            if self._totals
            else "SELECT target, state, count(*) FROM deliveries GROUP BY target, state"
        )
        counts: dict[str, dict[str, int]] = {}
        for target, state, n in self._query(sql):
            counts.setdefault(str(target), {})[str(state)] = int(str(n))
        return counts

    def count_in(self, states: tuple[str, ...]) -> dict[str, int]:
        """How many instances are in each of `states`."""
        counts = self.counts()
        return {state: counts[state] for state in states if state in counts}

    def entries(self, states: tuple[str, ...], limit: int | None = 1000) -> list[Entry]:
        """The most recently updated entries in the given states; all of them if `limit` is
        None."""
        # One walk down the (state, updated) index per state, merged here: a single query with
        # `state IN (...) ORDER BY updated` would sort every row of those states to keep a few.
        per_state = [
            [
                _entry(row)
                for row in self._query(
                    f"SELECT {_COLUMNS} FROM instances WHERE state = ? "
                    "ORDER BY updated DESC LIMIT ?",
                    (state, -1 if limit is None else limit),  # SQLite: a negative LIMIT is none
                )
            ]
            for state in dict.fromkeys(states)
        ]
        merged = heapq.merge(*per_state, key=lambda e: e.updated, reverse=True)
        return list(merged)[:limit] if limit is not None else list(merged)


class Reader(LedgerReads):
    """A read-only connection of its own, with its own lock: it never waits for a writer."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self._lock = threading.Lock()
        try:
            self._db = _connect_read_only(state_dir / State.FILE)
        except sqlite3.Error as exc:
            raise StateError(f"cannot read the state in {state_dir}: {exc}") from None

    def close(self) -> None:
        """Close the connection."""
        self._db.close()


class State(LedgerReads):
    """The cursor and ledger of one bridge; safe to share between threads.

    `read_only` opens it without the lock file and without writing anything (for `status`,
    while a bridge may be running): a version 1 ledger is then counted row by row.
    """

    FILE = "bridge.sqlite"

    def __init__(
        self, state_dir: Path, read_only: bool = False, clock: Callable[[], float] = time.time
    ) -> None:
        self.dir = state_dir
        self._clock = clock
        self._lock = threading.Lock()
        self._lock_file: int | None = None
        self.reader: LedgerReads = self
        path = state_dir / self.FILE
        try:
            if read_only:
                self._db = _connect_read_only(path)
                self._totals = _version(self._db, path) >= 2
                return
            state_dir.mkdir(parents=True, exist_ok=True)
            self._take_lock()
            self._db = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=30
            )
            self._open()
            self.reader = Reader(state_dir)
        except (OSError, sqlite3.Error) as exc:
            self.close()
            raise StateError(f"cannot open the state in {state_dir}: {exc}") from None
        except StateError:
            self.close()
            raise

    def _open(self) -> None:
        """Create, or bring to this version, the ledger (the lock file is held)."""
        db = self._db
        path = self.dir / self.FILE
        version = _version(db, path)  # refuses a newer ledger before anything is written
        if version == 0:
            # Only possible before the first table: lets incremental_vacuum give freed pages
            # back. A version 1 ledger keeps its mode; changing it needs a full VACUUM.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        if version == SCHEMA_VERSION:
            return
        started = time.monotonic()
        fill = _FILL_TOTALS if version == 1 else ""
        try:
            # One transaction: a migration cut short (kill -9) leaves version 1, done again.
            db.executescript(
                f"BEGIN IMMEDIATE; {_TABLES} {_VERSION_2} {fill}"
                "INSERT INTO meta (key, value) VALUES ('schema_version', "
                f"'{SCHEMA_VERSION}') ON CONFLICT (key) DO UPDATE SET value = excluded.value;"
                "COMMIT;"
            )
        finally:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
        if version == 1:
            rows = sum(self.counts().values())
            log.info(
                "ledger %s migrated from version 1 to %d: totals of %d instances counted, "
                "indexes added, in %.1f s",
                path,
                SCHEMA_VERSION,
                rows,
                time.monotonic() - started,
            )

    def _take_lock(self) -> None:
        self._lock_file = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateError(
                f"another orthanc-bridge is already using {self.dir}; stop it first"
            ) from None

    def close(self) -> None:
        """Close the database and release the lock."""
        if isinstance(self.reader, Reader):
            self.reader.close()
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                # A COMMIT that failed (disk full, I/O error, busy) may leave the transaction
                # open, and every later BEGIN would then fail: end it, so that the next write
                # starts clean and this one can be tried again in full.
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise StateError(f"cannot write the state in {self.dir}: {exc}") from None

    # --- the cursor -----------------------------------------------------------------------

    def set_cursor(self, seq: int) -> None:
        """Move the cursor, durably."""
        with self._transaction() as db:
            _write_cursor(db, seq)

    # --- the ledger -----------------------------------------------------------------------

    def record(self, entry: Entry, cursor: int | None = None) -> None:
        """Write an instance's outcome and, in the same transaction, the cursor that passes it.

        The totals follow in that transaction too (the triggers of version 2)."""
        now = self._clock()
        # `retry` and `reconcile` work outside the change log (sequence -1): the row keeps the
        # change it was last seen at, which the feed compares when it meets that change again.
        seq = entry.seq if entry.seq is not None and entry.seq >= 0 else None
        with self._transaction() as db:
            db.execute(
                """INSERT INTO instances (instance_id, seq, state, source_syntax, attempts, error,
                                          first_seen, updated, seconds, deleted_original)
                   VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?)
                   ON CONFLICT (instance_id) DO UPDATE SET
                       seq = coalesce(excluded.seq, seq), state = excluded.state,
                       source_syntax = coalesce(excluded.source_syntax, source_syntax),
                       -- finishing a deletion is the same attempt, not another one
                       attempts = attempts + (state != 'deleting'), error = excluded.error,
                       updated = excluded.updated, seconds = excluded.seconds,
                       deleted_original = excluded.deleted_original""",
                (
                    entry.instance_id,
                    seq,
                    entry.state,
                    entry.source_syntax,
                    entry.error,
                    now,
                    now,
                    entry.seconds,
                    int(entry.deleted_original),
                ),
            )
            db.executemany(
                """INSERT INTO deliveries (instance_id, target, state, error, updated)
                   VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (instance_id, target) DO UPDATE SET
                       state = excluded.state, error = excluded.error,
                       updated = excluded.updated""",
                [(entry.instance_id, d.target, d.state, d.error, now) for d in entry.deliveries],
            )
            if cursor is not None:
                _write_cursor(db, cursor)

    def finished(self, instance_id: str, seq: int) -> bool:
        """True when this very change of `instance_id` was already handled."""
        rows = self._query(
            "SELECT state FROM instances WHERE instance_id = ? AND seq = ?", (instance_id, seq)
        )
        return bool(rows) and rows[0][0] in FINISHED

    def get(self, instance_id: str) -> Entry | None:
        """The ledger entry of one instance."""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM instances WHERE instance_id = ?", (instance_id,)
        )
        return _entry(rows[0]) if rows else None

    def deliveries(self, instance_id: str) -> list[Delivery]:
        """The outcome of one instance at each target it was routed to."""
        rows = self._query(
            "SELECT target, state, error FROM deliveries WHERE instance_id = ? ORDER BY target",
            (instance_id,),
        )
        return [Delivery(str(t), str(s), str(e) if e is not None else None) for t, s, e in rows]

    def writable(self) -> str | None:
        """None when a write would succeed now, else why not (read-only, locked, disk full)."""
        try:
            free = os.statvfs(self.dir)
            if free.f_bavail * free.f_frsize < _MIN_FREE_BYTES:
                return f"the disk holding {self.dir} is full"
            with self._lock:
                # Takes the write lock and gives it back: proves the file can be written.
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("ROLLBACK")
        except (OSError, sqlite3.Error) as exc:
            return f"cannot write the state in {self.dir}: {exc}"
        return None

    def requeue(self, states: tuple[str, ...] = PROBLEMS) -> list[str]:
        """Mark entries in `states` pending again and return their instance IDs."""
        marks = ",".join("?" * len(states))
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT instance_id FROM instances WHERE state IN ({marks})", states
            ).fetchall()
            db.execute(
                f"UPDATE instances SET state = ? WHERE state IN ({marks})", (PENDING, *states)
            )
        return [str(row[0]) for row in rows]

    # --- retention ------------------------------------------------------------------------

    def prune(self, before: float, limit: int) -> Pruned:
        """Delete up to `limit` finished rows (and their deliveries) last updated before
        `before`, in one short transaction. The totals keep counting them."""
        marks = ",".join("?" * len(PRUNABLE))
        with self._transaction() as db:
            began = time.monotonic()  # the lock is held from here (and BEGIN just before)
            rows = db.execute(
                f"SELECT rowid, instance_id FROM instances WHERE state IN ({marks}) "
                "AND updated < ? LIMIT ?",
                (*PRUNABLE, before, limit),
            ).fetchall()
            if rows:
                # One statement per table, not one per row: a row's DELETE through executemany
                # costs more in Python than in SQLite, and each lets other threads take the GIL
                # while this one holds the write lock.
                rowids, ids = zip(*rows, strict=True)
                every = ",".join("?" * len(rows))
                db.execute(f"DELETE FROM deliveries WHERE instance_id IN ({every})", ids)
                db.execute(f"DELETE FROM instances WHERE rowid IN ({every})", rowids)
        return Pruned(len(rows), time.monotonic() - began)  # COMMIT included

    def give_back(self, pages: int) -> int:
        """Return up to `pages` free pages to the file system, if the ledger was created with
        incremental auto-vacuum (a version 1 ledger reuses them instead); return how many."""
        with self._lock:
            try:
                if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                    return 0
                free = int(self._db.execute("PRAGMA freelist_count").fetchone()[0])
                # Each row of the pragma's answer is one step: fetch them all or only one runs.
                self._db.execute(f"PRAGMA incremental_vacuum({int(pages)})").fetchall()
                left = int(self._db.execute("PRAGMA freelist_count").fetchone()[0])
            except sqlite3.Error as exc:
                raise StateError(f"cannot write the state in {self.dir}: {exc}") from None
        return free - left


_COLUMNS = (
    "instance_id, seq, state, source_syntax, error, seconds, deleted_original, updated, attempts"
)


def _connect_read_only(path: Path) -> sqlite3.Connection:
    # mode=ro: this connection can never write, whatever a caller asks of it. WAL lets it read
    # the last commit while the writer writes the next.
    if not path.exists():
        raise sqlite3.OperationalError(f"no ledger at {path}")
    return sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=ro",
        uri=True,
        check_same_thread=False,
        isolation_level=None,
        timeout=5,
    )


def _version(db: sqlite3.Connection, path: Path) -> int:
    """The schema version of the ledger behind `db`: 0 when empty, 1 for the ledger of
    2026-12-03 (which recorded none); a version newer than this bridge is refused."""
    tables = {str(r[0]) for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "instances" not in tables:
        return 0
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    version = int(str(row[0])) if row else 1
    if version > SCHEMA_VERSION:
        raise StateError(
            f"the ledger {path} has schema version {version}, newer than this orthanc-bridge "
            f"knows ({SCHEMA_VERSION}): it was written by a newer version; run that version "
            "(this one leaves the file as it is)"
        )
    return version


def _counted(rows: list[tuple[object, ...]]) -> dict[str, int]:
    return {str(state): int(str(n)) for state, n in rows}


def _entry(row: tuple[object, ...]) -> Entry:
    iid, seq, state, syntax, error, seconds, deleted, updated, attempts = row
    return Entry(
        instance_id=str(iid),
        seq=int(str(seq)) if seq is not None else None,
        state=str(state),
        source_syntax=str(syntax) if syntax is not None else None,
        error=str(error) if error is not None else None,
        seconds=float(str(seconds)) if seconds is not None else None,
        deleted_original=bool(deleted),
        updated=float(str(updated)),
        attempts=int(str(attempts)),
    )


def _write_cursor(db: sqlite3.Connection, seq: int) -> None:
    db.execute(
        "INSERT INTO meta (key, value) VALUES ('cursor', ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (str(seq),),
    )
