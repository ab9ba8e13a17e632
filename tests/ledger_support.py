"""Ledgers for tests and benchmarks/ledger.py: one exactly as the version of 2026-12-03 made
it (schema version 1: no totals, no version recorded), filled quickly; the counts of a ledger
counted row by row, the truth its totals must match."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

# That version's SCHEMA, verbatim.
SCHEMA_V1 = """
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

J2K = "1.2.840.10008.1.2.4.90"
# One failed instance in this many, the rest converted: what a year of a real site looks like.
FAILED_EVERY = 500


def instance_id(n: int) -> str:
    """An Orthanc-like ID (five groups of 8 hex digits), unique per n."""
    digits = f"{n:040x}"
    return "-".join(digits[i : i + 8] for i in range(0, 40, 8))


def fill(
    path: Path,
    rows: int,
    targets: Sequence[str] = ("target",),
    updated: float = 0.0,
    span: float = 0.0,
    start: int = 0,
    chunk: int = 100_000,
) -> None:
    """Write `rows` instances (and one delivery per target each) into a version 1 ledger at
    `path`, last updated from `updated` to `updated + span` in order, with the cursor after
    them; big transactions."""
    step = span / rows if rows else 0.0
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA_V1)
        for first in range(start, start + rows, chunk):
            last = min(first + chunk, start + rows)
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO instances (instance_id, seq, state, source_syntax, attempts, error,"
                " first_seen, updated, seconds, deleted_original) VALUES (?,?,?,?,1,?,?,?,?,0)",
                _instances(first, last, updated, step),
            )
            db.executemany(
                "INSERT INTO deliveries (instance_id, target, state, error, updated) "
                "VALUES (?,?,?,?,?)",
                _deliveries(first, last, targets, updated, step),
            )
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('cursor', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(last),),
            )
            db.execute("COMMIT")
    finally:
        db.close()


def state_of(n: int) -> str:
    """The state `fill` gives instance n."""
    return "failed" if n % FAILED_EVERY == 0 else "converted"


def _instances(first: int, last: int, updated: float, step: float) -> Iterator[tuple[object, ...]]:
    for n in range(first, last):
        state = state_of(n)
        error = "the decoder openjpeg failed on frame 0" if state == "failed" else None
        when = updated + n * step
        yield (instance_id(n), n + 1, state, J2K, error, when, when, 0.2)


def _deliveries(
    first: int, last: int, targets: Sequence[str], updated: float, step: float
) -> Iterator[tuple[object, ...]]:
    for n in range(first, last):
        state = state_of(n)
        for target in targets:
            yield (instance_id(n), target, state, None, updated + n * step)


def rows_counted(path: Path) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """The counts by state and by (target, state) of the ledger at `path`, row by row."""
    db = sqlite3.connect(path)
    try:
        counts = {
            str(s): int(n)
            for s, n in db.execute("SELECT state, count(*) FROM instances GROUP BY state")
        }
        per_target: dict[str, dict[str, int]] = {}
        for target, state, n in db.execute(
            "SELECT target, state, count(*) FROM deliveries GROUP BY target, state"
        ):
            per_target.setdefault(str(target), {})[str(state)] = int(n)
        return counts, per_target
    finally:
        db.close()
