"""The systemd unit: valid for systemd itself, and the bridge speaks its notify protocol
(READY=1, the watchdog, STOPPING=1) as a real process between real Orthanc servers."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests import bridgectl
from tests.orthanc import INSTALL_HINT, OrthancServer

UNIT = bridgectl.REPO / "deploy" / "orthanc-bridge.service"


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, f"systemd-analyze not found: {INSTALL_HINT}"
    # The unit names the installed path; verify checks that its command exists, so point it
    # at this checkout's entry point.
    entry = Path(sys.executable).parent / "orthanc-bridge"
    assert entry.exists(), entry
    unit = tmp_path / "orthanc-bridge.service"
    unit.write_text(UNIT.read_text().replace("/opt/orthanc-bridge/bin/orthanc-bridge", str(entry)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    text = UNIT.read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text
    # SIGTERM to the bridge alone: it stops its decoding processes (tests/test_shutdown.py).
    assert "\nKillMode=mixed\n" in text


def test_run_tells_systemd_ready_pets_the_watchdog_and_says_stopping(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    address = tmp_path / "notify"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(address))
    systemd.settimeout(30)
    config = bridgectl.write_config(tmp_path, source, target)
    bridge = subprocess.Popen(
        [sys.executable, "-m", "bridge", "run", "-c", str(config)],
        cwd=bridgectl.REPO,
        env=bridgectl.env(source, target)
        | {"NOTIFY_SOCKET": str(address), "WATCHDOG_USEC": "400000"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert systemd.recv(4096).decode().startswith("READY=1\nSTATUS=")
        assert systemd.recv(4096).decode().startswith("WATCHDOG=1\nSTATUS=")
        bridge.send_signal(signal.SIGTERM)
        while (message := systemd.recv(4096).decode()) != "STOPPING=1":
            assert message.startswith("WATCHDOG=1"), message
        assert bridge.wait(timeout=30) == 0
    finally:
        bridgectl.kill(bridge)
        systemd.close()
