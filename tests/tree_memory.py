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
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests import bridgectl
from tests.orthanc import OrthancServer
from tests.polling import wait_for

_CGROUP_ROOT = Path("/sys/fs/cgroup")
# The file that holds a group's high-water mark, per cgroup version.
_PEAK = {"v1": "memory.max_usage_in_bytes", "v2": "memory.peak"}
_numbers = itertools.count()


def _own_groups() -> list[tuple[str, Path]]:
    """This process's cgroup directories that may hold a memory controller, with versions."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    groups = []
    for line in lines:
        number, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            groups.append(("v1", _CGROUP_ROOT / "memory" / path.lstrip("/")))
        elif number == "0" and (_CGROUP_ROOT / "cgroup.controllers").exists():  # v2 alone
            groups.append(("v2", _CGROUP_ROOT / path.lstrip("/")))
    return groups


class TreeMemory:
    """A memory cgroup for one command's process tree; `peak()` once the tree has ended."""

    def __init__(self, version: str, directory: Path) -> None:
        self.version = version
        self.directory = directory

    @classmethod
    def create(cls) -> TreeMemory | None:
        """A new, empty group under this process's own; None where none can be made."""
        name = f"orthanc-bridge-measure-{os.getpid()}-{next(_numbers)}"
        for version, parent in _own_groups():
            directory = parent / name
            try:
                directory.mkdir()
            except OSError:  # not root, a read-only cgroup file system, no such hierarchy
                continue
            if (directory / _PEAK[version]).exists():
                return cls(version, directory)
            directory.rmdir()  # no memory controller there
        return None

    def join(self) -> None:
        """Move the calling process into the group (a `preexec_fn`: runs in the child before
        exec, so that everything the command and its children allocate is charged here)."""
        (self.directory / "cgroup.procs").write_text("0")

    def members(self) -> list[int]:
        """The process IDs in the group now."""
        return [int(pid) for pid in (self.directory / "cgroup.procs").read_text().split()]

    def peak(self) -> int:
        """The group's high-water mark in bytes, read once its processes have all ended."""
        self._wait_until_empty()
        return int((self.directory / _PEAK[self.version]).read_text())

    def remove(self) -> None:
        """Remove the group (its remaining charges, page cache, go to the parent)."""
        self._wait_until_empty()
        self.directory.rmdir()

    def _wait_until_empty(self) -> None:
        wait_for(
            lambda: not (self.directory / "cgroup.procs").read_text().strip(),
            30,
            "the measured processes to end",
        )


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
    group = TreeMemory.create()
    try:
        done, summed = bridgectl.run_measured(
            command,
            config,
            source,
            target,
            *args,
            timeout=timeout,
            # Before exec: all the bridge allocates is charged to the group.
            preexec=group.join if group else None,
            # The group lists its processes: no scan of /proc, which took 17% of a core from
            # the bridge (each VmHWM is the kernel's high-water mark: read every 0.1 s, it is
            # seen before its process ends).
            monitor=(
                (lambda pid: bridgectl.PeakRss(pid, 0.1, group.members))
                if group
                else bridgectl.PeakRss
            ),
        )
        return Measured(done, group.peak() if group else None, summed)
    finally:
        if group is not None:
            group.remove()
