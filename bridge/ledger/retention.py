"""Retention: finished ledger rows older than `ledger_retention_days` are deleted in the
background, a small batch per transaction, so that the ledger stops growing after a year and
the transfers never wait more than a few milliseconds for its write lock.

Failed, unsupported, pending and deleting rows are kept whatever their age (state.PRUNABLE):
they are work still to do. The all-time totals keep counting what is pruned.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from bridge.errors import StateError
from bridge.ledger.state import State

log = logging.getLogger(__name__)

DAY = 86400.0
# Rows per transaction. On the development machine's disk with synchronous=FULL, under 4
# threads writing outcomes back to back (benchmarks/ledger.py), a batch held the write lock
# 1.2 ms on average at 100 rows (p99 3.5 ms), 2.4 ms at 250 (p99 7.8), 3.9 ms at 500 (p99
# 7.8); the longest, 12 to 35 ms at any size, are fsync and checkpoint stalls that the
# transfers' own commits meet too. 100 rows prune 1.5 million in 3.6 minutes under that load.
BATCH = 100
# Between two batches the lock is left free this long, for the transfers waiting for it (a
# Python lock is not fair: without a pause, the pruner could take it again at once): the
# pruner holds the lock about a tenth of the time.
PAUSE = 0.01
# Free pages given back per step, once a pass is over (1 MiB of 4 KiB pages): moving pages
# to the end of the file holds the write lock too.
VACUUM_STEP = 256
# How often a pass runs once the backlog is gone: what ages out in that time is small.
EVERY = 3600.0
# After a failed pass (a full disk, a lock held elsewhere: the transfers report it too).
RETRY = 60.0


class Retention:
    """A thread that prunes `state` every `EVERY` seconds, until `close`."""

    def __init__(
        self,
        state: State,
        days: float,
        clock: Callable[[], float] = time.time,
        pause: float = PAUSE,
        every: float = EVERY,
        batch: int = BATCH,
    ) -> None:
        self._state = state
        self._days = days
        self._clock = clock
        self._pause = pause
        self._every = every
        self._batch = batch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pruned = 0  # rows deleted since the start
        self.batches = 0
        self.longest_batch = 0.0  # seconds of the write lock held by one batch
        self.held = 0.0  # by all of them

    def start(self) -> None:
        """Start pruning in the background; nothing with a retention of 0 days."""
        if self._days <= 0:
            return
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop after the batch under way (it is one transaction: nothing is half done)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def run_once(self) -> int:
        """Prune everything that is old enough now, batch by batch, then give the freed pages
        back; return the rows deleted. Stops early on `close`."""
        before = self._clock() - self._days * DAY
        started = time.monotonic()
        pruned = 0
        while not self._stop.is_set():
            deleted, held = self._state.prune(before, self._batch)
            self.longest_batch = max(self.longest_batch, held)
            self.held += held
            self.batches += 1
            pruned += deleted
            self.pruned += deleted
            if deleted < self._batch or self._stop.wait(self._pause):
                break
        if pruned:
            log.info(
                "ledger retention: %d finished instances older than %g days deleted in %.1f s",
                pruned,
                self._days,
                time.monotonic() - started,
            )
        while not self._stop.is_set() and self._state.give_back(VACUUM_STEP):
            self._stop.wait(self._pause)
        return pruned

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except StateError as exc:
                log.warning("ledger retention: %s; trying again in %.0f s", exc, RETRY)
                if self._stop.wait(RETRY):
                    return
                continue
            if self._stop.wait(self._every):
                return
