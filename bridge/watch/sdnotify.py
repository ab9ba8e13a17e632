"""systemd's notify protocol, for `Type=notify` with `WatchdogSec=`: a few lines, no library.

READY=1 once the bridge works, STATUS= with what it does, WATCHDOG=1 at half the watchdog
period but only while the feed loop turns (bridge.watch.health), so that systemd restarts a bridge
that is stuck, not merely one waiting for a server, and STOPPING=1 on the way out. Outside
systemd (no NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable


def notify(*lines: str) -> bool:
    """Send `lines` to systemd; False when not run by systemd or when it cannot be told."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError:
        return False
    return True


def watchdog_seconds() -> float | None:
    """The period systemd expects WATCHDOG=1 within, if it set one for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    with contextlib.suppress(ValueError):
        return int(usec) / 1e6
    return None


class Watchdog:
    """Pets systemd's watchdog while `alive()` is None (no reason to think it stuck)."""

    def __init__(self, alive: Callable[[], str | None], status: Callable[[], str]) -> None:
        self._alive = alive
        self._status = status
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Say READY=1, and pet the watchdog in the background if systemd asked for it."""
        notify("READY=1", f"STATUS={self._status()}")
        period = watchdog_seconds()
        if period:
            self._thread = threading.Thread(
                target=self._run, args=(period / 2,), name="watchdog", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Say STOPPING=1 and stop petting."""
        notify("STOPPING=1")
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            stuck = self._alive()
            if stuck is None:
                notify("WATCHDOG=1", f"STATUS={self._status()}")
            else:
                notify(f"STATUS=stuck: {stuck}")
