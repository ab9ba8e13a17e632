"""Durable progress: the cursor and the per-instance ledger, in SQLite inside `state_dir`.

SQLite in WAL mode with synchronous=FULL makes every commit survive kill -9 and power loss, and
the ledger row of an instance is written in the same transaction as the cursor that passes it,
so the two can never disagree. A lock file keeps a second bridge off the same state.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bridge.errors import StateError

CONVERTED = "converted"  # the target holds it in Explicit VR Little Endian
FORWARDED = "forwarded"  # sent unchanged, as a `forward` rule or `forward_unchanged` asks
SKIPPED = "skipped"  # no target's rules take it: left in the source
FAILED = "failed"  # permanent error: kept in the source, reason recorded
UNSUPPORTED = "unsupported"  # cannot become native pixels: kept in the source
VANISHED = "vanished"  # deleted from the source before the bridge got to it
PENDING = "pending"  # re-queued by `retry`
DELETING = "deleting"  # verified in the target; deleting the original was under way
# Below this, a write may fail for want of room (a WAL checkpoint needs some).
_MIN_FREE_BYTES = 16 * 1024 * 1024
FINISHED = (CONVERTED, FORWARDED, FAILED, UNSUPPORTED, VANISHED, SKIPPED)
PROBLEMS = (FAILED, UNSUPPORTED)

SCHEMA = """
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
CREATE INDEX IF NOT EXISTS instances_state ON instances (state);
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


@dataclass(frozen=True)
class Delivery:
    """What became of one instance at one target: converted, forwarded, skipped or failed."""

    target: str
    state: str
    error: str | None = None


@dataclass(frozen=True)
class Entry:
    """The outcome of one instance, as the ledger keeps it."""

    instance_id: str
    seq: int | None
    state: str
    source_syntax: str | None = None
    error: str | None = None
    seconds: float | None = None
    deleted_original: bool = False
    updated: float = 0.0
    attempts: int = 0
    deliveries: tuple[Delivery, ...] = ()  # per target; recorded with the entry
    # Every target that takes it verifiably holds its copy (not written to the ledger).
    deletable: bool = False


class State:
    """The cursor and ledger of one bridge; safe to share between threads."""

    FILE = "bridge.sqlite"

    def __init__(self, state_dir: Path, read_only: bool = False) -> None:
        self.dir = state_dir
        self._lock = threading.Lock()
        self._lock_file: int | None = None
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            if not read_only:
                self._take_lock()
            self._db = sqlite3.connect(
                state_dir / self.FILE, check_same_thread=False, isolation_level=None, timeout=30
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            self.close()
            raise StateError(f"cannot open the state in {state_dir}: {exc}") from None

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

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StateError(f"cannot read the state in {self.dir}: {exc}") from None

    # --- the cursor -----------------------------------------------------------------------

    def cursor(self) -> int:
        """The last change sequence whose work is finished (0 before the first run)."""
        rows = self._query("SELECT value FROM meta WHERE key = 'cursor'")
        return int(str(rows[0][0])) if rows else 0

    def set_cursor(self, seq: int) -> None:
        """Move the cursor, durably."""
        with self._transaction() as db:
            _write_cursor(db, seq)

    # --- the ledger -----------------------------------------------------------------------

    def record(self, entry: Entry, cursor: int | None = None) -> None:
        """Write an instance's outcome and, in the same transaction, the cursor that passes it."""
        now = time.time()
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

    def counts(self) -> dict[str, int]:
        """How many instances are in each state."""
        rows = self._query("SELECT state, count(*) FROM instances GROUP BY state")
        return {str(state): int(str(n)) for state, n in rows}

    def delivery_counts(self) -> dict[str, dict[str, int]]:
        """How many instances are in each state, per target."""
        rows = self._query("SELECT target, state, count(*) FROM deliveries GROUP BY target, state")
        counts: dict[str, dict[str, int]] = {}
        for target, state, n in rows:
            counts.setdefault(str(target), {})[str(state)] = int(str(n))
        return counts

    def deliveries(self, instance_id: str) -> list[Delivery]:
        """The outcome of one instance at each target it was routed to."""
        rows = self._query(
            "SELECT target, state, error FROM deliveries WHERE instance_id = ? ORDER BY target",
            (instance_id,),
        )
        return [Delivery(str(t), str(s), str(e) if e is not None else None) for t, s, e in rows]

    def count_in(self, states: tuple[str, ...]) -> dict[str, int]:
        """How many instances are in each of `states` (read through the state index)."""
        marks = ",".join("?" * len(states))
        rows = self._query(
            f"SELECT state, count(*) FROM instances WHERE state IN ({marks}) GROUP BY state",
            states,
        )
        return {str(state): int(str(n)) for state, n in rows}

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

    def entries(self, states: tuple[str, ...], limit: int | None = 1000) -> list[Entry]:
        """The most recently updated entries in the given states; all of them if `limit` is
        None."""
        marks = ",".join("?" * len(states))
        rows = self._query(
            f"SELECT {_COLUMNS} FROM instances WHERE state IN ({marks}) "
            "ORDER BY updated DESC LIMIT ?",
            (*states, -1 if limit is None else limit),  # SQLite: a negative LIMIT is none
        )
        return [_entry(row) for row in rows]

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


_COLUMNS = (
    "instance_id, seq, state, source_syntax, error, seconds, deleted_original, updated, attempts"
)


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
