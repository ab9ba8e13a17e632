"""How far a one-shot command is: a progress bar on a terminal, a log line every N s elsewhere.

`catch-up` counts changes (from the cursor it started at to the source's last change, a total
that grows while it runs); `retry` and `reconcile` count instances. The bar is tqdm's: done and
total, rate and time left. Log records go through tqdm while the bar is shown, so that a
warning never tears it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("bridge.watch.progress")

# (done, total); total 0 while unknown.
Reading = Callable[[], tuple[int, int]]
_BAR_REFRESH = 0.5


@contextmanager
def shown(
    what: str, unit: str, read: Reading, interval: float, stream: TextIO | None = None
) -> Iterator[None]:
    """Report `read()` while the block runs; a last report when it ends."""
    stream = stream or sys.stderr
    stop = threading.Event()
    terminal = stream.isatty()
    report = _Bar(what, unit, read, stream) if terminal else _Lines(what, unit, read)
    thread = threading.Thread(
        target=_every,
        args=(report.update, _BAR_REFRESH if terminal else interval, stop),
        name="progress",
        daemon=True,
    )
    redirect = logging_redirect_tqdm() if terminal else contextlib.nullcontext()
    with redirect:
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            report.update()
            report.close()


def _every(update: Callable[[], None], seconds: float, stop: threading.Event) -> None:
    while not stop.wait(seconds):
        update()


class _Bar:
    def __init__(self, what: str, unit: str, read: Reading, stream: TextIO) -> None:
        self._read = read
        # Follows the terminal's size. A terminal that reports none (a bare pty, `script`)
        # gets a fixed one: tqdm would hide a bar below a screen 0 lines high.
        try:
            size = os.get_terminal_size(stream.fileno())
            sized = size.columns > 0 and size.lines > 0
        except (OSError, ValueError):
            sized = False
        self._bar = tqdm(
            desc=what,
            unit=f" {unit}",
            file=stream,
            dynamic_ncols=sized,
            ncols=None if sized else 100,
            nrows=None if sized else 24,
        )

    def update(self) -> None:
        done, total = self._read()
        if total and total != self._bar.total:
            self._bar.total = max(total, done)
        if done > self._bar.n:
            self._bar.update(done - self._bar.n)
        else:
            self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


class _Lines:
    def __init__(self, what: str, unit: str, read: Reading) -> None:
        self._what = what
        self._unit = unit
        self._read = read
        self._started = time.monotonic()

    def update(self) -> None:
        done, total = self._read()
        seconds = time.monotonic() - self._started
        rate = done / seconds if seconds > 0 else 0.0
        if total:
            left = (
                f", about {_duration((total - done) / rate)} left" if rate and done < total else ""
            )
            log.info(
                "%s: %d/%d %s (%.0f%%), %.1f/s%s",
                self._what,
                done,
                total,
                self._unit,
                100.0 * done / total,
                rate,
                left,
            )
        else:
            log.info("%s: %d %s, %.1f/s", self._what, done, self._unit, rate)

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
