"""The default number of decoding processes: the CPUs the bridge may use, quotas included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bridge.decoding.cpus import cgroup_cpu_quota, usable_cpus

REPO = Path(__file__).resolve().parent.parent


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _proc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cgroup"
    path.write_text(text)
    return path


def test_a_container_quota_caps_the_count_rounded_up(tmp_path: Path) -> None:
    # cgroup v2 inside a container: the process's own cgroup is the mount's root.
    root = tmp_path / "fs"
    _tree(root, {"cpu.max": "150000 100000\n"})
    proc = _proc(tmp_path, "0::/\n")
    assert cgroup_cpu_quota(proc, root) == 1.5
    assert usable_cpus(proc, root) == min(2, len(os.sched_getaffinity(0)))


def test_no_quota_leaves_the_cores_the_process_may_run_on(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    _tree(root, {"system.slice/bridge.service/cpu.max": "max 100000\n"})
    proc = _proc(tmp_path, "0::/system.slice/bridge.service\n")
    assert cgroup_cpu_quota(proc, root) is None
    assert usable_cpus(proc, root) == len(os.sched_getaffinity(0))


def test_the_smallest_quota_above_the_process_wins(tmp_path: Path) -> None:
    # systemd: CPUQuota=100% on the slice, 300% on the service inside it.
    root = tmp_path / "fs"
    _tree(
        root,
        {
            "research.slice/cpu.max": "100000 100000\n",
            "research.slice/bridge.service/cpu.max": "300000 100000\n",
        },
    )
    proc = _proc(tmp_path, "0::/research.slice/bridge.service\n")
    assert cgroup_cpu_quota(proc, root) == 1.0
    assert usable_cpus(proc, root) == 1


def test_cgroup_v1_quotas_are_read(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    _tree(
        root,
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
            "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        },
    )
    proc = _proc(tmp_path, "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    assert cgroup_cpu_quota(proc, root) == 2.5


def test_a_path_missing_from_the_mount_reads_its_root(tmp_path: Path) -> None:
    # A container without its own cgroup namespace sees the host's path in /proc, while its
    # own cgroup is mounted as the root.
    root = tmp_path / "fs"
    _tree(root, {"cpu.max": "200000 100000\n"})
    proc = _proc(tmp_path, "0::/docker/0123abcd\n")
    assert cgroup_cpu_quota(proc, root) == 2.0


def test_unreadable_or_odd_files_mean_no_quota(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    _tree(root, {"cpu.max": "garbage\n"})
    assert cgroup_cpu_quota(_proc(tmp_path, "0::/\nnonsense\n"), root) is None
    assert cgroup_cpu_quota(tmp_path / "absent", root) is None
    assert usable_cpus(tmp_path / "absent", root) == len(os.sched_getaffinity(0))


def test_this_machine_gives_at_least_one() -> None:
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)


def test_the_cores_the_process_may_run_on_are_counted(tmp_path: Path) -> None:
    # As under `taskset -c 0`: one core allowed of the machine's.
    script = (
        "import os\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from bridge.decoding.cpus import usable_cpus\n"
        "assert usable_cpus() == 1, usable_cpus()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=60)
