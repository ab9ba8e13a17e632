"""A byte budget: memory in flight is bounded by bytes, not by instance count.

One large multi-frame instance weighs as much as hundreds of CT slices; counting instances
would let a burst of them exhaust memory. The oldest holding in flight may always grow, even
past the limit: otherwise two instances admitted as compressed files, each waiting for the
other to leave room for its decoded copy, would wait for ever. So memory stays below the limit
plus one instance, and a single instance larger than the whole budget still gets through.

The bytes an instance holds are its compressed file and, from before it is decoded, the size
its header declares for the decoded copy (bridge.dicom.header): a copy that exists is always
counted.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from bridge.errors import Interrupted


class ByteBudget:
    """Blocks callers while the bytes they hold would exceed `limit`."""

    def __init__(self, limit: int, stop: threading.Event) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._stop = stop
        self._cond = threading.Condition()
        self._tickets = itertools.count()
        self._open: set[int] = set()  # the tickets of the holdings not yet given back

    def wait_for_room(self) -> None:
        """Block until something is left of the budget (before a download of unknown size)."""
        self._wait(lambda: self.used < self.limit)

    def resize(self, held: int, wanted: int, ticket: int) -> int:
        """Change holding `ticket` from `held` to `wanted` bytes, waiting while growth does not
        fit, unless that holding is the oldest in flight."""
        grow = wanted - held
        with self._cond:
            # Checked and taken under one hold of the lock: threads woken together must not
            # each see the same room and all take it.
            if grow > 0:
                self._wait(lambda: self.used + grow <= self.limit or ticket == min(self._open))
            self.used += grow
            self.peak = max(self.peak, self.used)
            self._cond.notify_all()
        return wanted

    @contextmanager
    def holding(self) -> Iterator[Holding]:
        """A holding that starts empty and is given back in full on exit."""
        with self._cond:
            ticket = next(self._tickets)
            self._open.add(ticket)
        holding = Holding(self, ticket)
        try:
            yield holding
        finally:
            holding.set(0)
            with self._cond:
                self._open.discard(ticket)
                self._cond.notify_all()

    def _wait(self, ready: Callable[[], bool]) -> None:
        """Block until `ready()`; returns with the condition's lock still held by the caller
        when the caller holds it (it is reentrant)."""
        with self._cond:
            while not ready():
                if self._stop.is_set():
                    raise Interrupted("shutting down")
                # Wake periodically to notice shutdown; releases also wake us at once.
                self._cond.wait(0.2)


class Holding:
    """The bytes one piece of work holds of a budget."""

    def __init__(self, budget: ByteBudget, ticket: int) -> None:
        self._budget = budget
        self._ticket = ticket  # its place in the order the holdings were opened
        self.bytes = 0

    def set(self, wanted: int) -> None:
        """Hold `wanted` bytes from now on, waiting for room if that is more than before."""
        self.bytes = self._budget.resize(self.bytes, wanted, self._ticket)
