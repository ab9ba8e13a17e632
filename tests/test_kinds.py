"""Targets of every kind, end to end: the bridge's commands against real peers.

An Orthanc with its DICOMweb plugin is the DICOMweb archive (STOW-RS, WADO-RS, QIDO-RS);
DCMTK's storescp and an Orthanc's DICOM port are the DICOM nodes, Orthanc also the Storage
Commitment SCP. Each copy is compared with the original's pixels as pydicom decodes them.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from tests import bridgectl
from tests.conftest import MakeOrthanc
from tests.orthanc import EXPLICIT_VR_LITTLE_ENDIAN, OrthancServer, StoreSCP, free_ports
from tests.polling import wait_for

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"

J2K = "GDCMJ2K_TextGBR.dcm"  # JPEG 2000 lossless: what Orthanc 1.10 cannot decode


def _pixels(data: bytes) -> np.ndarray[Any, Any]:
    return np.asarray(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).pixel_array)


def _originals(source: OrthancServer, count: int) -> dict[str, np.ndarray[Any, Any]]:
    """Upload `count` new JPEG 2000 instances; their pixels by SOP Instance UID."""
    pixels = {}
    for data in bridgectl.variants(J2K, count):
        source.upload(data)
        pixels[str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).SOPInstanceUID)] = _pixels(
            data
        )
    return pixels


def _held(server: OrthancServer) -> dict[str, bytes]:
    """Every instance an Orthanc holds, by SOP Instance UID."""
    files = [server.file(iid) for iid in server.instances()]
    return {str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(f)).SOPInstanceUID): f for f in files}


def _assert_copies(held: dict[str, bytes], originals: dict[str, np.ndarray[Any, Any]]) -> None:
    assert set(held) == set(originals)
    for uid, data in held.items():
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        assert ds.file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN
        assert np.array_equal(_pixels(data), originals[uid]), uid


def test_catch_up_to_a_dicomweb_archive_deletes_only_verified_originals(
    source: OrthancServer, make_orthanc: MakeOrthanc, tmp_path: Path
) -> None:
    archive = make_orthanc("archive", dicomweb=True)
    originals = _originals(source, 6)
    config = bridgectl.write_config(
        tmp_path,
        source,
        archive,
        delete_original=True,
        targets=[{"name": "archive", "kind": "dicomweb", "url": archive.dicomweb_url}],
    )
    done = bridgectl.run("catch-up", config, source, archive)
    assert done.returncode == 0, done.stderr
    _assert_copies(_held(archive), originals)
    assert source.instances() == []
    status = bridgectl.run("status", config, source, archive, "--json")
    report = json.loads(status.stdout)
    assert report["targets"]["archive"]["counts"] == {"converted": 6}
    assert "error" not in report["targets"]["archive"]


def _received(scp: StoreSCP) -> dict[str, bytes]:
    """Every file storescp wrote, by SOP Instance UID."""
    files = [path.read_bytes() for path in scp.output_dir.iterdir() if path.is_file()]
    return {str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(f)).SOPInstanceUID): f for f in files}


@pytest.mark.parametrize(
    ("options", "syntax"),
    [([], EXPLICIT_VR_LITTLE_ENDIAN), (["--implicit"], IMPLICIT_VR_LITTLE_ENDIAN)],
    ids=["storescp", "storescp-implicit"],
)
def test_catch_up_to_a_dicom_node_in_the_syntax_it_accepts(
    source: OrthancServer,
    target: OrthancServer,
    make_storescp: Callable[..., StoreSCP],
    tmp_path: Path,
    options: list[str],
    syntax: str,
) -> None:
    """storescp takes Explicit VR; with --implicit only Implicit VR, which the bridge then sends."""
    scp = make_storescp(options=options)
    originals = _originals(source, 4)
    node = {"kind": "dicom", "host": "127.0.0.1", "port": scp.port, "ae_title": scp.aet}
    config = bridgectl.write_config(tmp_path, source, target, targets=[{"name": "ws", **node}])
    done = bridgectl.run("catch-up", config, source, target)
    assert done.returncode == 0, done.stderr
    received = _received(scp)
    assert set(received) == set(originals)
    for uid, data in received.items():
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        assert ds.file_meta.TransferSyntaxUID == syntax
        assert np.array_equal(_pixels(data), originals[uid]), uid
    assert len(source.instances()) == 4  # no delete_original: nothing deleted


def test_delete_original_with_a_node_verified_by_status_is_refused(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    node = {"kind": "dicom", "host": "127.0.0.1", "port": 104, "ae_title": "WS"}
    config = bridgectl.write_config(
        tmp_path, source, target, delete_original=True, targets=[{"name": "ws", **node}]
    )
    done = bridgectl.run("catch-up", config, source, target)
    assert done.returncode == 2, done.stderr
    assert "delete_original: ws is a dicom target verified by status" in done.stderr
    assert "Traceback" not in done.stderr


def test_three_kinds_at_once_with_delete_original_survive_kill_9(
    source: OrthancServer, make_orthanc: MakeOrthanc, tmp_path: Path
) -> None:
    """An Orthanc, a DICOMweb archive and a DICOM node verified by Storage Commitment take
    every instance; the bridge is killed (-9) while it works and started again. Nothing is
    lost, every copy is pixel-equal, and no original is ever gone from the source while one
    of the three lacks its copy (sampled all along: the source first, then the targets)."""
    listen = free_ports(1)[0]
    rest = make_orthanc("rest")
    archive = make_orthanc("archive", dicomweb=True)
    node = make_orthanc("node", modalities={"bridge": ["ORTHANC-BRIDGE", "127.0.0.1", listen]})
    count = 24
    originals = _originals(source, count)
    targets: list[dict[str, object]] = [
        {"name": "rest", "url": rest.url},
        {"name": "archive", "kind": "dicomweb", "url": archive.dicomweb_url},
        {
            "name": "node",
            "kind": "dicom",
            "host": "127.0.0.1",
            "port": node.dicom_port,
            "ae_title": node.aet,
            "verify": "commitment",
            "commitment_port": listen,
        },
    ]
    config = bridgectl.write_config(tmp_path, source, rest, delete_original=True, targets=targets)
    takers = (rest, archive, node)
    early: list[str] = []
    samples: list[float] = []  # one per full sample: the watcher must have watched
    watching = threading.Event()

    def watch() -> None:
        uids = set(originals)
        while not watching.is_set():
            present = set(_held_uids(source))
            held = [set(_held_uids(server)) for server in takers]
            early.extend(uid for uid in uids - present if not all(uid in h for h in held))
            samples.append(time.monotonic())
            watching.wait(0.05)  # a sample every 50 ms, leaving the cores to the bridge

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    log = tmp_path / "bridge.log"
    try:
        daemon = bridgectl.start("run", config, source, rest, log)
        try:
            wait_for(lambda: len(node.instances()) >= 3, 120, "three copies in the node")
        finally:
            bridgectl.kill(daemon, signal.SIGKILL)
        daemon = bridgectl.start("run", config, source, rest, log)
        try:
            wait_for(lambda: not source.instances(), 180, "every original deleted")
        finally:
            bridgectl.kill(daemon, signal.SIGTERM)
    finally:
        watching.set()
        watcher.join(timeout=30)
    assert len(samples) > 10, "the watcher stopped sampling (a request failed)"
    assert early == [], log.read_text()[-3000:]
    for server in takers:
        _assert_copies(_held(server), originals)


def _held_uids(server: OrthancServer) -> list[str]:
    """The SOP Instance UIDs an Orthanc holds, from its index (no file read)."""
    found = server.request(
        "POST", "/tools/find", json={"Level": "Instance", "Query": {}, "Expand": True}
    )
    return [str(item["MainDicomTags"]["SOPInstanceUID"]) for item in found.json()]


def test_reconcile_lists_a_dicomweb_archive_and_leaves_a_dicom_node_out(
    source: OrthancServer,
    make_orthanc: MakeOrthanc,
    make_storescp: Callable[..., StoreSCP],
    tmp_path: Path,
) -> None:
    archive = make_orthanc("archive", dicomweb=True)
    scp = make_storescp()
    originals = _originals(source, 3)
    targets: list[dict[str, object]] = [
        {"name": "archive", "kind": "dicomweb", "url": archive.dicomweb_url},
        {"name": "ws", "kind": "dicom", "host": "127.0.0.1", "port": scp.port, "ae_title": scp.aet},
    ]
    config = bridgectl.write_config(tmp_path, source, archive, targets=targets)
    assert bridgectl.run("catch-up", config, source, archive).returncode == 0
    lost = archive.instances()[0]
    archive.delete(lost)
    done = bridgectl.run("reconcile", config, source, archive)
    assert done.returncode == 0, done.stderr
    assert "reconcile cannot list the DICOM node ws" in done.stderr
    assert "the targets lack 1 of the source's instances" in done.stderr
    _assert_copies(_held(archive), originals)
