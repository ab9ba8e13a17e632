"""The durable state, the cursor rule (it only passes finished work) and the byte budget."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import cast

import pytest

from bridge.budget import ByteBudget
from bridge.config import ServerConfig, TargetConfig
from bridge.decoding import EXPLICIT_VR_LITTLE_ENDIAN, Transcoded
from bridge.errors import Interrupted, StateError
from bridge.feed import NewInstance
from bridge.orthanc import OrthancClient, Stored
from bridge.pipeline import Progress
from bridge.state import CONVERTED, FAILED, PENDING, PROBLEMS, Entry, State
from bridge.transfer import Destination, Transfer


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

    def decode(data: bytes) -> Transcoded:
        held_while_decoding.append(budget.used)
        return Transcoded(b"d" * 1000, "1.2.840.10008.1.2.4.90", "1.2.3", forwarded=False)

    servers = cast(OrthancClient, _Servers())
    targets = [Destination(TargetConfig("target", ServerConfig("http://b")), servers)]
    transfer = Transfer(
        servers, targets, decode, False, stop, budget, lambda entry: None, lambda data: 1000
    )
    assert transfer.run(NewInstance(1, "iid")).state == CONVERTED
    assert held_while_decoding == [100 + 1000]
    assert budget.used == 0 and budget.peak == 1100
