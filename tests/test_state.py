"""The durable state, the cursor rule (it only passes finished work) and the byte budget."""

from __future__ import annotations

import contextlib
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any, cast

import pytest

from bridge.config import ServerConfig, TargetConfig
from bridge.engine.budget import ByteBudget, Holding
from bridge.engine.destinations import Destination, OrthancDestination
from bridge.engine.pipeline import Progress
from bridge.engine.transfer import Transfer
from bridge.errors import Interrupted, StateError
from bridge.jobs import Transcoded
from bridge.ledger.state import State
from bridge.outcomes import CONVERTED, DELETING, FAILED, PENDING, PROBLEMS, Entry, NewInstance
from bridge.peers.orthanc import OrthancClient, Stored
from bridge.uids import EXPLICIT_VR_LITTLE_ENDIAN
from tests.polling import wait_for


@pytest.fixture
def state(tmp_path: Path) -> State:
    return State(tmp_path / "state")


def test_cursor_stays_below_the_lowest_change_in_flight(state: State) -> None:
    progress = Progress(state)
    for seq in (3, 5, 8):
        progress.start(seq)
    progress.scanned(10)
    assert state.cursor() == 2  # 1 and 2 needed no work; 3 is in flight
    progress.finish(Entry("i5", 5, CONVERTED))
    progress.finish(Entry("i8", 8, CONVERTED))
    assert state.cursor() == 2  # 3 is still in flight
    progress.finish(Entry("i3", 3, FAILED, error="bad"))
    assert state.cursor() == 10  # everything read is finished
    assert state.finished("i5", 5) and not state.finished("i5", 6)


def test_cursor_survives_reopening_and_a_second_bridge_is_refused(tmp_path: Path) -> None:
    first = State(tmp_path)
    first.set_cursor(42)
    with pytest.raises(StateError, match="another orthanc-bridge"):
        State(tmp_path)
    first.close()
    again = State(tmp_path)
    assert again.cursor() == 42
    again.close()


def test_ledger_counts_attempts_and_requeues_problems(state: State) -> None:
    state.record(Entry("a", 1, FAILED, "1.2.840.10008.1.2.4.90", "truncated"))
    state.record(Entry("a", 1, FAILED, "1.2.840.10008.1.2.4.90", "still truncated"))
    state.record(Entry("b", 2, CONVERTED))
    entry = state.get("a")
    assert entry is not None
    assert (entry.attempts, entry.error) == (2, "still truncated")
    assert state.counts() == {FAILED: 1, CONVERTED: 1}
    assert state.requeue(PROBLEMS) == ["a"]
    assert state.counts() == {PENDING: 1, CONVERTED: 1}


def test_budget_blocks_growth_until_room_and_admits_a_lone_giant() -> None:
    stop = threading.Event()
    budget = ByteBudget(100, stop)
    with budget.holding() as giant:
        giant.set(500)  # alone: admitted although over the limit
    assert budget.used == 0
    first = budget.holding()
    holding = first.__enter__()
    holding.set(80)
    released = threading.Event()

    def grow() -> None:
        with budget.holding() as second:
            second.set(50)
            released.set()

    thread = threading.Thread(target=grow)
    thread.start()
    assert not released.wait(0.3)  # 80 + 50 > 100: waits
    first.__exit__(None, None, None)
    thread.join(5)
    assert released.is_set() and budget.used == 0 and budget.peak == 500
    stop.set()
    with budget.holding() as h:
        h.set(90)
        with pytest.raises(Interrupted), budget.holding() as other:
            other.set(50)


def test_budget_lets_the_oldest_holding_grow_so_that_two_growing_ones_never_deadlock() -> None:
    """Two holdings that both fit, then both must grow past the limit: the older one goes on."""
    stop = threading.Event()
    budget = ByteBudget(100, stop)
    older_ctx, younger_ctx = budget.holding(), budget.holding()
    older, younger = older_ctx.__enter__(), younger_ctx.__enter__()
    older.set(40)  # compressed files, both admitted
    younger.set(40)
    younger_grown = threading.Event()

    def grow_younger() -> None:
        younger.set(70)  # decoded: 80 + 30 > 100, and it is not the oldest: waits
        younger_grown.set()

    thread = threading.Thread(target=grow_younger)
    thread.start()
    assert not younger_grown.wait(0.3)
    older.set(70)  # 110 > 100, but the oldest in flight always may: no deadlock
    assert budget.used == 110
    assert not younger_grown.is_set()
    older_ctx.__exit__(None, None, None)  # uploaded: its bytes come back
    assert younger_grown.wait(5)
    younger_ctx.__exit__(None, None, None)
    thread.join(5)
    assert budget.used == 0 and budget.peak == 110
    stop.set()


class _Servers:
    """Source and target in one fake: a 100-byte download, every upload stored as sent."""

    def download(self, instance: str) -> bytes:
        return b"c" * 100

    def upload(self, data: bytes | bytearray) -> Stored:
        return Stored("iid", "Success")

    def transfer_syntax(self, instance: str) -> str:
        return EXPLICIT_VR_LITTLE_ENDIAN


