"""The peak memory of a process tree with every page counted once: a memory cgroup of its own.

Summing each process's VmHWM (bridgectl.PeakRss) counts a page that several processes share
once per process (the decoders forked from one parent, the libraries), and misses every page
that no process maps: a file in memory (memfd, tmpfs) written and read with system calls. The
kernel's memory controller counts each page once, when it is charged to the group of the
process that first touched it, whatever the kind: anonymous memory, memfd and tmpfs pages, and
the page cache of files the tree writes (its ledger). It keeps the group's high-water mark itself
(cgroup v2 `memory.peak`, v1 `memory.max_usage_in_bytes`), so no spike between two looks is
missed. Pages already in the page cache when the tree started (the Python modules and libraries
it maps, read before by this process or another) stay charged to their first reader and are not
counted.

The group is made inside the cgroup this process is in (so the machine's own accounting of this
process still includes it), the command is moved into it before it runs anything, and the group
is removed once every process in it has ended.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests import bridgectl
from tests.orthanc import OrthancServer
from tests.polling import wait_for

_CGROUP_ROOT = Path("/sys/fs/cgroup")
# (the file that holds the peak, the group's processes) per cgroup version.
_PEAK = {"v1": "memory.max_usage_in_bytes", "v2": "memory.peak"}
_numbers = itertools.count()


def _own_memory_group() -> tuple[str, Path] | None:
    """This process's memory cgroup directory and its version, or None without one."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        number, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            directory = _CGROUP_ROOT / "memory" / path.lstrip("/")
            if (directory / _PEAK["v1"]).exists():
                return "v1", directory
        if number == "0" and controllers == "":
            directory = _CGROUP_ROOT / path.lstrip("/")
            # v2's controller must be enabled for children; its peak file says so.
            if (directory / "cgroup.subtree_control").exists() and "memory" in (
                directory / "cgroup.subtree_control"
            ).read_text().split():
                return "v2", directory
    return None


class TreeMemory:
    """A memory cgroup for one command's process tree; `peak()` once the tree has ended."""

    def __init__(self, version: str, directory: Path) -> None:
        self.version = version
        self.directory = directory

    @classmethod
    def create(cls) -> TreeMemory | None:
        """A new, empty group under this process's own; None where none can be made."""
        found = _own_memory_group()
        if found is None:
            return None
        version, parent = found
        directory = parent / f"orthanc-bridge-measure-{os.getpid()}-{next(_numbers)}"
        try:
            directory.mkdir()
        except OSError:  # not root, or a read-only cgroup file system
            return None
        return cls(version, directory)

    def join(self) -> None:
        """Move the calling process into the group (a `preexec_fn`: runs in the child before
        exec, so that everything the command and its children allocate is charged here)."""
        (self.directory / "cgroup.procs").write_text("0")

    def peak(self) -> int:
        """The group's high-water mark in bytes, read once its processes have all ended."""
        wait_for(
            lambda: not (self.directory / "cgroup.procs").read_text().strip(),
            30,
            "the measured processes to end",
        )
        return int((self.directory / _PEAK[self.version]).read_text())

    def remove(self) -> None:
        """Remove the group (its remaining charges, page cache, go to the parent)."""
        wait_for(
            lambda: not (self.directory / "cgroup.procs").read_text().strip(),
            30,
            "the measured processes to end",
        )
        self.directory.rmdir()


@dataclass(frozen=True)
class Measured:
    """A finished command, and its process tree's peak memory by both counts, in bytes."""

    done: subprocess.CompletedProcess[str]
    tree: int | None  # every page once (the cgroup's peak); None where no group could be made
    summed: int  # the sum of each process's own peak RSS (VmHWM), as bridgectl.PeakRss counts


def run_measured(
    command: str,
    config: Path,
    source: OrthancServer,
    target: OrthancServer,
    *args: str,
    timeout: float = 120,
) -> Measured:
    """Run one bridge command to completion in a memory cgroup of its own, measured."""
    argv = [sys.executable, "-m", "bridge", command, "-c", str(config), *args]
    group = TreeMemory.create()
    process = subprocess.Popen(
        argv,
        cwd=bridgectl.REPO,
        env=bridgectl.env(source, target),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, which PeakRss follows
        preexec_fn=group.join if group else None,  # before exec: all it allocates is charged
    )
    monitor = bridgectl.PeakRss(process.pid)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        summed = monitor.stop()
        tree = None
        if group is not None:
            try:
                tree = group.peak()
            finally:
                group.remove()
    return Measured(
        subprocess.CompletedProcess(argv, process.returncode, stdout, stderr), tree, summed
    )
