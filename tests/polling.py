"""Wait for a condition with a deadline instead of sleeping a guessed amount of time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Short enough that a test waits at most this much longer than needed.
POLL_INTERVAL = 0.05


def wait_for(
    condition: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = POLL_INTERVAL,
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """Poll `condition` until it returns something truthy, and return that, or TimeoutError.

    Exceptions of the `ignore` types count as "not yet" (a server still starting).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
        except ignore:
            result = None
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)
