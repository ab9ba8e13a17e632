"""Render a page in a real browser: Debian's headless Chromium (scripts/setup.sh installs it).

`render_page` runs Chromium twice, each time with a fresh profile: once with --screenshot to
save a PNG, once with --dump-dom to return the DOM after parsing (proof that a browser made
sense of the page, not only that a regex did). About a second each.

The flags matter on this machine: as root Chromium needs --no-sandbox, and without the
background-networking flags it spends its time on connections the closed network refuses.
A missing Chromium raises: the test must fail in CI, never skip.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT = 60.0
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1600",
)


class BrowserError(RuntimeError):
    """Chromium is missing, failed, or did not finish in time."""


def render_page(url: str, screenshot: Path) -> str:
    """Save a PNG of `url` to `screenshot` and return its DOM as Chromium serialized it."""
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)
    _chromium(f"--screenshot={screenshot}", url)
    if not screenshot.is_file():
        raise BrowserError(f"chromium wrote no screenshot to {screenshot}")
    return _chromium("--dump-dom", url)


def _chromium(*args: str) -> str:
    if not os.access(CHROMIUM, os.X_OK):
        raise BrowserError(
            f"{CHROMIUM} is missing: run scripts/setup.sh "
            "(apt-get install --no-install-recommends chromium)"
        )
    with tempfile.TemporaryDirectory(prefix="bridge-chromium-") as profile:
        command = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args]
        # A session of its own: on timeout the whole group goes (renderer, GPU, zygote, ...).
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise BrowserError(f"chromium took more than {TIMEOUT:.0f} s: {command}") from None
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    if process.returncode != 0:
        raise BrowserError(f"chromium exited with {process.returncode}: {command}\n{_tail(stderr)}")
    return stdout


def _tail(text: str, lines: int = 20) -> str:
    """The end of Chromium's standard error, without its dbus noise (no bus in containers)."""
    kept = [line for line in text.splitlines() if "dbus" not in line]
    return "\n".join(kept[-lines:])
