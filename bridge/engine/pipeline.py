"""Concurrency: many instances in flight, decoding on every core, the cursor behind them all.

Transfer threads download and upload (network I/O releases the GIL) while a pool of worker
processes decodes (no JPEG 2000 decoder releases the GIL, so threads would not help). Memory
is bounded by a byte budget. Instances finish out of order; the cursor only ever moves to just
below the lowest change still in flight, so a crash at any moment redoes only unfinished work.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterable, Sequence, Sized
from concurrent.futures import CancelledError, Future, wait
from dataclasses import dataclass, field, replace

from bridge import metrics
from bridge.config import Config
from bridge.engine.engines import Engine
from bridge.errors import (
    AccessDenied,
    FeedResetError,
    Interrupted,
    StateError,
    TransientError,
    one_line,
)
from bridge.ledger.state import State
from bridge.outcomes import CONVERTED, DELETING, FAILED, PROBLEMS, Entry, NewInstance
from bridge.peers import feed
from bridge.peers.orthanc import ChangesPage, OrthancClient
from bridge.peers.peer import Peer
from bridge.watch.health import Health, Throughput
from bridge.watch.snapshot import Snapshot

log = logging.getLogger(__name__)

# While the ledger cannot be written, an outcome is written again after these many seconds,
# doubling up to the longest.
_RECORD_RETRY_FIRST = 0.5
_RECORD_RETRY_LONGEST = 30.0


@dataclass
class Summary:
    """What one run did, for the closing report and the exit code."""

    counts: dict[str, int] = field(default_factory=dict)
    problems: list[Entry] = field(default_factory=list)
    unfinished: dict[str, str] = field(default_factory=dict)
    stopped_by: str | None = None
    source_reset: bool = False
    peak_inflight_bytes: int = 0

    def add(self, entry: Entry) -> None:
        """Count one finished instance."""
        self.counts[entry.state] = self.counts.get(entry.state, 0) + 1
        if entry.state in PROBLEMS:
            self.problems.append(entry)

    @property
    def ok(self) -> bool:
        """True when every instance seen was delivered."""
        return not self.problems and not self.unfinished and self.stopped_by is None


class Progress:
    """Which changes are in flight; the durable cursor sits just below the lowest of them."""

    def __init__(self, state: State) -> None:
        self._state = state
        self._lock = threading.Lock()
        self._inflight: set[int] = set()
        self._scanned = self._saved = state.cursor()
        metrics.feed_position(cursor=self._saved)

    @property
    def cursor(self) -> int:
        """The durable cursor."""
        return self._saved

    def start(self, seq: int) -> None:
        """A change is dispatched; the cursor must not pass it until it finishes."""
        with self._lock:
            self._inflight.add(seq)

    def finish(self, entry: Entry) -> None:
        """Record an instance's outcome and move the cursor in one transaction.

        Nothing changes here unless the transaction commits: when the write fails (StateError),
        the change stays in flight and the cursor below it, for the caller to try again.
        """
        with self._lock:
            cursor = self._next(finished=entry.seq)
            self._state.record(entry, cursor)
            if entry.seq is not None:
                self._inflight.discard(entry.seq)
            self._moved(cursor)

    def scanned(self, seq: int) -> None:
        """Every change up to `seq` was read; move the cursor if nothing below is in flight."""
        with self._lock:
            scanned = max(self._scanned, seq)
            cursor = self._next(scanned=scanned)
            if cursor is not None:
                self._state.set_cursor(cursor)
            self._scanned = scanned
            self._moved(cursor)

    def rewind(self) -> None:
        """Start again from the beginning of a new change log (nothing may be in flight)."""
        with self._lock:
            self._scanned = self._saved = 0
            self._state.set_cursor(0)
        metrics.feed_position(cursor=0)

    def _next(self, finished: int | None = None, scanned: int | None = None) -> int | None:
        """Where the cursor goes once change `finished` is out of flight and every change up
        to `scanned` was read; None when it does not move. Changes nothing itself."""
        inflight = self._inflight - {finished} if finished is not None else self._inflight
        cursor = min(inflight) - 1 if inflight else max(self._scanned, scanned or 0)
        return cursor if cursor > self._saved else None

    def _moved(self, cursor: int | None) -> None:
        """The cursor was written: `cursor`, unless None."""
        if cursor is not None:
            self._saved = cursor
            metrics.feed_position(cursor=cursor)


class Pipeline:
    """Runs transfers concurrently: `follow` for the change log, `process` for given IDs."""

    def __init__(
        self,
        config: Config,
        state: State,
        source: OrthancClient,
        targets: Sequence[Peer],  # one per config.targets, in that order
        stop: threading.Event,
        engine: Engine,
    ) -> None:
        self.config = config
        self.state = state
        self.source = source
        self.stop = stop
        self.summary = Summary()
        self.engine = engine
        for client in (source, *targets):
            client.keep_connections(engine.threads + 1)  # the transfer threads and the feed
        self._slots = threading.Semaphore(engine.slots)
        self._pending: set[Future[Entry]] = set()
        self._pending_lock = threading.Lock()
        self._progress = Progress(state)
        self.health = Health(source, targets, state, config.poll_interval)
        self.health.checks.append(engine.problem)
        self.throughput = Throughput()
        # What the status page says the bridge is doing; the commands set it.
        self.mode = "starting"
        self.source_last = 0
        self.total = 0  # instances to process, for `retry` and `reconcile`
        metrics.watch(
            ledger=lambda: state.reader.count_in(PROBLEMS),  # never the writer's connection
            inflight=self.inflight,
            decoders=engine.decoders_alive,
        )

    @property
    def cursor(self) -> int:
        """The durable cursor: every change up to it is finished."""
        return self._progress.cursor

    def inflight(self) -> tuple[int, int]:
        """Instances in flight and the bytes they hold."""
        return len(self._pending), self.engine.budget.used

    def snapshot(self) -> Snapshot:
        """What the pipeline is doing now, for the status page."""
        engine = self.engine
        count, held = self.inflight()
        return Snapshot(
            mode=self.mode,
            stopping=self.stop.is_set(),
            cursor=self.cursor,
            source_last=self.source_last,
            total=self.total,
            outcomes=dict(self.summary.counts),
            rate=self.throughput.per_minute(),
            inflight_instances=count,
            inflight_bytes=held,
            inflight_limit=engine.budget.limit,
            decoders_alive=engine.decoders_alive(),
            decoders_configured=engine.decoders_configured,
            decoder_restarts=engine.decoder_restarts(),
            where=engine.where(),
        )

    # --- entry points ---------------------------------------------------------------------

    def follow(self, forever: bool) -> Summary:
        """Process the change log from the saved cursor; to its end, or until stopped."""
        self._settle_deletions()
        while not self.stop.is_set():
            try:
                self._follow_once(forever)
                break
            except FeedResetError as exc:
                if self.config.on_source_reset != "rewind":
                    self._drain()
                    self.summary.source_reset = True
                    self.summary.stopped_by = (
                        f"{exc}. Nothing was skipped. To process the new database from its "
                        "start set on_source_reset: rewind (instances the target already holds "
                        "are checked, not duplicated)"
                    )
                    break
                log.warning("%s; on_source_reset is rewind: starting again from 0", exc)
                self._drain()
                self._progress.rewind()
            except (TransientError, AccessDenied) as exc:
                self._give_up(exc)
        self._drain()
        return self.summary

    def _settle_deletions(self) -> None:
        """Complete the ledger of originals whose deletion was cut short by a crash.

        Such an instance was verified in the target before the deletion began. If the original
        is gone, its change row went with it: only the ledger remembers it, so finish it here.
        If it is still there, the cursor is below its change and the feed redoes it.
        """
        # Every one of them: the cluster engine alone can have thousands in flight.
        for entry in self.state.entries((DELETING,), limit=None):
            self.health.beat()
            if self.source.transfer_syntax(entry.instance_id) is None:
                self.state.record(replace(entry, state=CONVERTED, deleted_original=True))

    def process(self, instance_ids: Iterable[str], total: int | None = None) -> Summary:
        """Process instances by ID, outside the change log (for `retry` and `reconcile`).

        `instance_ids` may be a stream (read as room frees up); `total` is how many it holds,
        for the progress report, by default its length.
        """
        if total is None:
            total = len(instance_ids) if isinstance(instance_ids, Sized) else 0
        self.total = total
        for iid in instance_ids:
            if self.stop.is_set():
                break
            self._dispatch(NewInstance(-1, iid), tracked=False)
        self._drain()
        return self.summary

    def close(self) -> None:
        """Stop the worker processes and threads, without waiting for abandoned decodes."""
        self.engine.close()

    # --- internals ------------------------------------------------------------------------

    def _follow_once(self, forever: bool) -> None:
        events = feed.follow(
            self.source,
            self.state.cursor(),
            page_size=self.config.page_size,
            stop=self.stop,
            poll_interval=self.config.poll_interval,
            forever=forever,
            on_page=self._polled,
            recheck=self.config.recheck_changes,
        )
        for event in events:
            if self.stop.is_set():
                return
            if isinstance(event, feed.Scanned):
                self._progress.scanned(event.seq)
            elif self.state.finished(event.instance_id, event.seq):
                log.debug("instance %s: change %d already handled", event.instance_id, event.seq)
            else:
                self._dispatch(event, tracked=True)

    def _polled(self, page: ChangesPage) -> None:
        self.health.beat()
        self.source_last = page.last
        metrics.feed_position(last=page.last)
        self.mode = "following the source" if page.done else "catching up"

    def _dispatch(self, item: NewInstance, tracked: bool) -> None:
        # Bounded: the feed waits here rather than queueing the whole change log in memory.
        while not self._slots.acquire(timeout=0.2):
            self.health.beat()  # waiting for room is not being stuck
            if self.stop.is_set():
                return
        if tracked:
            self._progress.start(item.seq)
        future = self.engine.start(item)
        with self._pending_lock:
            self._pending.add(future)
        future.add_done_callback(functools.partial(self._finished, item, tracked))

    def _finished(self, item: NewInstance, tracked: bool, future: Future[Entry]) -> None:
        """An instance's outcome (in the thread that moved it, or one of the cluster's):
        recorded before its slot is given back, so that _drain waits for the ledger too."""
        try:
            self._conclude(item, tracked, future)
        except Exception as exc:  # a bug: never silent, and never the transfer's traceback
            log.error("instance %s: its outcome was lost: %s", item.instance_id, one_line(exc))
            log.debug("instance %s: the lost outcome's traceback", item.instance_id, exc_info=True)
        finally:
            with self._pending_lock:
                self._pending.discard(future)
            self._slots.release()

    def _conclude(self, item: NewInstance, tracked: bool, future: Future[Entry]) -> None:
        iid = item.instance_id
        try:
            entry = future.result()
        except (Interrupted, CancelledError):
            return  # stays in flight: the cursor stays below it and a restart redoes it
        except (TransientError, AccessDenied) as exc:
            if not self.stop.is_set():
                self.summary.unfinished[iid] = str(exc)
                log.error("instance %s: not transferred, will be redone: %s", iid, exc)
                self._give_up(exc)
            return
        except Exception as exc:
            # A bug, not a bad file: keep the original, record why, keep the daemon going.
            log.error("instance %s: unexpected error: %s", iid, one_line(exc))
            log.debug("instance %s: the unexpected error's traceback", iid, exc_info=exc)
            entry = Entry(iid, item.seq, FAILED, error=f"internal error: {one_line(exc)}")
        if not self._record(entry, tracked):
            return  # shutting down before the ledger took it: in flight, redone on restart
        self.summary.add(entry)
        metrics.count_instance(entry.state, entry.source_syntax, entry.deliveries)
        self.throughput.add()

    def _record(self, entry: Entry, tracked: bool) -> bool:
        """Write the outcome to the ledger, trying again while the ledger cannot be written
        (disk full, locked by another program); False if the bridge stops first.

        Until the write commits the change stays in flight, so the cursor never passes an
        instance whose outcome is not recorded.
        """
        delay = _RECORD_RETRY_FIRST
        while True:
            try:
                if tracked:
                    self._progress.finish(entry)
                else:
                    self.state.record(entry)
                return True
            except StateError as exc:
                log.error(
                    "instance %s: cannot record its outcome (%s): %s; trying again in %.0f s",
                    entry.instance_id,
                    entry.state,
                    exc,
                    delay,
                )
            if self.stop.wait(delay):
                return False
            delay = min(delay * 2, _RECORD_RETRY_LONGEST)

    def _give_up(self, exc: TransientError | AccessDenied) -> None:
        """Stop everything: a server stayed down past the retry bound, or refuses us."""
        if isinstance(exc, TransientError):
            if self.stop.is_set():
                # The retries ended because the bridge is stopping, not because they gave up.
                return
            # Only catch-up, retry and reconcile give up on a server; `run` retries for ever.
            self.summary.stopped_by = f"gave up waiting for a server: {exc}"
        else:
            self.summary.stopped_by = str(exc)
        self.stop.set()

    def _drain(self) -> None:
        """Wait for every dispatched instance to finish or be abandoned."""
        while True:
            with self._pending_lock:
                pending = list(self._pending)
            if not pending:
                break
            self.health.beat()
            wait(pending, timeout=1.0)
        self.summary.peak_inflight_bytes = max(
            self.summary.peak_inflight_bytes, self.engine.budget.peak
        )
