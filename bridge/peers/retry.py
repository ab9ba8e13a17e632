"""The one retry policy: transient errors are retried with exponential backoff and jitter.

`run` retries without limit (a hospital's Orthanc may be down for an hour); `catch-up` gives up
after a bounded wait. A single stop Event ends both the retries and the sleeps between them,
so that SIGTERM is honoured at once even in the middle of a backoff.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import tenacity

from bridge import metrics
from bridge.errors import TransientError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep retrying transient failures; None means forever."""

    stop: threading.Event
    max_wait: float | None = None
    initial: float = 0.5
    longest: float = 30.0
    # One tenacity.Retrying per server label, built on first use and shared by every thread
    # (it keeps its per-call state thread-local). Built per call, each left a threading.local
    # for the garbage collector, and on Python 3.11 collecting one while another thread runs
    # sys._current_frames() deadlocks the interpreter (CPython gh-106883): Dask's profiler
    # calls that every 10 ms, and a cluster worker hung within a few hundred instances.
    _retrying: dict[str | None, tenacity.Retrying] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def call(self, fn: Callable[[], T], server: str | None = None) -> T:
        """Run `fn`, retrying TransientError; re-raise the last one when the policy gives up.

        Each retry is logged with the error's own message, which names the call (the HTTP
        client's errors all do), and counted in orthanc_bridge_retries_total{server}.
        """

        retrying = self._retrying.get(server)
        if retrying is None:  # two threads may both build it: either one will do
            retrying = self._retrying[server] = self._build(server)
        return retrying(fn)

    def wait_before(self, attempt: int, failing_since: float) -> float | None:
        """For callers that cannot block in `call` (the cluster's outcomes, which arrive by
        callback): the seconds to wait before trying again after failed attempt `attempt`
        (1 for the first), failing since `failing_since` (time.monotonic()); None when the
        policy gives up (stopping, or failing for longer than `max_wait`). The same backoff
        as `call`'s."""
        if self.stop.is_set():
            return None
        if self.max_wait is not None and time.monotonic() - failing_since >= self.max_wait:
            return None
        return random.uniform(0, min(self.longest, self.initial * 2 ** (attempt - 1)))

    def _build(self, server: str | None) -> tenacity.Retrying:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            note_retry(server, error, state.attempt_number, delay)

        give_up: tenacity.stop.stop_base = tenacity.stop_when_event_set(self.stop)
        if self.max_wait is not None:
            give_up = give_up | tenacity.stop_after_delay(self.max_wait)
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientError),
            wait=tenacity.wait_random_exponential(multiplier=self.initial, max=self.longest),
            stop=give_up,
            sleep=tenacity.nap.sleep_using_event(self.stop),
            before_sleep=before_sleep,
            reraise=True,
        )


def no_retry(stop: threading.Event | None = None) -> RetryPolicy:
    """A policy that tries once: for commands that must answer quickly, like `status`."""
    return RetryPolicy(stop or threading.Event(), max_wait=0.0)


def note_retry(server: str | None, error: BaseException | None, attempt: int, delay: float) -> None:
    """Log a retry with the error's own message (which names the call) and count it in
    orthanc_bridge_retries_total{server}."""
    if server is not None:
        metrics.RETRIES.labels(server).inc()
    log.warning("%s; retry %d in %.1f s", error, attempt, delay)
