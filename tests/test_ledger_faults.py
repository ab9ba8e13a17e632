"""The ledger failing mid-run (a full disk, a lock held too long), against real Orthanc servers.

Every outcome is written to the ledger in the transaction that moves the cursor past it. When
that write fails, the instance must be neither lost nor skipped: the write is tried again, and
the cursor never passes an instance whose outcome is not recorded.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any, cast

from bridge.cli import _clients, make_pipeline
from bridge.config import load
from bridge.ledger.state import State
from bridge.outcomes import CONVERTED
from bridge.peers.retry import RetryPolicy
from tests import bridgectl
from tests.orthanc import EXPLICIT_VR_LITTLE_ENDIAN, OrthancServer


class _CommitsFailNowAndThen:
    """The ledger's connection, whose every third COMMIT fails as a full disk makes it fail,
    `failures` times in all; everything else goes to the real connection."""

    def __init__(self, db: sqlite3.Connection, failures: int) -> None:
        self._db = db
        self._commits = 0
        self.failures = failures

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            self._commits += 1
            if self.failures and self._commits % 3 == 0:
                self.failures -= 1
                raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)


def test_no_instance_is_skipped_when_ledger_writes_fail_mid_run(
    source: OrthancServer, target: OrthancServer, tmp_path: Path, monkeypatch: Any
) -> None:
    uploaded = bridgectl.upload_variants(source, "MR_small_jp2klossless.dcm", 24)
    config_path = bridgectl.write_config(tmp_path, source, target)
    for name, value in bridgectl.env(source, target).items():
        monkeypatch.setenv(name, value)
    config = load(config_path)
    stop = threading.Event()
    state = State(config.state_dir)
    failing = _CommitsFailNowAndThen(state._db, failures=6)
    state._db = cast(sqlite3.Connection, failing)
    source_client, target_clients = _clients(config, RetryPolicy(stop, max_wait=20))
    pipeline = make_pipeline(config, state, source_client, target_clients, stop)
    try:
        summary = pipeline.follow(forever=False)
    finally:
        pipeline.close()
        state.close()
    assert summary.ok, summary
    # Every instance is in the target, recorded as converted, and the cursor is at the end.
    assert set(target.instances()) == uploaded
    for iid in uploaded:
        assert target.transfer_syntax(iid) == EXPLICIT_VR_LITTLE_ENDIAN
    reopened = State(config.state_dir, read_only=True)
    try:
        assert reopened.counts() == {CONVERTED: len(uploaded)}
        for iid in uploaded:
            entry = reopened.get(iid)
            assert entry is not None and entry.state == CONVERTED, iid
        assert reopened.cursor() == source.changes_last()
    finally:
        reopened.close()
    assert failing.failures == 0, "the ledger failed fewer times than planned"
