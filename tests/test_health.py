"""Liveness, readiness and their helpers, with fake clocks and servers (no Orthanc needed:
tests/test_observe.py proves the same decisions against real servers)."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from bridge import metrics
from bridge.config import ServerConfig
from bridge.ledger.state import State
from bridge.peers.orthanc import OrthancClient
from bridge.watch import sdnotify
from bridge.watch.health import READY_WINDOW, Health, Throughput
from bridge.watch.logs import JsonFormatter


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeClient:
    role: str
    what: str = "Orthanc"
    server: ServerConfig = field(default_factory=lambda: ServerConfig("http://x", timeout=60))
    up: bool | None = None
    last_answer: float | None = None
    last_failure: float | None = None
    last_error: str | None = None


def health(tmp_path: Path, clock: Clock) -> tuple[Health, FakeClient, FakeClient]:
    source, target = FakeClient("source"), FakeClient("target")
    state = State(tmp_path / "state")
    checked = Health(
        cast(OrthancClient, source), [cast(OrthancClient, target)], state, 1.0, clock=clock
    )
    return checked, source, target


def test_throughput_counts_per_minute_over_the_last_hour() -> None:
    clock = Clock(60 * 1000)
    rate = Throughput(clock)
    rate.add()
    rate.add(2)
    clock.now += 60 * 5
    rate.add()
    counts = rate.per_minute()
    assert len(counts) == 60
    assert counts[-1] == 1 and counts[-6] == 3 and sum(counts) == 4
    clock.now += 60 * 60
    assert sum(rate.per_minute()) == 0


def test_liveness_fails_only_when_the_loop_stops(tmp_path: Path) -> None:
    clock = Clock()
    checked, source, _ = health(tmp_path, clock)
    assert checked.liveness() is None
    # 60 s source timeout + 30 s longest backoff + 2 polls + 30 s margin
    assert checked.stuck_after == 122
    clock.now += 121
    assert checked.liveness() is None
    clock.now += 2
    assert "has not moved for 123 s" in str(checked.liveness())
    # A source that keeps failing means the loop is retrying, not stuck.
    source.last_failure = clock.now
    assert checked.liveness() is None
    clock.now += 200
    checked.beat()
    assert checked.liveness() is None


def test_readiness_names_each_reason(tmp_path: Path) -> None:
    clock = Clock()
    checked, source, target = health(tmp_path, clock)
    reasons = checked.readiness()
    assert reasons == [
        "the source Orthanc has not answered yet",
        "the target Orthanc has not answered yet",
    ]
    for client in (source, target):
        client.up, client.last_answer = True, clock.now
    assert checked.readiness() == []
    target.up, target.last_error = False, "target Orthanc (upload): Connection refused"
    assert checked.readiness() == [
        "the target Orthanc is down: target Orthanc (upload): Connection refused"
    ]
    target.up = True
    clock.now += READY_WINDOW + 1
    checked.beat()
    assert checked.readiness() == [
        "the source Orthanc has not answered for 31 s",
        "the target Orthanc has not answered for 31 s",
    ]


def test_state_that_cannot_be_written_is_not_ready(tmp_path: Path) -> None:
    state = State(tmp_path / "state")
    assert state.writable() is None
    # Another writer holds the database.
    holder = sqlite3.connect(tmp_path / "state" / State.FILE, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    state._db.execute("PRAGMA busy_timeout = 10")
    try:
        assert "cannot write the state" in str(state.writable())
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        state.close()


def test_syntax_labels_are_bounded() -> None:
    assert metrics.syntax_label("1.2.840.10008.1.2.4.90") == "1.2.840.10008.1.2.4.90"
    assert metrics.syntax_label("1.2.3.4.5.6.7.8.9") == "other"
    assert metrics.syntax_label(None) == "unknown"


def test_json_log_lines_carry_the_instance_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("bridge.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        event = {"instance": "a-b", "outcome": "failed", "source_syntax": None, "ms": 12}
        logger.warning("instance %s: ¿%s?", "a-b", "bad", extra=event)
        logger.warning("plain")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "instance a-b: ¿bad?"
    assert {k: first[k] for k in event} == event
    assert first["level"] == "WARNING" and first["logger"] == "bridge.test-json"
    assert first["timestamp"].endswith("+00:00")
    assert "instance" not in second


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    """A datagram socket standing for systemd's notify socket."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s: petted every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    return sock


def test_systemd_hears_ready_then_the_watchdog_while_alive(systemd: socket.socket) -> None:
    stuck: list[str] = []
    watchdog = sdnotify.Watchdog(lambda: stuck[0] if stuck else None, lambda: "following")
    watchdog.start()
    try:
        assert systemd.recv(1024).decode() == "READY=1\nSTATUS=following"
        assert systemd.recv(1024).decode() == "WATCHDOG=1\nSTATUS=following"
        stuck.append("the feed loop has not moved for 200 s")
        said = [systemd.recv(1024).decode() for _ in range(3)]
        assert said[-1] == "STATUS=stuck: the feed loop has not moved for 200 s"
    finally:
        watchdog.close()
    while (message := systemd.recv(1024).decode()) != "STOPPING=1":
        assert "WATCHDOG=1" not in message


def test_outside_systemd_notify_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.watchdog_seconds() is None


def test_watchdog_for_another_process_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert sdnotify.watchdog_seconds() is None


def test_probes_run_in_the_background_until_closed(tmp_path: Path) -> None:
    probed = threading.Event()

    class Probed(FakeClient):
        def probe(self) -> Any:
            self.up, self.last_answer = True, 1e9
            probed.set()

    state = State(tmp_path / "state")
    checked = Health(
        cast(OrthancClient, Probed("source")), [cast(OrthancClient, Probed("target"))], state, 1.0
    )
    checked.start()
    try:
        assert probed.wait(5)
    finally:
        checked.close()
        state.close()
    assert checked.state_problem is None
