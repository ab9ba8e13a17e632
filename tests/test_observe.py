"""What monitoring and people see of a running bridge, against real Orthanc servers: /metrics,
/livez and /readyz through a target outage, basic auth, JSON logs, progress on a terminal and
in a log, and the status page in a real browser."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests import bridgectl, hostile
from tests.browser import render_page
from tests.orthanc import EXPLICIT_VR_LITTLE_ENDIAN, OrthancServer, free_ports
from tests.polling import wait_for

J2K = "GDCMJ2K_TextGBR.dcm"  # JPEG 2000 lossless
J2K_UID = "1.2.840.10008.1.2.4.90"
H264 = "1.2.840.10008.1.2.4.102"


def scrape(base: str, auth: tuple[str, str] | None = None) -> dict[str, float]:
    """Every sample of /metrics, keyed `name{label="value",...}` with labels sorted."""
    response = requests.get(f"{base}/metrics", auth=auth, timeout=10)
    response.raise_for_status()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples named `name` having `labels`."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        value
        for key, value in samples.items()
        if key.split("{", 1)[0] == name and all(w in key for w in wanted)
    )


def status_code(url: str) -> int:
    return requests.get(url, timeout=10).status_code


def test_metrics_count_every_instance_and_health_follows_a_target_outage(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    first = bridgectl.upload_variants(source, J2K, 12)
    # Two that wait for a person: an undecodable file and a video.
    broken = str(source.upload(hostile.truncated_codestream())["ID"])
    video = str(source.upload(hostile.video())["ID"])
    config = bridgectl.write_config(tmp_path, source, target)
    base = bridgectl.http_url(config)
    bridge = bridgectl.start("run", config, source, target, tmp_path / "bridge.log")
    try:
        # Exactly N converted, nothing behind, every byte and stage counted.
        samples = wait_for(
            lambda: (
                m
                if total(m := scrape(base), "orthanc_bridge_instances_total", outcome="converted")
                == 12
                and m["orthanc_bridge_backlog_changes"] == 0
                else None
            ),
            90,
            "12 instances converted and no backlog in /metrics",
            interval=0.2,
            ignore=(requests.RequestException,),
        )
        assert total(samples, "orthanc_bridge_instances_total") == 14
        assert total(samples, "orthanc_bridge_instances_total", outcome="failed") == 1
        assert (
            samples[f'orthanc_bridge_instances_total{{outcome="unsupported",syntax="{H264}"}}'] == 1
        )
        assert samples['orthanc_bridge_ledger_instances{state="failed"}'] == 1
        assert samples['orthanc_bridge_ledger_instances{state="unsupported"}'] == 1
        assert (
            samples[f'orthanc_bridge_instances_total{{outcome="converted",syntax="{J2K_UID}"}}']
            == 12
        )
        assert samples["orthanc_bridge_cursor"] == source.changes_last()
        assert samples["orthanc_bridge_source_last_change"] == source.changes_last()
        assert samples['orthanc_bridge_stage_seconds_count{stage="download"}'] == 14
        assert samples['orthanc_bridge_stage_seconds_count{stage="decode"}'] == 14
        assert samples['orthanc_bridge_stage_seconds_count{stage="upload"}'] == 12
        assert samples['orthanc_bridge_bytes_total{direction="downloaded"}'] > 0
        assert (
            samples['orthanc_bridge_bytes_total{direction="uploaded"}']
            > samples['orthanc_bridge_bytes_total{direction="downloaded"}']
        )
        assert samples['orthanc_bridge_server_up{server="source"}'] == 1
        assert samples['orthanc_bridge_server_up{server="target"}'] == 1
        assert samples["orthanc_bridge_decoders"] == 2
        assert time.time() - samples["orthanc_bridge_last_poll_timestamp_seconds"] < 30
        assert status_code(f"{base}/livez") == 200
        assert status_code(f"{base}/readyz") == 200  # ready: waiting problems are no outage

        # The target goes away: not ready within seconds, and still alive.
        target.stop()
        second = bridgectl.upload_variants(source, J2K, 5)
        # (A Response is falsy when not ok: wait for its text.)
        down = wait_for(
            lambda: (
                r.text
                if (r := requests.get(f"{base}/readyz", timeout=10)).status_code == 503
                else None
            ),
            20,
            "/readyz 503 with the target stopped",
            interval=0.2,
        )
        assert "target Orthanc" in down
        assert scrape(base)['orthanc_bridge_server_up{server="target"}'] == 0
        assert status_code(f"{base}/livez") == 200
        page = requests.get(base + "/", timeout=10).text
        assert "waiting for the target Orthanc" in page

        # It comes back: ready again, and nothing lost.
        target.start()
        wait_for(lambda: status_code(f"{base}/readyz") == 200, 60, "/readyz 200 again")
        wait_for(
            lambda: (
                total(scrape(base), "orthanc_bridge_instances_total", outcome="converted") == 17
            ),
            90,
            "17 instances converted after the outage",
        )
        assert status_code(f"{base}/livez") == 200
        held = bridgectl.wait_for_count(target, 17)
        assert set(held) == first | second
        assert {target.transfer_syntax(i) for i in held} == {EXPLICIT_VR_LITTLE_ENDIAN}
        after = scrape(base)
        assert after['orthanc_bridge_retries_total{server="target"}'] > 0
        assert after["orthanc_bridge_backlog_changes"] == 0

        # The status page, rendered by Chromium, shows the counts and the plot.
        screenshot = Path(os.environ.get("BRIDGE_TEST_ARTEFACTS", tmp_path)) / "bridge-status.png"
        dom = render_page(base + "/", screenshot)
        assert 'id="count-converted"' in dom
        converted = dom.split('id="count-converted"', 1)[1].split(">", 1)[1].split("<", 1)[0]
        assert converted.strip() == "17"
        plot = dom.split('id="rate-plot"', 1)[1].split("</svg>", 1)[0]
        assert "<polyline" in plot or "<rect" in plot
        assert screenshot.stat().st_size > 10_000
        problems = dom.split('id="problems"', 1)[1]
        assert broken in problems and video in problems
        assert "unsupported" in problems and "failed" in problems
        assert "1.2.826.0.1.3680043" not in dom  # no DICOM UID of an instance on the page
        assert f"orthanc-bridge retry -c {config}" in dom
        assert 'data-health="attention"' in dom
    finally:
        bridgectl.kill(bridge)


def test_beyond_loopback_metrics_need_the_password_and_health_does_not(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    port = free_ports(1)[0]
    config = bridgectl.write_config(tmp_path, source, target, http_listen=f"0.0.0.0:{port}")
    refused = bridgectl.run("catch-up", config, source, target)
    assert refused.returncode == 2
    assert "BRIDGE_HTTP_USERNAME" in refused.stderr and "Traceback" not in refused.stderr

    creds = {"BRIDGE_HTTP_USERNAME": "prometheus", "BRIDGE_HTTP_PASSWORD": "s3cret-scrape"}
    bridge = subprocess.Popen(
        [sys.executable, "-m", "bridge", "run", "-c", str(config)],
        cwd=bridgectl.REPO,
        env=bridgectl.env(source, target) | creds,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: status_code(f"{base}/readyz") == 200,
            60,
            "/readyz 200 without credentials",
            interval=0.2,
            ignore=(requests.RequestException,),
        )
        assert status_code(f"{base}/livez") == 200
        assert status_code(f"{base}/metrics") == 401
        assert status_code(f"{base}/") == 401
        wrong = requests.get(f"{base}/metrics", auth=("prometheus", "guess"), timeout=10)
        assert wrong.status_code == 401
        assert "orthanc_bridge_cursor" in scrape(base, ("prometheus", "s3cret-scrape"))
        page = requests.get(f"{base}/", auth=("prometheus", "s3cret-scrape"), timeout=10)
        assert "s3cret-scrape" not in page.text
        # Nothing on the page may run a script or fetch anything.
        assert "default-src 'none'" in page.headers["Content-Security-Policy"]
        head = requests.head(f"{base}/livez", timeout=10)
        assert head.status_code == 200 and not head.content
    finally:
        bridgectl.kill(bridge)


def test_json_logs_carry_each_instance_outcome(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    uploaded = bridgectl.upload_variants(source, J2K, 3)
    config = bridgectl.write_config(tmp_path, source, target, log_format="json")
    result = bridgectl.run("catch-up", config, source, target)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert all({"timestamp", "level", "logger", "message"} <= set(line) for line in lines)
    events = {line["instance"]: line for line in lines if "instance" in line}
    assert set(events) == uploaded
    for event in events.values():
        assert event["outcome"] == "converted"
        assert event["source_syntax"] == J2K_UID
        assert isinstance(event["ms"], int) and event["ms"] >= 0


def test_progress_bar_on_a_terminal_and_lines_in_a_log(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    bridgectl.upload_variants(source, J2K, 6)
    last = source.changes_last()
    config = bridgectl.write_config(tmp_path, source, target, progress_interval=0.05)

    # On a terminal: tqdm's bar reaches changes last/last.
    leader, follower = pty.openpty()
    # A terminal of 30 lines by 120 columns, as a person's would be.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "bridge", "catch-up", "-c", str(config)],
        cwd=bridgectl.REPO,
        env=bridgectl.env(source, target),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        close_fds=True,
    )
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the command ended
                break
            if not chunk:
                break
            seen += chunk
        elif process.poll() is not None:
            break
    os.close(leader)
    assert process.wait(timeout=30) == 0, seen.decode(errors="replace")
    text = seen.decode(errors="replace")
    # At least `last`: Orthanc may log a stable series or study meanwhile, under load.
    totals = [int(done) for done, total in re.findall(r"(\d+)/(\d+) \[", text) if done == total]
    assert totals and max(totals) >= last and "changes/s" in text, text
    assert "100%" in text

    # Not on a terminal: progress lines in the log instead of a bar.
    bridgectl.upload_variants(source, J2K, 2)
    logged = source.changes_last() - last  # at least; Stable* changes may follow (StableAge)
    result = bridgectl.run("catch-up", config, source, target)
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if "bridge.watch.progress" in line]
    assert progress, result.stderr
    final = re.match(r"(\d+)/(\d+) changes \(100%\)", progress[-1].split("catch-up: ", 1)[1])
    assert final and final[1] == final[2] and int(final[1]) >= logged, progress[-1]
    assert "\r" not in result.stderr
