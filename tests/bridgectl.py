"""Drive the bridge as users do: a bridge.yaml, then `python -m bridge ...` in a subprocess."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pydicom
import yaml
from pydicom.uid import generate_uid

from tests.orthanc import OrthancServer, free_ports, pydicom_test_files
from tests.polling import wait_for

REPO = Path(__file__).resolve().parent.parent


def write_config(workdir: Path, source: OrthancServer, target: OrthancServer, **extra: Any) -> Path:
    """A bridge.yaml for this pair; credentials travel in the environment (see `env`)."""
    config: dict[str, Any] = {
        "source": {"url": source.url, "timeout": 10},
        "target": {"url": target.url, "timeout": 10},
        "state_dir": str(workdir / "state"),
        "workers": 2,
        "poll_interval": 0.1,
        "catch_up_retry_seconds": 20,
        # Its own port: tests run bridges side by side, and the server is on in every one.
        "http_listen": f"127.0.0.1:{free_ports(1)[0]}",
    }
    config.update(extra)
    if "targets" in extra:  # several targets replace the single one
        del config["target"]
    path = workdir / "bridge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def http_url(config: Path) -> str:
    """The base URL of the HTTP server of the bridge that `config` describes."""
    listen = yaml.safe_load(config.read_text())["http_listen"]
    return f"http://{listen}"


def env(source: OrthancServer, target: OrthancServer) -> dict[str, str]:
    """The process environment with both servers' credentials, as a deployment passes them."""
    result = dict(os.environ)
    for role, server in (("SOURCE", source), ("TARGET", target)):
        if server.auth:
            result[f"BRIDGE_{role}_USERNAME"], result[f"BRIDGE_{role}_PASSWORD"] = server.auth
    return result


def run(
    command: str,
    config: Path,
    source: OrthancServer,
    target: OrthancServer,
    *args: str,
    timeout: float = 120,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one bridge command to completion and capture what it printed."""
    return subprocess.run(
        [sys.executable, "-m", "bridge", command, "-c", str(config), *args],
        cwd=REPO,
        env=env(source, target) | (extra_env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start(
    command: str, config: Path, source: OrthancServer, target: OrthancServer, log: Path
) -> subprocess.Popen[bytes]:
    """Start a bridge command in the background, its output going to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "bridge", command, "-c", str(config)],
            cwd=REPO,
            env=env(source, target),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Kill the bridge and its decoding processes (the whole session) with `sig`."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
    process.wait(timeout=30)


def variants(filename: str, count: int) -> list[bytes]:
    """`count` copies of a pydicom test file, each a new instance (new SOP Instance UID).

    Only the identifiers change; the compressed pixel data is the original's, byte for byte.
    """
    original = pydicom.dcmread(pydicom_test_files() / filename)
    series = generate_uid()
    copies = []
    for _ in range(count):
        ds = original.copy()
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        copies.append(buffer.getvalue())
    return copies


def upload_variants(server: OrthancServer, filename: str, count: int) -> set[str]:
    """Upload `count` new instances made from a pydicom test file; return their Orthanc IDs."""
    return {str(server.upload(data)["ID"]) for data in variants(filename, count)}


def wait_for_count(server: OrthancServer, count: int, timeout: float = 60) -> list[str]:
    """Poll until `server` holds `count` instances; return their IDs."""
    return wait_for(
        lambda: ids if len(ids := server.instances()) == count else None,
        timeout,
        f"{count} instances in {server.name}",
    )


class PeakRss:
    """Tracks the peak memory of a process group: the bridge, its zygote and its workers.

    Each process's own high-water mark (VmHWM, kept by the kernel) is read while it lives, so a
    short spike between two polls is not missed; their sum bounds the group's peak from above.
    """

    def __init__(
        self,
        pgid: int,
        interval: float = 0.02,
        members: Callable[[], Iterable[int]] | None = None,
    ) -> None:
        self.pgid = pgid
        self._interval = interval
        # Who to read: by default every process of the group, found by scanning /proc (17%
        # of a core at 20 ms: taken from what is measured); `members` may know them cheaper.
        self._members = members
        self._peaks: dict[int, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            if self._members is None:
                for proc in Path("/proc").iterdir():
                    if proc.name.isdigit():
                        self._sample(proc)
            else:
                for pid in self._members():
                    self._sample(Path(f"/proc/{pid}"), known=True)
            self._done.wait(self._interval)

    def _sample(self, proc: Path, known: bool = False) -> None:
        try:
            # The command name (field 2) may hold spaces: fields after its ")" are fixed.
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if not known and int(fields[2]) != self.pgid:
                return
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    kib = int(line.split()[1])
                    pid = int(proc.name)
                    self._peaks[pid] = max(self._peaks.get(pid, 0), kib * 1024)
        except (OSError, IndexError, ValueError):
            pass  # the process ended between listing and reading

    def stop(self) -> int:
        """Stop polling; return the sum of every group member's peak RSS, in bytes."""
        self._done.set()
        self._thread.join()
        return sum(self._peaks.values())


def run_measured(
    command: str,
    config: Path,
    source: OrthancServer,
    target: OrthancServer,
    *args: str,
    timeout: float = 120,
    preexec: Callable[[], None] | None = None,
    monitor: Callable[[int], PeakRss] = PeakRss,
) -> tuple[subprocess.CompletedProcess[str], int]:
    """Like `run`, also returning the peak RSS of the bridge and its workers, in bytes.

    `preexec` runs in the new process before the bridge starts, and `monitor(pid)` measures
    it (both: tests/tree_memory.py).
    """
    argv = [sys.executable, "-m", "bridge", command, "-c", str(config), *args]
    process = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env(source, target),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, which PeakRss follows
        preexec_fn=preexec,
    )
    peaks = monitor(process.pid)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        peak = peaks.stop()
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr), peak
