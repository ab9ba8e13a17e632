"""The bridge end to end, against two real Orthanc servers, run as users run it."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path

import pydicom
import pytest

from bridge.ledger.state import State
from tests import bridgectl
from tests.conftest import MakeOrthanc
from tests.orthanc import EXPLICIT_VR_LITTLE_ENDIAN, OrthancServer, StoreSCP, pydicom_test_files
from tests.polling import wait_for
from tests.transcode_support import (
    dump_without_meta,
    reference_pixels,
    run,
    uid_text,
    with_broken_signature,
    with_curves_and_overlay,
    with_every_ambiguous_vr,
)

# One file per transfer syntax, chosen so that no two share an Orthanc ID (several of pydicom's
# files are the same instance in different syntaxes). name -> lossless?
SAMPLES = {
    "GDCMJ2K_TextGBR.dcm": True,  # JPEG 2000 lossless, 8-bit
    "693_J2KI.dcm": False,  # JPEG 2000, 512x512 16-bit
    "MR_small_jpeg_ls_lossless.dcm": True,  # JPEG-LS lossless
    "JPGExtended.dcm": False,  # JPEG extended 12-bit
    "rtdose_rle.dcm": True,  # RLE, 32-bit, 15 frames
    "SC_rgb_jpeg_gdcm.dcm": True,  # JPEG lossless SV1, RGB
    "SC_rgb_jpeg_dcmtk.dcm": False,  # JPEG baseline, YBR
    "examples_ybr_color.dcm": False,  # JPEG baseline, 30 frames
    "image_dfl.dcm": True,  # Deflated
    "ExplVR_BigEnd.dcm": True,  # Explicit VR Big Endian
    "CT_small.dcm": True,  # already Explicit VR Little Endian: forwarded as is
}
UIDS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID")
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"  # what Orthanc's own DCMTK can compress to


def upload_samples(source: OrthancServer) -> dict[str, str]:
    """Upload every sample; map Orthanc ID -> file name."""
    return {str(source.upload(pydicom_test_files() / name)["ID"]): name for name in SAMPLES}


def reference_tool(path: Path) -> str:
    """The DCMTK or GDCM command that decodes `path`, independently of the bridge's decoders."""
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if syntax.startswith("1.2.840.10008.1.2.4.9"):  # JPEG 2000: DCMTK has no decoder
        return "gdcmconv"
    if syntax.startswith("1.2.840.10008.1.2.4.8"):
        return "dcmdjpls"
    if syntax.startswith("1.2.840.10008.1.2.4."):
        return "dcmdjpeg"
    return "dcmdrle" if syntax == "1.2.840.10008.1.2.5" else "dcmconv"


def test_catch_up_converts_every_syntax_keeps_uids_and_pixels(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    uploaded = upload_samples(source)
    config = bridgectl.write_config(tmp_path, source, target)

    result = bridgectl.run("catch-up", config, source, target)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(SAMPLES)} converted in" in result.stdout
    assert sorted(target.instances()) == sorted(uploaded)
    for iid, name in uploaded.items():
        assert target.transfer_syntax(iid) == EXPLICIT_VR_LITTLE_ENDIAN, name
        original = pydicom.dcmread(pydicom_test_files() / name)
        converted = pydicom.dcmread(io.BytesIO(target.file(iid)))
        for uid in UIDS:
            assert uid_text(converted, uid) == uid_text(original, uid), (name, uid)
        sop = uid_text(original, "SOPInstanceUID")
        assert converted.file_meta.MediaStorageSOPInstanceUID == sop, name
        if SAMPLES[name]:
            path = pydicom_test_files() / name
            expected = bytes(reference_pixels(reference_tool(path), path, tmp_path).PixelData)
            assert bytes(converted.PixelData) == expected, f"{name}: pixels differ"

    # A second catch-up right after the first finds nothing to do.
    cursor = source.changes_last()
    again = bridgectl.run("catch-up", config, source, target)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("catch-up: nothing"), again.stdout
    status = bridgectl.run("status", config, source, target, "--json")
    report = json.loads(status.stdout)
    # Orthanc keeps appending Stable* rows (StableAge); the cursor follows them, never less.
    assert report["cursor"] >= cursor
    assert report["counts"] == {"converted": len(SAMPLES)}


def test_implicit_vr_with_curves_overlays_and_open_vrs_arrives_as_dcmconv_writes_it(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    """Retired curve data and every "OB or OW"/"US or SS" element: converted, as DCMTK would."""
    sources = {}
    for name, data in (("curves", with_curves_and_overlay()), ("every", with_every_ambiguous_vr())):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data)
        sources[str(source.upload(path)["ID"])] = path
    config = bridgectl.write_config(tmp_path, source, target)

    result = bridgectl.run("catch-up", config, source, target)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(sources)} converted in" in result.stdout
    for iid, path in sources.items():
        assert target.transfer_syntax(iid) == EXPLICIT_VR_LITTLE_ENDIAN, path.name
        ours = tmp_path / f"{path.stem}-bridge.dcm"
        ours.write_bytes(target.file(iid))
        theirs = tmp_path / f"{path.stem}-dcmconv.dcm"
        run("dcmconv", "+te", str(path), str(theirs))
        assert dump_without_meta(ours) == dump_without_meta(theirs), path.name


