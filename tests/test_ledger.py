"""The ledger after a year (issue 20): all-time totals, schema versions and migration,
retention, and reads that never wait for the writer. Real SQLite files throughout."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from bridge.cli import EXIT_STATE, main
from bridge.errors import StateError
from bridge.ledger.retention import BATCH, DAY, Retention
from bridge.ledger.state import SCHEMA_VERSION, LedgerReads, Pruned, State
from bridge.outcomes import (
    CONVERTED,
    DELETING,
    FAILED,
    FINISHED,
    FORWARDED,
    PENDING,
    PROBLEMS,
    SKIPPED,
    UNSUPPORTED,
    VANISHED,
    Delivery,
    Entry,
)
from tests import bridgectl, ledger_support
from tests.ledger_support import rows_counted
from tests.orthanc import OrthancServer
from tests.polling import wait_for
from tests.test_bridge import truncated_j2k

NOW = 1_800_000_000.0  # the tests' clock: a fixed "now"
OLD = NOW - 91 * DAY  # beyond the default 90 days of retention
REPO = Path(__file__).resolve().parent.parent


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def file_bytes(directory: Path) -> dict[str, str]:
    """A digest of the ledger and of its write-ahead log: proves that nothing was written.
    (A reader may create an empty log and the shared-memory index next to the file.)"""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.name in (State.FILE, f"{State.FILE}-wal") and p.stat().st_size
    }


# --- totals -------------------------------------------------------------------------------


def test_totals_are_exact_through_every_kind_of_rerecord(tmp_path: Path) -> None:
    state = State(tmp_path)
    path = tmp_path / State.FILE
    both = (Delivery("a", CONVERTED), Delivery("b", FAILED, "refused"))
    steps: list[Callable[[], object]] = [
        lambda: state.record(Entry("x", 1, FAILED, error="truncated")),
        lambda: state.record(Entry("x", 1, FAILED, error="still truncated")),  # same state
        lambda: state.requeue(PROBLEMS),  # failed -> pending, outside record
        lambda: state.record(Entry("x", -1, CONVERTED, deliveries=both)),
        lambda: state.record(Entry("x", -1, CONVERTED, deliveries=both)),  # a re-record
        lambda: state.record(Entry("y", 2, DELETING, deliveries=(Delivery("a", CONVERTED),))),
        lambda: state.record(replace(Entry("y", 2, DELETING), state=CONVERTED)),  # settled
        lambda: state.record(Entry("z", 3, FORWARDED, deliveries=(Delivery("b", FORWARDED),))),
        lambda: state.record(Entry("z", 3, CONVERTED, deliveries=(Delivery("b", CONVERTED),))),
        lambda: state.requeue((*PROBLEMS, PENDING)),  # nothing to requeue
    ]
    for number, step in enumerate(steps):
        step()
        counts, per_target = rows_counted(path)
        assert state.counts() == counts, number
        assert state.delivery_counts() == per_target, number
        assert state.reader.counts() == counts, number
    assert state.counts() == {CONVERTED: 3}
    assert state.delivery_counts() == {"a": {CONVERTED: 2}, "b": {CONVERTED: 1, FAILED: 1}}
    assert state.count_in(PROBLEMS) == {}
    state.close()


def test_totals_match_the_rows_after_random_histories(tmp_path: Path) -> None:
    state = State(tmp_path)
    path = tmp_path / State.FILE
    rng = random.Random(20)
    states = (CONVERTED, FORWARDED, SKIPPED, FAILED, UNSUPPORTED, VANISHED, DELETING, PENDING)
    for step in range(400):
        if rng.random() < 0.05:
            state.requeue((rng.choice(PROBLEMS), PENDING))
        else:
            deliveries = tuple(
                Delivery(t, rng.choice((CONVERTED, FAILED, FORWARDED, SKIPPED)))
                for t in ("a", "b")
                if rng.random() < 0.7
            )
            state.record(
                Entry(f"i{rng.randrange(40)}", step, rng.choice(states), deliveries=deliveries)
            )
    counts, per_target = rows_counted(path)
    assert state.counts() == counts
    assert state.delivery_counts() == per_target
    assert state.count_in(PROBLEMS) == {s: n for s, n in counts.items() if s in PROBLEMS}
    state.close()


_KILLED_WRITER = """
import random, sys
from pathlib import Path
from bridge.outcomes import Delivery, Entry, PROBLEMS
from bridge.ledger.state import State
state = State(Path(sys.argv[1]))
rng = random.Random(7)
print("ready", flush=True)
step = 0
while True:
    step += 1
    if step % 50 == 0:
        state.requeue(PROBLEMS)
    deliveries = tuple(Delivery(t, rng.choice(("converted", "failed"))) for t in ("a", "b"))
    state.record(Entry(f"i{rng.randrange(300)}", step,
                       rng.choice(("converted", "failed", "deleting", "forwarded")),
                       deliveries=deliveries), cursor=step)
