"""How many CPUs the bridge may use: the default number of decoding processes.

`os.cpu_count()` counts the host's cores. In a container started with `--cpus 2` (or under a
systemd `CPUQuota=`) on a 32-core host, 32 decoding processes would share two CPUs' worth of
time, each holding an instance in memory, for no gain. So the count is the process's CPU
affinity (`taskset`, `cpuset`), capped by the CPU quota of its cgroup or of any cgroup above it,
rounded up, as Go's automaxprocs and the JVM do.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(proc_cgroup: Path = PROC_CGROUP, cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may run on, capped by its cgroup CPU quota; at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota(proc_cgroup, cgroup_root)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_quota(proc_cgroup: Path, cgroup_root: Path) -> float | None:
    """The smallest CPU quota, in CPUs, over this process's cgroups; None when there is none."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        if line.count(":") < 2:
            continue
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:  # cgroup v2
            for mount in (cgroup_root, cgroup_root / "unified"):
                for directory in _upwards(mount, path):
                    quotas.extend(_v2_quota(directory))
        elif "cpu" in controllers.split(","):  # cgroup v1
            for mount in (cgroup_root / "cpu", cgroup_root / "cpu,cpuacct"):
                for directory in _upwards(mount, path):
                    quotas.extend(_v1_quota(directory))
    return min(quotas) if quotas else None


def _upwards(mount: Path, path: str) -> Iterator[Path]:
    """The cgroup's directory under `mount` and each one above it, as far as they exist.

    Inside a container the cgroup's own directory is often mounted as the root, and the path
    /proc gives (the host's) does not exist there: the root alone is then read.
    """
    parts = [part for part in path.split("/") if part]
    for depth in range(len(parts), -1, -1):
        directory = mount.joinpath(*parts[:depth])
        if directory.is_dir():
            yield directory


def _v2_quota(directory: Path) -> Iterator[float]:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return
    if quota != "max" and int(period) > 0:
        yield int(quota) / int(period)


def _v1_quota(directory: Path) -> Iterator[float]:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return
    if quota > 0 and period > 0:
        yield quota / period
