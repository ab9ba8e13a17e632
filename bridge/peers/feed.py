"""Following the source's `/changes` log: instance arrivals, progress marks, and resets.

The feed yields a `NewInstance` for every instance arrival and a `Scanned` mark after each
page, so that the cursor can move past rows that need no work (new series, stable studies).
A log that ends below the cursor means the source database was reset or replaced: that is
raised as FeedResetError, never silently skipped.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from bridge.errors import FeedResetError
from bridge.outcomes import NewInstance
from bridge.peers.orthanc import Change, ChangesPage, OrthancClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scanned:
    """Every change up to and including `seq` has been read (and yielded when relevant)."""

    seq: int


Event = NewInstance | Scanned


def follow(
    client: OrthancClient,
    since: int,
    *,
    page_size: int,
    stop: threading.Event,
    poll_interval: float,
    forever: bool,
    on_page: Callable[[ChangesPage], None] = lambda page: None,
    recheck: int = 0,
) -> Iterator[Event]:
    """Yield events after `since`; stop at the end of the log unless `forever`.

    `on_page` sees every page as it arrives, the empty ones of an idle source included.
    `recheck` > 0: each time the end of the log is reached, the last `recheck` sequence numbers
    are read again, and an instance arrival that was not there before is yielded (late, below
    the cursor). An Orthanc cluster on PostgreSQL in ReadCommitted mode can make a change
    visible after a higher one was read; without this it would never be seen. Each arrival is
    yielded once per process; the pipeline skips those its ledger already holds.
    """
    seen: collections.OrderedDict[int, None] = collections.OrderedDict()
    while not stop.is_set():
        page = client.changes(since, page_size)
        on_page(page)
        if not page.changes and page.last < since:
            raise FeedResetError(
                f"the source's change log ends at {page.last} but the cursor is at {since}: "
                "the source database was reset or replaced"
            )
        for change in page.changes:
            if _arrival(change):
                _remember(seen, change.seq, recheck)
                yield NewInstance(change.seq, change.resource_id)
        if page.changes:
            since = page.changes[-1].seq
            yield Scanned(since)
        if page.done and recheck and since > 0:
            for change in client.changes(max(0, since - recheck), recheck).changes:
                if change.seq <= since and _arrival(change) and change.seq not in seen:
                    log.warning(
                        "change %d (instance %s) appeared after change %d had been read; "
                        "processing it now",
                        change.seq,
                        change.resource_id,
                        since,
                    )
                    _remember(seen, change.seq, recheck)
                    yield NewInstance(change.seq, change.resource_id)
        if page.done:
            if not forever:
                return
            # Caught up: wait for new rows, waking at once on shutdown.
            stop.wait(poll_interval)


def _arrival(change: Change) -> bool:
    return change.change_type == "NewInstance" and change.resource_type == "Instance"


def _remember(seen: collections.OrderedDict[int, None], seq: int, recheck: int) -> None:
    """Note a yielded arrival; only the window that is read again needs remembering."""
    if recheck:
        seen[seq] = None
        while len(seen) > 2 * recheck:
            seen.popitem(last=False)
