"""The test helpers work against real servers, and the problem the bridge solves is real."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pydicom
import pytest
import requests

from tests import orthanc
from tests.conftest import MakeOrthanc
from tests.orthanc import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    JPEG_2000_LOSSLESS,
    PYDICOM_SAMPLES,
    TARGET_USERS,
    OrthancPair,
    OrthancServer,
    ProcessFailed,
    StoreSCP,
    discard,
)
from tests.polling import wait_for


def test_upload_shows_in_instances_and_changes(
    orthanc_pair: OrthancPair, pydicom_samples: dict[str, Path]
) -> None:
    source, target = orthanc_pair.source, orthanc_pair.target
    before = source.changes_last()

    answer = source.upload(pydicom_samples["j2k_lossless"])

    assert answer["Status"] == "Success"
    assert source.instances() == [answer["ID"]]
    assert source.transfer_syntax(answer["ID"]) == JPEG_2000_LOSSLESS
    assert source.file(answer["ID"]) == pydicom_samples["j2k_lossless"].read_bytes()
    new_instances = [
        change["ID"]
        for change in source.changes(since=before)["Changes"]
        if change["ChangeType"] == "NewInstance"
    ]
    assert new_instances == [answer["ID"]]
    assert source.changes_last() > before
    assert target.instances() == []


def test_authentication_is_enforced(source: OrthancServer) -> None:
    assert requests.get(f"{source.url}/system", timeout=5).status_code == 401
    assert source.auth is not None
    wrong = (source.auth[0], "not-the-password")
    assert requests.get(f"{source.url}/system", auth=wrong, timeout=5).status_code == 401


def test_orthanc_accepts_every_sample(
    source: OrthancServer, pydicom_samples: dict[str, Path]
) -> None:
    for key, path in pydicom_samples.items():
        answer = source.upload(path)
        assert answer["Status"] == "Success", key
        assert source.transfer_syntax(answer["ID"]) == PYDICOM_SAMPLES[key].transfer_syntax, key
        # Some samples share their UIDs, hence their Orthanc ID: make room for the next one.
        source.delete(answer["ID"])
    assert source.instances() == []


def test_restart_keeps_ports_and_data(
    target: OrthancServer, pydicom_samples: dict[str, Path]
) -> None:
    answer = target.upload(pydicom_samples["explicit_le"])
    url, last, first_pid = target.url, target.changes_last(), target.pid

    target.restart()

    assert target.pid != first_pid
    assert target.url == url
    assert target.instances() == [answer["ID"]]
    assert target.file(answer["ID"]) == pydicom_samples["explicit_le"].read_bytes()
    # The log survives too; a restart may add Stable* rows, but never a second NewInstance.
    later = target.changes(since=last)["Changes"]
    assert [c for c in later if c["ChangeType"] == "NewInstance"] == []


def test_stopped_server_refuses_then_comes_back(target: OrthancServer) -> None:
    assert target.stop() == 0  # SIGTERM is a clean shutdown for Orthanc
    with pytest.raises(requests.ConnectionError):
        target.instances()
    target.start()
    assert target.instances() == []


def test_orthanc_cannot_send_jpeg2000_to_the_workstation(
    make_orthanc: MakeOrthanc, storescp: StoreSCP, pydicom_samples: dict[str, Path]
) -> None:
    """The problem itself: Orthanc cannot transcode JPEG 2000 for an uncompressed SCP.

    Debian 13's Orthanc 1.12 cannot either (its DCMTK has no JPEG 2000 codec; only the
    orthanc-gdcm plugin would add one): only the wording of the error changed.
    """
    source = make_orthanc("source", modalities={"ws": storescp.modality})
    instance_id = source.upload(pydicom_samples["j2k_lossless"])["ID"]

    response = source.store_to_modality("ws", [instance_id])

    assert response.status_code == 500
    error = response.json()
    targets = f"to one of [ {EXPLICIT_VR_LITTLE_ENDIAN} 1.2.840.10008.1.2.2 ]"
    if orthanc.orthanc_version() < (1, 12):
        assert error["OrthancError"] == "Not implemented yet"
        assert error["Details"] == f"Cannot transcode from {JPEG_2000_LOSSLESS} {targets}"
    else:
        # 1.12 reports it as an internal error and names the SOP class (MR Image Storage).
        assert error["OrthancError"] == "Internal error"
        assert error["Details"] == (
            "Cannot transcode instance of SOPClassUID 1.2.840.10008.5.1.4.1.1.4 "
            f"from {JPEG_2000_LOSSLESS} {targets}"
        )
    # The store is synchronous: had anything been sent, it would be on disk by now.
    assert storescp.received() == []


def test_uncompressed_instance_reaches_the_workstation(
    make_orthanc: MakeOrthanc, storescp: StoreSCP, pydicom_samples: dict[str, Path]
) -> None:
    target = make_orthanc("target", users=TARGET_USERS, modalities={"ws": storescp.modality})
    instance_id = target.upload(pydicom_samples["explicit_le"])["ID"]

    response = target.store_to_modality("ws", [instance_id])

    assert response.status_code == 200, response.text
    assert response.json()["FailedInstancesCount"] == 0
    (received,) = wait_for(storescp.received, 10, "the file at storescp")
    sent = pydicom.dcmread(pydicom_samples["explicit_le"])
    got = pydicom.dcmread(received)
    assert got.SOPInstanceUID == sent.SOPInstanceUID
    assert got.file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN
    assert got.PixelData == sent.PixelData


def test_start_failure_reports_the_log(make_orthanc: MakeOrthanc, tmp_path: Path) -> None:
    first = make_orthanc("first")
    clash = OrthancServer("clash", tmp_path / "clash", extra_config={"HttpPort": first.http_port})
    with pytest.raises(ProcessFailed, match="Orthanc clash exited"):
        clash.start()
    clash.stop()


@pytest.mark.orthanc
def test_discard_reports_a_server_that_died_during_the_test(tmp_path: Path) -> None:
    server = OrthancServer("doomed", tmp_path / "doomed")
    server.start()
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)
    wait_for(lambda: not server.running, 5, "Orthanc to die")
    with pytest.raises(ProcessFailed, match="exited by itself"):
        discard(server)


def test_missing_orthanc_fails_instead_of_skipping(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(orthanc, "ORTHANC_BINARY", tmp_path / "no-such-Orthanc")
    with pytest.raises(FileNotFoundError, match=re.escape("scripts/setup.sh")):
        OrthancServer("missing", tmp_path / "missing").start()


def test_wait_for_gives_up_at_the_deadline() -> None:
    with pytest.raises(TimeoutError, match="the impossible"):
        wait_for(lambda: False, 0.2, "the impossible")
    assert wait_for(lambda: 42, 1, "an answer") == 42
