"""Stopping the bridge, as a supervisor does, at awkward moments: a real process between real
Orthanc servers (or none at all, for an outage)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from bridge.ledger.state import State
from tests import bridgectl
from tests.orthanc import OrthancServer, free_ports
from tests.polling import wait_for
from tests.transcode_support import j2k_multiframe


def _group(pgid: int) -> set[int]:
    """The process IDs of a process group (the bridge, its decoding parent and workers)."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            # The command name (field 2) may hold spaces: the fields after its ")" are fixed.
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[2]) == pgid:
            found.add(int(proc.name))
    return found


def test_sigterm_during_a_source_outage_exits_0_with_the_cursor_saved(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    """The README promises exit 0 with the cursor saved; `run` gave up instead (exit 4)."""
    config = bridgectl.write_config(tmp_path, source, target)
    text = config.read_text().replace(source.url, f"http://127.0.0.1:{free_ports(1)[0]}")
    config.write_text(text)  # nothing listens there: the source is down
    log = tmp_path / "bridge.log"
    bridge = bridgectl.start("run", config, source, target, log)
    try:
        # Retrying the feed, as `run` does for as long as a server is down.
        wait_for(lambda: "retry 2 in" in log.read_text(), 60, "the bridge to retry the source")
        bridge.send_signal(signal.SIGTERM)
        code = bridge.wait(timeout=30)
    finally:
        bridgectl.kill(bridge)
    output = log.read_text()
    assert code == 0, output
    assert "gave up" not in output and "stopped; cursor saved" in output, output
    state = State(tmp_path / "state", read_only=True)
    try:
        assert state.cursor() == 0
    finally:
        state.close()


def _ignores_sigterm(pid: int) -> bool:
    """Whether process `pid` ignores SIGTERM (SigIgn in /proc/PID/status); False once gone."""
    try:
        status = (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


def _alive(pid: int) -> bool:
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


@pytest.mark.parametrize("order", ["group", "decoders first"])
def test_a_stop_of_the_whole_group_forks_nothing_and_loses_no_decoder(
    source: OrthancServer, target: OrthancServer, tmp_path: Path, order: str
) -> None:
    """SIGTERM to every process of the bridge while instances decode, as systemd's default
    KillMode and `kill -TERM -PGID` do: at once, or the decoding processes first (systemd
    signals the processes of a unit one after the other). The decoding processes leave
    stopping to the bridge, which replaces none of them and exits 0."""
    for _ in range(8):
        source.upload(j2k_multiframe(24))  # a second or more of decoding each
    config = bridgectl.write_config(tmp_path, source, target, workers=2)
    log = tmp_path / "bridge.log"
    bridge = bridgectl.start("run", config, source, target, log)
    seen: set[int] = set()
    watching = threading.Event()

    def watch() -> None:
        while not watching.wait(0.01):
            seen.update(_group(bridge.pid))

    try:
        # The first one done: the decoding processes are busy with the next ones.
        wait_for(lambda: " converted " in log.read_text(), 120, "a first instance converted")
        before = _group(bridge.pid)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        if order == "group":
            os.killpg(bridge.pid, signal.SIGTERM)
        else:
            helpers = before - {bridge.pid}
            for pid in helpers:
                os.kill(pid, signal.SIGTERM)
            # Each has taken the signal: ended by it, or ignoring it.
            wait_for(
                lambda: all(not _alive(p) or _ignores_sigterm(p) for p in helpers),
                10,
                "the decoding processes to take SIGTERM",
            )
            bridge.send_signal(signal.SIGTERM)
        code = bridge.wait(timeout=60)
        watching.set()
        watcher.join()
    finally:
        bridgectl.kill(bridge)
    output = log.read_text()
    assert code == 0, output
    assert "SIGTERM received" in output, output
    assert "starting a new one" not in output, output
    assert "decoding process died" not in output, output
    assert seen <= before, f"processes started during the stop: {sorted(seen - before)}"
    assert len(set(target.instances())) < 8, "nothing was in flight when the signal came"


def test_a_start_that_fails_half_way_closes_what_it_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Dask scheduler that cannot be reached fails the pipeline after the state was opened:
    the state's lock is let go (before: held until the process ended)."""
    from bridge import cli
    from bridge.engine import cluster
    from bridge.engine.cluster import ClusterError

    def unreachable(config: object) -> None:
        raise ClusterError("cluster: cannot reach the scheduler tcp://127.0.0.1:1: refused")

    monkeypatch.setattr(cluster, "connect", unreachable)
    config = tmp_path / "bridge.yaml"
    config.write_text(
        "source: {url: 'http://127.0.0.1:1'}\n"
        "target: {url: 'http://127.0.0.1:2'}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "cluster: {scheduler: 'tcp://127.0.0.1:1'}\n"
    )
    assert cli.main(["catch-up", "-c", str(config)]) == cli.EXIT_SERVER
    assert "cannot reach the scheduler" in capsys.readouterr().err
    State(tmp_path / "state").close()  # not "another orthanc-bridge is already using"
