"""Group commit for STOW-RS: the instances that transfer threads store at the same time share
requests to a DICOMweb archive (bridge.peers.dicomweb).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from bridge.errors import BridgeError
from bridge.peers.dicomjson import StoreOutcome
from bridge.peers.dicomweb import DicomWebClient

DEFAULT_BATCH_SIZE = 16
DEFAULT_BATCH_MB = 32.0
DEFAULT_POSTS = 2


@dataclass
class _Pending:
    """One caller's instance in the Batcher's queue, and then its outcome."""

    data: bytes | bytearray | memoryview
    alone: bool  # sent in a request of its own
    wake: threading.Condition  # its caller waits on it, over the Batcher's one lock
    waiting: bool = False  # its caller waits (and is not sending another request)
    outcome: StoreOutcome | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None or self.error is not None


class Batcher:
    """Group commit for STOW-RS: instances that threads store at the same time share requests.

    Each caller blocks in store() until the archive has answered for its instance. Whoever
    finds a request slot free (`posts` of them) sends what is queued then, its own instance or
    others', up to `batch_size` instances and `batch_mb` MiB (one larger instance goes alone):
    a request carries what arrived while the previous one was on the wire. Instances that
    trickle in go one by one without waiting for a batch to fill; under load, batches fill.
    """

    def __init__(
        self,
        client: DicomWebClient,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_mb: float = DEFAULT_BATCH_MB,
        posts: int = DEFAULT_POSTS,
    ) -> None:
        self.client = client
        self.batch_size = max(1, batch_size)
        self.batch_bytes = int(batch_mb * 2**20)
        self.posts = max(1, posts)
        self._lock = threading.Lock()
        self._queue: deque[_Pending] = deque()
        self._sending = 0

    @property
    def queued(self) -> int:
        """How many instances wait for a request."""
        return len(self._queue)

    def store(self, data: bytes | bytearray | memoryview) -> StoreOutcome:
        """Store one instance, retried as the client's RetryPolicy declares; its outcome once
        stored (`reason`: the archive's warning, if any). Raises StoreFailed when the archive
        did not store it, TransientError when the policy gives up, AccessDenied."""
        attempts = 0

        def attempt() -> StoreOutcome:
            nonlocal attempts
            attempts += 1
            # After a transient failure the instance travels alone: one that the archive
            # chokes on (HTTP 500 every time) then holds back no other.
            outcome = self._submit(data, alone=attempts > 1)
            if not outcome.stored:
                raise outcome.error()
            return outcome

        return self.client.retry.call(attempt, self.client.role)

    def _submit(self, data: bytes | bytearray | memoryview, alone: bool) -> StoreOutcome:
        """Queue one instance, send requests while a slot is free and it waits, and return
        its outcome (or raise what failed its request)."""
        # Each caller waits on its own condition and is woken only when its instance is done
        # or a slot is its to take: with one shared condition, every answer woke every
        # waiting thread, and 8 threads cost 1 ms of CPU more per instance (notify_all).
        item = _Pending(data, alone, threading.Condition(self._lock))
        with self._lock:
            self._queue.append(item)
            while True:
                if item.done:
                    return _result(item)
                if self._sending < self.posts and self._queue:
                    batch = self._take()
                    self._sending += 1
                    self._wake_next()  # another slot may be free too
                    self._lock.release()
                    try:
                        self._send(batch)
                    finally:
                        self._lock.acquire()
                        self._sending -= 1
                        self._wake_next()
                else:
                    item.waiting = True
                    item.wake.wait()
                    item.waiting = False

    def _wake_next(self) -> None:
        """Wake the first waiting caller of a queued instance if a slot is free for it to
        take (called holding the lock)."""
        if self._sending < self.posts:
            for pending in self._queue:
                if pending.waiting:
                    pending.waiting = False  # woken: the next call wakes another
                    pending.wake.notify()
                    return

    def _take(self) -> list[_Pending]:
        """The next request's instances, in the order they came (called holding the lock)."""
        batch = [self._queue.popleft()]
        size = len(batch[0].data)
        while self._queue and len(batch) < self.batch_size and not batch[0].alone:
            following = self._queue[0]
            if following.alone or size + len(following.data) > self.batch_bytes:
                break
            batch.append(self._queue.popleft())
            size += len(following.data)
        return batch

    def _send(self, batch: list[_Pending]) -> None:
        """One request for `batch`; each of its callers gets its outcome or the error."""
        try:
            outcomes = self.client.store_batch([item.data for item in batch])
        except BaseException as exc:
            self._finish(batch, [None] * len(batch), exc)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt, SystemExit: after the others were told
            return
        self._finish(batch, outcomes, None)

    def _finish(
        self,
        batch: list[_Pending],
        outcomes: Sequence[StoreOutcome | None],
        error: BaseException | None,
    ) -> None:
        with self._lock:
            for item, outcome in zip(batch, outcomes, strict=True):
                item.outcome, item.error = outcome, error
                item.wake.notify()


def _result(item: _Pending) -> StoreOutcome:
    """A finished item's outcome, or its request's error raised in this caller's thread."""
    if item.error is not None:
        if isinstance(item.error, BridgeError):
            # A copy per caller: every error takes one message (bridge.errors), and one object
            # raised in several threads at once would gather their tracebacks.
            raise type(item.error)(str(item.error)) from item.error
        raise item.error
    assert item.outcome is not None
    return item.outcome
