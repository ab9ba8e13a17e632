"""The comparison behind `reconcile`, without servers (tests/test_resilience.py has them)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.engine.inventory import Inventory, read_ahead
from bridge.errors import ServerUnavailable


def pages(ids: list[str], size: int) -> list[list[str]]:
    return [ids[n : n + size] for n in range(0, len(ids), size)]


def test_what_any_target_lacks_comes_out_once_and_sorted(tmp_path: Path) -> None:
    source = [f"{n:08x}" for n in range(100, 0, -1)]  # Orthanc's order is not the ID's
    inventory = Inventory(tmp_path)
    try:
        # Offset paging over a server that changes can repeat an ID: it counts once.
        assert inventory.list_source(pages([*source, source[0]], 7)) == 101
        inventory.list_target(pages([i for i in source if int(i, 16) % 10], 9))
        inventory.subtract_target()
        inventory.list_target(pages([i for i in source if int(i, 16) % 5], 3))
        inventory.subtract_target()
        expected = sorted(i for i in source if int(i, 16) % 5 == 0)
        assert inventory.missing_count() == len(expected) == 20
        assert list(inventory.missing()) == expected
    finally:
        inventory.close()
    assert list(tmp_path.iterdir()) == []


def test_a_file_left_by_a_killed_reconcile_is_replaced(tmp_path: Path) -> None:
    (tmp_path / Inventory.FILE).write_bytes(b"not a database")
    inventory = Inventory(tmp_path)
    try:
        inventory.list_source([["a", "b"]])
        inventory.list_target([])
        inventory.subtract_target()
        assert list(inventory.missing()) == ["a", "b"]
    finally:
        inventory.close()


def test_read_ahead_keeps_the_order_and_raises_where_the_listing_failed() -> None:
    def listing() -> Iterator[list[str]]:
        for n in range(5):
            yield [str(n)]
        raise ServerUnavailable("source Orthanc: down")

    got: list[list[str]] = []
    with pytest.raises(ServerUnavailable, match="down"):
        for page in read_ahead(listing()):
            got.append(page)
    assert got == [[str(n)] for n in range(5)]


def test_read_ahead_ends_its_thread_when_the_reader_leaves() -> None:
    def endless() -> Iterator[list[str]]:
        while True:
            yield ["x"]

    pages = read_ahead(endless(), depth=1)
    assert next(pages) == ["x"]
    pages.close()  # returns only once the fetching thread has ended
    assert "listing" not in {t.name for t in threading.enumerate()}