def test_converted_instances_reach_an_uncompressed_only_workstation(
    source: OrthancServer, tmp_path: Path, storescp: StoreSCP, make_orthanc: MakeOrthanc
) -> None:
    """The problem solved: Orthanc B can C-STORE what Orthanc A could not."""
    target = make_orthanc("target-ws", modalities={"ws": storescp.modality})
    uploaded = upload_samples(source)
    config = bridgectl.write_config(tmp_path, source, target)
    assert bridgectl.run("catch-up", config, source, target).returncode == 0

    # rtdose_rle.dcm's SOP Class UID ends with a NUL byte: storescp refuses that SOP class
    # whatever the transfer syntax, so it is left out here.
    sendable = [iid for iid, name in uploaded.items() if name != "rtdose_rle.dcm"]
    for iid in sendable:
        answer = target.store_to_modality("ws", [iid])
        assert answer.status_code == 200, (uploaded[iid], answer.text)
    received = storescp.received()
    assert len(received) == len(sendable)
    for path in received:
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN


def test_already_stored_compressed_copy_is_replaced(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    """Orthanc answers AlreadyStored and keeps its old copy: the bridge must notice."""
    path = pydicom_test_files() / "693_J2KI.dcm"
    iid = str(source.upload(path)["ID"])
    target.upload(path)
    assert target.transfer_syntax(iid) != EXPLICIT_VR_LITTLE_ENDIAN
    config = bridgectl.write_config(tmp_path, source, target)
    result = bridgectl.run("catch-up", config, source, target)
    assert result.returncode == 0, result.stderr
    assert target.transfer_syntax(iid) == EXPLICIT_VR_LITTLE_ENDIAN


@pytest.mark.parametrize("delete_original", [False, True])
def test_a_target_that_recompresses_on_arrival_is_caught(
    source: OrthancServer, make_orthanc: MakeOrthanc, tmp_path: Path, delete_original: bool
) -> None:
    """B answers Success but stores JPEG Lossless (IngestTranscoding): nothing is deleted."""
    ids = bridgectl.upload_variants(source, "693_J2KI.dcm", 4)
    target = make_orthanc("recompressing", extra_config={"IngestTranscoding": JPEG_LOSSLESS})
    config = bridgectl.write_config(tmp_path, source, target, delete_original=delete_original)

    result = bridgectl.run("catch-up", config, source, target)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for iid in ids:
        assert f"failed {iid}" in result.stdout
        assert target.transfer_syntax(iid) == JPEG_LOSSLESS
    assert f"holds it as {JPEG_LOSSLESS}" in result.stdout
    assert set(source.instances()) == ids


def test_delete_mode_deletes_only_verified_originals(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    good = upload_samples(source)
    broken = truncated_j2k()
    bad_id = str(source.upload(broken)["ID"])
    config = bridgectl.write_config(tmp_path, source, target, delete_original=True)

    result = bridgectl.run("catch-up", config, source, target)
    assert result.returncode == 1, result.stdout
    assert f"failed {bad_id}" in result.stdout
    assert "Traceback" not in result.stderr
    # Everything converted is gone from the source, but for CT_small (already uncompressed,
    # also deleted) nothing else remains except the file that could not be converted.
    assert source.instances() == [bad_id]
    assert sorted(target.instances()) == sorted(good)
    status = bridgectl.run("status", config, source, target)
    assert bad_id in status.stdout and "failed" in status.stdout


def test_an_unexpected_failure_is_one_line_in_ledger_status_and_log(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    """pydicom's message carries a traceback; the bridge records its type and first line."""
    path = tmp_path / "broken.dcm"
    path.write_bytes(with_broken_signature())
    iid = str(source.upload(path)["ID"])
    config = bridgectl.write_config(tmp_path, source, target, log_format="json")

    result = bridgectl.run("catch-up", config, source, target)
    assert result.returncode == 1, result.stdout + result.stderr
    state = State(config.parent / "state", read_only=True)
    try:
        entry = state.get(iid)
    finally:
        state.close()
    assert entry is not None and entry.error is not None
    reason = entry.error
    assert reason.startswith("BytesLengthException: With tag (FFFA,FFFA)"), reason
    assert "(0018,9087)" in reason and "[SOP Instance UID" in reason, reason
    status = bridgectl.run("status", config, source, target)
    as_json = bridgectl.run("status", config, source, target, "--json")
    problems = json.loads(as_json.stdout)["problems"]
    assert [p["reason"] for p in problems] == [reason]
    assert f"failed {iid} (1.2.840.10008.1.2): {reason}" in status.stdout
    for output in (result.stdout, result.stderr, status.stdout, as_json.stdout):
        assert "Traceback" not in output and 'File "' not in output
    logged = [json.loads(line) for line in result.stderr.splitlines() if iid in line]
    assert any(reason in line["message"] for line in logged), result.stderr
    assert "\n" not in reason


def truncated_j2k() -> bytes:
    """A real J2K file whose codestream was cut short: Orthanc stores it, nobody can decode it."""
    ds = pydicom.dcmread(pydicom_test_files() / "693_J2KI.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    frame = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)
    data = next(frame)
    ds.PixelData = pydicom.encaps.encapsulate([data[: len(data) // 3]])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_resume_after_kill_loses_nothing_and_redoes_little(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    copies = bridgectl.upload_variants(source, "693_J2KI.dcm", 60)
    config = bridgectl.write_config(tmp_path, source, target)
    log = tmp_path / "bridge.log"

    first = bridgectl.start("catch-up", config, source, target, log)
    wait_for(lambda: len(target.instances()) >= 15, 60, "15 converted instances")
    bridgectl.kill(first, signal.SIGKILL)
    assert len(target.instances()) < len(copies), "killed too late to prove anything"

    result = bridgectl.run("catch-up", config, source, target)
    assert result.returncode == 0, log.read_text() + result.stderr
    ids = target.instances()
    assert sorted(ids) == sorted(source.instances())
    assert all(target.transfer_syntax(i) == EXPLICIT_VR_LITTLE_ENDIAN for i in ids)
    # Only what was in flight at the kill is converted twice.
    redone = result.stdout.split(" converted")[0].rsplit(" ", 1)[-1]
    assert int(redone) <= len(copies) - 15 + 2 * 3 + 2, result.stdout


def test_daemon_follows_new_instances_and_stops_cleanly_on_sigterm(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    config = bridgectl.write_config(tmp_path, source, target)
    log = tmp_path / "bridge.log"
    daemon = bridgectl.start("run", config, source, target, log)
    try:
        bridgectl.upload_variants(source, "MR_small_jp2klossless.dcm", 5)
        bridgectl.wait_for_count(target, 5)
        bridgectl.upload_variants(source, "SC_rgb_rle.dcm", 5)
        bridgectl.wait_for_count(target, 10)
        # Work in flight at the signal is finished or abandoned; either way it exits 0.
        bridgectl.upload_variants(source, "693_J2KI.dcm", 10)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=10) == 0, log.read_text()
    finally:
        bridgectl.kill(daemon)
    assert "Traceback" not in log.read_text()
    result = bridgectl.run("catch-up", config, source, target)
    assert result.returncode == 0, result.stderr
    assert sorted(target.instances()) == sorted(source.instances())


@pytest.mark.parametrize("command", ["run", "catch-up"])
def test_refused_credentials_stop_the_bridge_and_fail_nothing(
    source: OrthancServer, target: OrthancServer, tmp_path: Path, command: str
) -> None:
    """A wrong password is a configuration error: nothing is recorded as failed or deleted."""
    iid = str(source.upload(pydicom_test_files() / "693_J2KI.dcm")["ID"])
    config = bridgectl.write_config(tmp_path, source, target, delete_original=True)
    wrong = {"BRIDGE_TARGET_PASSWORD": "not-the-password"}
    result = bridgectl.run(command, config, source, target, extra_env=wrong)
    assert result.returncode == (4 if command == "run" else 1), result.stdout + result.stderr
    assert "HTTP 401, check target.username and password" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert source.instances() == [iid]
    assert (
        json.loads(bridgectl.run("status", config, source, target, "--json").stdout)["counts"] == {}
    )
    # With the right password the same instance goes through.
    assert bridgectl.run("catch-up", config, source, target).returncode == 0
    assert target.instances() == [iid] and source.instances() == []


@pytest.mark.parametrize(
    ("setup", "message", "code"),
    [
        ("config", "workers: expected int", 2),
        ("down", "cannot reach", 1),
    ],
)
def test_expected_failures_are_one_clear_line(
    source: OrthancServer,
    target: OrthancServer,
    tmp_path: Path,
    setup: str,
    message: str,
    code: int,
) -> None:
    if setup == "config":
        config = bridgectl.write_config(tmp_path, source, target, workers="many")
    else:
        config = bridgectl.write_config(tmp_path, source, target, catch_up_retry_seconds=1)
        source.stop()
    result = bridgectl.run("catch-up", config, source, target)
    assert result.returncode == code, result.stdout + result.stderr
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