def test_a_decoded_copy_is_counted_before_it_is_decoded() -> None:
    """Its worker cannot wait for room once it has decoded: the room is taken before."""
    stop = threading.Event()
    budget = ByteBudget(10**9, stop)
    held_while_decoding: list[int] = []

    def decode(data: bytes | memoryview) -> Transcoded:
        held_while_decoding.append(budget.used)
        return Transcoded(b"d" * 1000, "1.2.840.10008.1.2.4.90", "1.2.3", forwarded=False)

    servers = cast(OrthancClient, _Servers())
    targets: list[Destination] = [
        OrthancDestination(TargetConfig("target", ServerConfig("http://b")), servers, stop)
    ]
    transfer = Transfer(
        servers, targets, decode, False, stop, budget, lambda entry: None, lambda data: 1000
    )
    assert transfer.run(NewInstance(1, "iid")).state == CONVERTED
    assert held_while_decoding == [100 + 1000]
    assert budget.used == 0 and budget.peak == 1100


# --- issue 19: edges of the ledger, the cursor and the budget -------------------------------


def test_retry_and_reconcile_keep_the_change_an_instance_was_recorded_at(state: State) -> None:
    """They work outside the change log (sequence -1): the row keeps its real change."""
    state.record(Entry("a", 7, FAILED, error="truncated"))
    state.requeue(PROBLEMS)
    state.record(Entry("a", -1, CONVERTED))
    entry = state.get("a")
    assert entry is not None and (entry.seq, entry.state) == (7, CONVERTED)
    assert state.finished("a", 7)  # the feed, meeting change 7 again, knows it is done


class _FailingCommit:
    """A connection whose next COMMIT fails as a full disk makes it fail (SQLite leaves the
    transaction open); everything else goes to the real connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.failures = 1

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)


def test_a_failed_commit_is_rolled_back_and_the_write_can_be_done_again(state: State) -> None:
    state.set_cursor(3)
    failing = _FailingCommit(state._db)
    state._db = cast(sqlite3.Connection, failing)
    with pytest.raises(StateError, match="disk is full"):
        state.record(Entry("a", 4, CONVERTED), cursor=4)
    # Not half-written, and the next transaction can begin (before: "cannot start a
    # transaction within a transaction" for ever after).
    assert state.cursor() == 3 and state.get("a") is None
    state.record(Entry("a", 4, CONVERTED), cursor=4)
    assert state.cursor() == 4 and state.finished("a", 4)


def test_the_cursor_does_not_move_when_the_outcome_could_not_be_written(state: State) -> None:
    progress = Progress(state)
    progress.start(5)
    progress.scanned(9)
    failing = _FailingCommit(state._db)
    state._db = cast(sqlite3.Connection, failing)
    with pytest.raises(StateError):
        progress.finish(Entry("i5", 5, CONVERTED))
    assert (progress.cursor, state.cursor()) == (4, 4)  # still below the unrecorded change
    progress.scanned(12)  # the feed reads on: the cursor still may not pass change 5
    assert state.cursor() == 4
    progress.finish(Entry("i5", 5, CONVERTED))  # written again, this time it commits
    assert (progress.cursor, state.cursor()) == (12, 12) and state.finished("i5", 5)


def test_every_deleting_row_can_be_read_not_only_the_latest_thousand(state: State) -> None:
    for n in range(1500):
        state.record(Entry(f"i{n}", n, DELETING))
    assert len(state.entries((DELETING,), limit=None)) == 1500
    assert len(state.entries((DELETING,))) == 1000


def test_budget_growth_is_checked_and_taken_at_once_by_threads_woken_together() -> None:
    """Many threads wait for room; room for one frees up: only one may take it.

    The window between seeing room and taking it was a few bytecodes wide: threads switch as
    often as possible here, and the scene is played twenty times.
    """
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(20):
            held = _room_for_one_among_many()
            assert held == 60, f"{held} bytes held with a limit of 100"
    finally:
        sys.setswitchinterval(interval)


def _room_for_one_among_many() -> int:
    """Bytes held once room for one of 40 waiting 60-byte holdings was made."""
    stop = threading.Event()
    budget = ByteBudget(100, stop)
    oldest = budget.holding()
    blocker = oldest.__enter__()
    blocker.set(100)  # the oldest holding fills the budget
    waiting = [budget.holding().__enter__() for _ in range(40)]

    def grow(holding: Holding) -> None:
        with contextlib.suppress(Interrupted):  # the end of the scene stops those still waiting
            holding.set(60)

    threads = [threading.Thread(target=grow, args=(h,), daemon=True) for h in waiting]
    for thread in threads:
        thread.start()
    waiters = budget._cond._waiters  # type: ignore[attr-defined]
    wait_for(lambda: len(waiters) == len(threads), 5, "every thread to wait for room")
    blocker.set(0)  # room for one 60-byte holding, not two
    wait_for(lambda: budget.used >= 60, 5, "one holding to grow")
    wait_for(lambda: len(waiters) == len(threads) - 1 or budget.used > 100, 5, "the others to wait")
    held = budget.used
    stop.set()
    for thread in threads:
        thread.join(5)
    return held
