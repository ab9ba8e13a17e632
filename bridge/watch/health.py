"""Is the bridge alive, is it ready: decided from what its own loops and clients note.

Liveness asks whether the feed loop still turns. It beats on every poll of the change log and
every wait for room in the pipeline; a failing source counts as a sign of life too (the loop is
retrying, and restarting the process would not help). Readiness asks whether the work can
proceed: both servers answered recently and well, and the state can be written. When nothing
is transferring, a probe thread asks each server's /system every few seconds so that readiness
stays true to the moment, and checks the state.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial

from bridge.errors import BridgeError
from bridge.ledger.state import State
from bridge.peers.orthanc import OrthancClient
from bridge.peers.peer import Peer
from bridge.peers.retry import RetryPolicy

# A server that has not answered for this long, even between transfers, is not ready.
READY_WINDOW = 30.0
# How often an idle server is probed, and the state checked.
PROBE_EVERY = 5.0


class Throughput:
    """Instances finished per minute over the last hour, for the status page's plot."""

    MINUTES = 60

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._minutes: deque[list[int]] = deque(maxlen=self.MINUTES)  # [minute, count]

    def add(self, count: int = 1) -> None:
        """`count` instances finished now."""
        minute = int(self._clock() // 60)
        with self._lock:
            if self._minutes and self._minutes[-1][0] == minute:
                self._minutes[-1][1] += count
            else:
                self._minutes.append([minute, count])

    def per_minute(self) -> list[int]:
        """Counts for the last 60 minutes, oldest first; the last is the current minute."""
        now = int(self._clock() // 60)
        with self._lock:
            counts = {minute: count for minute, count in self._minutes}
        return [counts.get(minute, 0) for minute in range(now - self.MINUTES + 1, now + 1)]


class Health:
    """Liveness and readiness of one bridge process."""

    def __init__(
        self,
        source: OrthancClient,
        targets: Sequence[Peer],
        state: State,
        poll_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.servers: tuple[Peer, ...] = (source, *targets)
        # More reasons not to be ready, each None when all is well (the cluster's, for one).
        self.checks: list[Callable[[], str | None]] = []
        self._state = state
        self._clock = clock
        self._beat = clock()
        # The longest a turning loop can go without a beat: a request to the source that
        # times out, the longest backoff after it, and a poll interval, with a margin.
        self.stuck_after = source.server.timeout + RetryPolicy.longest + 2 * poll_interval + 30
        self.state_problem: str | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def beat(self) -> None:
        """The feed (or dispatch) loop went round once."""
        self._beat = self._clock()

    def liveness(self) -> str | None:
        """None while the loop turns; otherwise why the process looks stuck."""
        source = self.servers[0]
        last_sign = max(self._beat, source.last_failure or 0.0)
        silent = self._clock() - last_sign
        if silent > self.stuck_after:
            return (
                f"the feed loop has not moved for {silent:.0f} s (limit {self.stuck_after:.0f} s)"
            )
        return None

    def readiness(self) -> list[str]:
        """Why the bridge cannot do its work now; empty when it can."""
        reasons = []
        now = self._clock()
        for client in self.servers:
            name = f"the {client.role} {client.what}"
            if client.up is None:
                reasons.append(f"{name} has not answered yet")
            elif not client.up:
                reasons.append(f"{name} is down: {client.last_error}")
            elif client.last_answer is not None and now - client.last_answer > READY_WINDOW:
                reasons.append(f"{name} has not answered for {now - client.last_answer:.0f} s")
        if self.state_problem:
            reasons.append(self.state_problem)
        reasons += [reason for check in self.checks if (reason := check())]
        stuck = self.liveness()
        if stuck:
            reasons.append(stuck)
        return reasons

    # --- probing --------------------------------------------------------------------------

    def start(self) -> None:
        """Probe idle servers and check the state in the background until `close`."""
        loops: list[Callable[[], None]] = [self._check_state]
        loops += [partial(self._probe, client) for client in self.servers]
        for loop in loops:
            thread = threading.Thread(target=self._every, args=(loop,), daemon=True)
            thread.name = "health"
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop probing."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=1)

    def _every(self, check: Callable[[], None]) -> None:
        while True:
            check()
            if self._stop.wait(PROBE_EVERY):
                return

    def _probe(self, client: Peer) -> None:
        last = client.last_answer
        if last is not None and self._clock() - last < PROBE_EVERY and client.up:
            return  # transfers just proved it answers
        # A failure is noted by the client itself; readiness reports it.
        with contextlib.suppress(BridgeError):
            client.probe()

    def _check_state(self) -> None:
        self.state_problem = self._state.writable()
