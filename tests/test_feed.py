"""The feed against a change log whose rows can appear late, as an Orthanc cluster on
PostgreSQL in ReadCommitted mode may show them: a change committed after a higher one was
read. Fake log (the real plugin 4.0 never does this: tests/test_source_cluster.py)."""

from __future__ import annotations

import threading
from typing import cast

from bridge.outcomes import NewInstance
from bridge.peers import feed
from bridge.peers.orthanc import Change, ChangesPage, OrthancClient


class LateLog:
    """A change log in which the rows in `late` become visible only after `reveal_after` reads."""

    def __init__(self, last: int, late: set[int], reveal_after: int) -> None:
        self.rows = [
            Change(seq, "NewInstance", "Instance", f"i{seq}") for seq in range(1, last + 1)
        ]
        self.late = late
        self.reveal_after = reveal_after
        self.reads = 0
        self.polls = 0  # set by arrivals(): the feed is stopped after this many reads
        self.stop = threading.Event()

    def changes(self, since: int, limit: int) -> ChangesPage:
        self.reads += 1
        if self.reads >= self.polls:
            self.stop.set()
        visible = [
            row
            for row in self.rows
            if row.seq > since and (row.seq not in self.late or self.reads > self.reveal_after)
        ][:limit]
        last = self.rows[-1].seq
        done = not visible or visible[-1].seq == last
        return ChangesPage(visible, done, last)


def arrivals(log: LateLog, recheck: int, polls: int) -> list[int]:
    """The seqs the feed yields as arrivals over `polls` reads of an idle log."""
    log.polls = polls
    seqs: list[int] = []
    events = feed.follow(
        cast(OrthancClient, log),
        0,
        page_size=4,
        stop=log.stop,
        poll_interval=0.0,
        forever=True,
        recheck=recheck,
    )
    for event in events:
        if isinstance(event, NewInstance):
            seqs.append(event.seq)
    return seqs


def test_a_change_that_appears_late_is_yielded_once_with_recheck() -> None:
    log = LateLog(last=10, late={5}, reveal_after=3)
    seqs = arrivals(log, recheck=100, polls=12)
    assert sorted(seqs) == list(range(1, 11))  # 5 included, and nothing twice
    assert seqs.index(5) > seqs.index(10)  # it came after the log's end had been read


def test_without_recheck_a_late_change_is_never_seen() -> None:
    log = LateLog(last=10, late={5}, reveal_after=3)
    assert 5 not in arrivals(log, recheck=0, polls=12)


def test_the_window_bounds_what_is_read_again() -> None:
    log = LateLog(last=30, late={3}, reveal_after=9)
    seqs = arrivals(log, recheck=10, polls=20)  # 3 lies beyond the 10 changes read again
    assert 3 not in seqs and sorted(seqs) == [s for s in range(1, 31) if s != 3]