"""


def test_totals_survive_kill_9_mid_write(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        probe = State(tmp_path, read_only=True)
        wait_for(lambda: probe.cursor() > 300, 30, "the writer to record 300 outcomes")
        probe.close()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(10)
    state = State(tmp_path)
    counts, per_target = rows_counted(tmp_path / State.FILE)
    assert state.counts() == counts and sum(counts.values()) > 0
    assert state.delivery_counts() == per_target
    state.close()


# --- schema version and migration -----------------------------------------------------------


def test_a_version_1_ledger_is_migrated_in_place_at_first_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / State.FILE
    ledger_support.fill(path, 3000, targets=("a", "b"), updated=NOW)
    before = rows_counted(path)
    assert before[0] == {CONVERTED: 2994, FAILED: 6}
    with caplog.at_level(logging.INFO, logger="bridge.ledger.state"):
        state = State(tmp_path, clock=Clock(NOW))
    assert any(
        "migrated from version 1 to 2: totals of 3000 instances" in r.getMessage()
        for r in caplog.records
    )
    assert (state.counts(), state.delivery_counts()) == before
    assert state.cursor() == 3000  # the cursor is kept
    first = ledger_support.instance_id(0)
    entry = state.get(first)
    assert entry is not None and (entry.state, entry.seq) == (FAILED, 1)
    # Writes go on counting from the migrated totals.
    state.record(Entry(first, 1, CONVERTED, deliveries=(Delivery("a", CONVERTED),)))
    assert state.counts() == {CONVERTED: 2995, FAILED: 5}
    assert state.delivery_counts()["a"] == {CONVERTED: 2995, FAILED: 5}
    state.close()
    db = sqlite3.connect(path)
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    auto_vacuum = db.execute("PRAGMA auto_vacuum").fetchone()[0]
    db.close()
    assert "instances_state_updated" in indexes and "instances_state" not in indexes
    assert version == (str(SCHEMA_VERSION),)
    assert auto_vacuum == 0  # left as it was: changing it needs a full VACUUM
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bridge.ledger.state"):
        State(tmp_path).close()  # the second open migrates nothing
    assert not any("migrated" in r.getMessage() for r in caplog.records)


def test_status_reads_a_version_1_ledger_without_altering_it(tmp_path: Path) -> None:
    path = tmp_path / State.FILE
    ledger_support.fill(path, 500, targets=("a", "b"), updated=NOW)
    before = file_bytes(tmp_path)
    state = State(tmp_path, read_only=True)
    assert (state.counts(), state.delivery_counts()) == rows_counted(path)
    assert state.count_in(PROBLEMS) == {FAILED: 1}
    state.close()
    assert file_bytes(tmp_path) == before


def _newer_ledger(directory: Path) -> dict[str, str]:
    state = State(directory)
    state.record(Entry("x", 1, CONVERTED))
    state.close()
    db = sqlite3.connect(directory / State.FILE, isolation_level=None)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,))
    db.close()
    return file_bytes(directory)


def test_a_ledger_from_a_newer_version_is_refused_and_left_alone(tmp_path: Path) -> None:
    before = _newer_ledger(tmp_path)
    for read_only in (False, True):
        with pytest.raises(StateError, match="schema version 3, newer than this"):
            State(tmp_path, read_only=read_only)
        assert file_bytes(tmp_path) == before
    # The lock file was given back: the refusal holds nothing.
    with pytest.raises(StateError, match="newer"):
        State(tmp_path)


def test_the_cli_refuses_a_newer_ledger_with_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    before = _newer_ledger(state_dir)
    config = tmp_path / "bridge.yaml"
    # No server is asked anything before the ledger is opened.
    config.write_text(
        yaml.safe_dump(
            {
                "source": {"url": "http://127.0.0.1:9"},
                "target": {"url": "http://127.0.0.1:10"},
                "state_dir": str(state_dir),
                "http_listen": "",
            }
        )
    )
    for command in ("status", "catch-up"):
        assert main([command, "-c", str(config)]) == EXIT_STATE
        assert "newer than this orthanc-bridge" in capsys.readouterr().err
    assert file_bytes(state_dir) == before


def test_a_migration_cut_short_is_done_again(tmp_path: Path) -> None:
    """The migration is one transaction: a failure inside it leaves version 1, intact."""
    path = tmp_path / State.FILE
    ledger_support.fill(path, 200, updated=NOW)
    db = sqlite3.connect(path, isolation_level=None)
    # A trigger that fails the version's row: the last statement of the migration.
    db.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON meta WHEN new.key = 'schema_version' "
        "BEGIN SELECT raise(ABORT, 'cut short'); END"
    )
    db.close()
    with pytest.raises(StateError, match="cut short"):
        State(tmp_path)
    db = sqlite3.connect(path, isolation_level=None)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "totals" not in tables
    db.execute("DROP TRIGGER refuse")
    db.close()
    state = State(tmp_path)
    assert state.counts() == {CONVERTED: 199, FAILED: 1}
    state.close()


# --- retention ------------------------------------------------------------------------------


def _aged_ledger(tmp_path: Path) -> tuple[State, Clock]:
    """Old rows in every state and recent converted ones, two targets."""
    clock = Clock(OLD)
    state = State(tmp_path, clock=clock)
    two = (Delivery("a", CONVERTED), Delivery("b", CONVERTED))
    for n in range(1200):  # more than two batches
        state.record(Entry(f"old{n}", n, CONVERTED, deliveries=two))
    for kept in (FAILED, UNSUPPORTED, PENDING, DELETING):
        state.record(Entry(f"old-{kept}", None, kept, deliveries=(Delivery("a", FAILED),)))
    for done in (FORWARDED, SKIPPED, VANISHED):
        state.record(Entry(f"old-{done}", None, done))
    clock.now = NOW - DAY
    for n in range(10):
        state.record(Entry(f"new{n}", 2000 + n, CONVERTED, deliveries=two))
    clock.now = NOW
    return state, clock


def test_retention_prunes_old_finished_rows_and_keeps_the_work_left_and_the_counts(
    tmp_path: Path,
) -> None:
    state, clock = _aged_ledger(tmp_path)
    counts, per_target = state.counts(), state.delivery_counts()
    retention = Retention(state, 90, clock=clock, pause=0)
    assert retention.run_once() == 1200 + 3
    assert retention.batches == -(-1203 // BATCH) and 0 < retention.longest_batch < 1
    left = {e.instance_id for e in state.entries(tuple(counts), limit=None)}
    assert left == {f"old-{s}" for s in (FAILED, UNSUPPORTED, PENDING, DELETING)} | {
        f"new{n}" for n in range(10)
    }
    assert rows_counted(tmp_path / State.FILE)[1] == {
        "a": {CONVERTED: 10, FAILED: 4},
        "b": {CONVERTED: 10},
    }
    # All-time counts: the pruned rows still count, before and after a restart.
    assert (state.counts(), state.delivery_counts()) == (counts, per_target)
    assert state.counts()[CONVERTED] == 1210
    assert retention.run_once() == 0
    state.close()
    again = State(tmp_path, clock=clock)
    assert (again.counts(), again.delivery_counts()) == (counts, per_target)
    # An instance seen again after its row was pruned (reconcile) counts again.
    again.record(Entry("old0", None, CONVERTED))
    assert again.counts()[CONVERTED] == 1211
    again.close()


def test_retention_of_0_days_keeps_everything(tmp_path: Path) -> None:
    state, clock = _aged_ledger(tmp_path)
    retention = Retention(state, 0, clock=clock)
    retention.start()  # starts nothing
    retention.close()
    assert sum(rows_counted(tmp_path / State.FILE)[0].values()) == 1217
    state.close()


def test_the_retention_thread_prunes_in_the_background_while_outcomes_are_written(
    tmp_path: Path,
) -> None:
    state, clock = _aged_ledger(tmp_path)
    retention = Retention(state, 90, clock=clock)
    retention.start()
    try:
        n = 0
        deadline = time.monotonic() + 60
        while retention.pruned < 1203:  # outcomes go on being written meanwhile
            assert time.monotonic() < deadline, f"{retention.pruned} rows pruned in 60 s"
            state.record(Entry(f"live{n}", 5000 + n, CONVERTED), cursor=5000 + n)
            n += 1
    finally:
        retention.close()
    assert state.counts()[CONVERTED] == 1210 + n
    assert state.cursor() == 5000 + n - 1
    state.close()


def test_retention_outlives_a_ledger_that_cannot_be_written_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, clock = _aged_ledger(tmp_path)
    real_prune = state.prune
    failures = [StateError("cannot write the state: database or disk is full")]

    def prune(before: float, limit: int) -> Pruned:
        if failures:
            raise failures.pop()
        return real_prune(before, limit)

    monkeypatch.setattr(state, "prune", prune)
    monkeypatch.setattr("bridge.ledger.retention.RETRY", 0.01)
    retention = Retention(state, 90, clock=clock)
    retention.start()
    try:
        wait_for(lambda: retention.pruned == 1203, 30, "retention to try again and prune")
    finally:
        retention.close()
    assert not failures
    state.close()


def test_pruned_pages_are_given_back_in_a_new_ledger(tmp_path: Path) -> None:
    state, clock = _aged_ledger(tmp_path)
    path = tmp_path / State.FILE
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental, for new ledgers
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    Retention(state, 90, clock=clock, pause=0).run_once()
    assert db.execute("PRAGMA freelist_count").fetchone()[0] == 0
    assert db.execute("PRAGMA page_count").fetchone()[0] < pages / 2
    db.close()
    state.close()


# --- reads ----------------------------------------------------------------------------------


def _page_and_metrics_reads(reader: LedgerReads) -> None:
    """What the status page, /metrics and `status` ask of the ledger."""
    reader.cursor()
    reader.counts()
    reader.delivery_counts()
    reader.count_in(PROBLEMS)
    reader.entries((*PROBLEMS, PENDING), limit=20)
    reader.entries((*PROBLEMS, PENDING), limit=50)


def test_every_read_of_the_page_metrics_and_retention_is_served_by_an_index(
    tmp_path: Path,
) -> None:
    state, _ = _aged_ledger(tmp_path)
    assert isinstance(state.reader, LedgerReads) and state.reader is not state
    statements: list[str] = []
    state.reader._db.set_trace_callback(statements.append)
    state._db.set_trace_callback(statements.append)
    _page_and_metrics_reads(state.reader)
    state.prune(NOW - 90 * DAY, BATCH)
    state._db.set_trace_callback(None)
    state.reader._db.set_trace_callback(None)
    selects = [s for s in statements if s.lstrip().upper().startswith(("SELECT", "DELETE"))]
    assert len(selects) >= 9
    for sql in selects:
        plan = " / ".join(str(r[3]) for r in state._db.execute(f"EXPLAIN QUERY PLAN {sql}"))
        for table in ("instances", "deliveries"):
            assert f"SCAN {table}" not in plan, (sql, plan)
        assert "TEMP B-TREE" not in plan, (sql, plan)
    state.close()


def test_the_reader_does_not_wait_for_a_write_under_way(tmp_path: Path) -> None:
    state, _ = _aged_ledger(tmp_path)
    counts = state.counts()
    answered: list[dict[str, int]] = []
    # A transfer in the middle of its transaction: the writer's lock and SQLite's write lock.
    with state._transaction() as db:
        db.execute("UPDATE instances SET state = 'failed' WHERE instance_id = 'new0'")
        reading = threading.Thread(target=lambda: answered.append(state.reader.counts()))
        reading.start()
        reading.join(5)
        assert answered == [counts]  # the last commit, read at once
    assert state.reader.counts()[FAILED] == counts[FAILED] + 1
    state.close()


# --- against real Orthanc servers -----------------------------------------------------------


def test_a_running_bridge_prunes_old_rows_keeps_failures_and_counts_all_time(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    first = bridgectl.upload_variants(source, "MR_small_jp2klossless.dcm", 6)
    bad = str(source.upload(truncated_j2k())["ID"])
    config = bridgectl.write_config(tmp_path, source, target)
    assert bridgectl.run("catch-up", config, source, target).returncode == 1  # the bad one
    path = tmp_path / "state" / State.FILE
    # A hundred days pass (the rows say so): all of them are now beyond 90 days.
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("UPDATE instances SET updated = updated - 100 * 86400")
    db.execute("UPDATE deliveries SET updated = updated - 100 * 86400")
    db.close()
    log = tmp_path / "bridge.log"
    daemon = bridgectl.start("run", config, source, target, log)
    try:
        wait_for(lambda: rows_counted(path)[0] == {FAILED: 1}, 30, "the old converted rows pruned")
        second = bridgectl.upload_variants(source, "MR_small_jp2klossless.dcm", 3)
        bridgectl.wait_for_count(target, 9)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0, log.read_text()
    finally:
        bridgectl.kill(daemon)
    assert "ledger retention: 6 finished instances older than 90 days deleted" in log.read_text()
    assert set(target.instances()) >= first | second
    left = {e.instance_id for e in State(tmp_path / "state", read_only=True).entries(FINISHED)}
    assert left == {bad} | second
    # All time, across the pruning and the restarts, as `status` tells it.
    report = json.loads(bridgectl.run("status", config, source, target, "--json").stdout)
    assert report["counts"] == {CONVERTED: 9, FAILED: 1}, report
    assert report["targets"]["target"]["counts"] == {CONVERTED: 9, FAILED: 1}, report
