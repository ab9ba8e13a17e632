"""Routing against real servers: two targets, each with its rules and its syntax.

`research` wants Implicit VR Little Endian (a legacy workstation), keeps JPEG Baseline and
reports as they are, and takes only CT and MR; `archive` takes everything unchanged but NM.
With delete_original on, an original goes only when every target that takes it holds its
verified copy: one that no target takes, or that one target failed, stays in the source.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from bridge.ledger.state import State
from bridge.outcomes import CONVERTED, FAILED, FORWARDED, SKIPPED, Delivery
from tests import bridgectl, hostile
from tests.conftest import MakeOrthanc
from tests.orthanc import EXPLICIT_VR_LITTLE_ENDIAN, OrthancServer, StoreSCP, discard
from tests.polling import wait_for

IMPLICIT = "1.2.840.10008.1.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
J2K = "1.2.840.10008.1.2.4.90"
J2K_LOSSY = "1.2.840.10008.1.2.4.91"

HOLD = {"when": {"label": ["hold"]}, "action": "skip"}  # Orthanc 1.12 and later only
RESEARCH_RULES = [
    {"when": {"transfer_syntax": [JPEG_BASELINE]}, "action": "forward"},
    {"when": {"modality": ["SR", "PR", "KO"]}, "action": "forward"},
    {"when": {"not": {"modality": ["CT", "MR"]}}, "action": "skip"},
]
ARCHIVE_RULES = [
    {"when": {"modality": "NM"}, "action": "skip"},
    {"action": "forward"},
]


def report() -> bytes:
    """A Basic Text SR: no pixels, to be forwarded as it is."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.11")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName = "ROUTING", "Routing^Test"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SR"
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def one(filename: str) -> bytes:
    """A new instance of a pydicom test file, in a study of its own (labels go on studies)."""
    ds = pydicom.dcmread(io.BytesIO(bridgectl.variants(filename, 1)[0]))
    ds.StudyInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return pydicom.dcmread(io.BytesIO(data)).pixel_array


def orthanc_version(server: OrthancServer) -> tuple[int, ...]:
    return tuple(int(part) for part in server.get_json("/system")["Version"].split(".")[:2])


def test_each_instance_goes_where_the_rules_say_in_the_syntax_they_say(
    make_orthanc: MakeOrthanc, tmp_path: Path
) -> None:
    # The legacy workstation: DCMTK's storescp accepting Implicit VR Little Endian only.
    storescp = StoreSCP(tmp_path / "storescp", options=["--implicit"])
    storescp.start()
    try:
        check_routing(make_orthanc, storescp, tmp_path)
    finally:
        discard(storescp)


def check_routing(make_orthanc: MakeOrthanc, storescp: StoreSCP, tmp_path: Path) -> None:
    source = make_orthanc("source")
    research = make_orthanc("research", modalities={"ws": storescp.modality})
    archive = make_orthanc("archive")
    labels = orthanc_version(source) >= (1, 12)
    files = {
        "mr_j2k": one("MR_small_jp2klossless.dcm"),
        "ot_jpeg": one("SC_rgb_jpeg_dcmtk.dcm"),
        "sr": report(),
        "nm_j2k": one("JPEG2000.dcm"),
        "broken_j2k": hostile.truncated_codestream(),
        "ct": one("CT_small.dcm"),
        "held": one("MR_small_jp2klossless.dcm"),
    }
    ids = {name: str(source.upload(data)["ID"]) for name, data in files.items()}
    if labels:  # Orthanc 1.12 and later: label the study of one instance
        study = source.get_json(f"/instances/{ids['held']}/study")["ID"]
        source.request("PUT", f"/studies/{study}/labels/hold").raise_for_status()

    config = bridgectl.write_config(tmp_path, source, research, delete_original=True)
    raw = yaml.safe_load(config.read_text())
    del raw["target"]
    hold = [HOLD] if labels else []
    raw["targets"] = [
        {
            "name": "research",
            "url": research.url,
            "syntax": IMPLICIT,
            "rules": hold + RESEARCH_RULES,
        },
        {"name": "archive", "url": archive.url, "rules": hold + ARCHIVE_RULES},
    ]
    config.write_text(yaml.safe_dump(raw))
    done = bridgectl.run("catch-up", config, source, research)
    assert done.returncode == 1, done.stdout + done.stderr  # the broken one failed
    assert "Traceback" not in done.stderr

    held_taken = not labels
    # research: converted into Implicit VR, forwarded as they came, or not taken.
    expect_research = {
        "mr_j2k": IMPLICIT,
        "ot_jpeg": JPEG_BASELINE,
        "sr": EXPLICIT_VR_LITTLE_ENDIAN,
        "ct": IMPLICIT,
    } | ({"held": IMPLICIT} if held_taken else {})
    expect_archive = {
        "mr_j2k": J2K,
        "ot_jpeg": JPEG_BASELINE,
        "sr": EXPLICIT_VR_LITTLE_ENDIAN,
        "broken_j2k": J2K_LOSSY,
        "ct": EXPLICIT_VR_LITTLE_ENDIAN,
    } | ({"held": J2K} if held_taken else {})
    for server, expected in ((research, expect_research), (archive, expect_archive)):
        assert sorted(server.instances()) == sorted(ids[name] for name in expected), server
        for name, syntax in expected.items():
            assert server.transfer_syntax(ids[name]) == syntax, (server, name)
    # Unchanged means byte for byte.
    for name in ("ot_jpeg", "sr"):
        assert research.file(ids[name]) == archive.file(ids[name]) == files[name]
    assert archive.file(ids["broken_j2k"]) == files["broken_j2k"]

    # The Implicit VR copies: every pixel as the reference decoder has it.
    for name in ("mr_j2k", "ct"):
        copy = research.file(ids[name])
        assert pydicom.dcmread(io.BytesIO(copy)).file_meta.TransferSyntaxUID == IMPLICIT
        assert np.array_equal(pixels(copy), pixels(files[name]))
    # ...and a workstation that reads only uncompressed syntaxes accepts them.
    stored = research.store_to_modality("ws", [ids["mr_j2k"], ids["ct"]])
    assert stored.status_code == 200, stored.text
    received = wait_for(
        lambda: storescp.received() if len(storescp.received()) == 2 else None, 30, "storescp"
    )
    for path in received:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == IMPLICIT
        original = files["mr_j2k"] if ds.Modality == "MR" else files["ct"]
        assert np.array_equal(ds.pixel_array, pixels(original))

    # Deleted only when every target that takes it holds it: kept, the one nobody takes and
    # the one research could not convert (archive holds it, yet the original stays).
    kept = {"nm_j2k", "broken_j2k"} | ({"held"} if labels else set())
    assert sorted(source.instances()) == sorted(ids[name] for name in kept)

    state = State(tmp_path / "state", read_only=True)
    try:
        assert state.deliveries(ids["nm_j2k"]) == [
            Delivery("archive", SKIPPED),
            Delivery("research", SKIPPED),
        ]
        broken = state.deliveries(ids["broken_j2k"])
        assert [(d.target, d.state) for d in broken] == [
            ("archive", FORWARDED),
            ("research", FAILED),
        ]
        assert state.get(ids["broken_j2k"]).state == FAILED  # type: ignore[union-attr]
        assert state.get(ids["nm_j2k"]).state == SKIPPED  # type: ignore[union-attr]
        assert [(d.target, d.state) for d in state.deliveries(ids["mr_j2k"])] == [
            ("archive", FORWARDED),
            ("research", CONVERTED),
        ]
    finally:
        state.close()

    status = bridgectl.run("status", config, source, research, "--json")
    found = json.loads(status.stdout)["targets"]
    assert set(found) == {"research", "archive"}
    assert found["research"]["counts"][CONVERTED] == 2 + held_taken
    assert found["archive"]["counts"][FORWARDED] == 5 + held_taken
    metrics = bridgectl.run("status", config, source, research)
    assert "at research:" in metrics.stdout and "at archive:" in metrics.stdout


def test_a_rule_file_with_a_typo_fails_at_start_up(
    make_orthanc: MakeOrthanc, tmp_path: Path
) -> None:
    source, target = make_orthanc("source"), make_orthanc("target")
    config = bridgectl.write_config(tmp_path, source, target)
    raw = yaml.safe_load(config.read_text())
    raw["target"]["rules"] = [{"when": {"modalty": ["CT"]}, "action": "skip"}]
    config.write_text(yaml.safe_dump(raw))
    done = bridgectl.run("catch-up", config, source, target)
    assert done.returncode == 2
    assert "target.rules[0].when.modalty: unknown condition key" in done.stderr
    assert "Traceback" not in done.stderr


def test_label_rules_need_an_orthanc_with_labels(make_orthanc: MakeOrthanc, tmp_path: Path) -> None:
    source, target = make_orthanc("source"), make_orthanc("target")
    config = bridgectl.write_config(tmp_path, source, target)
    raw = yaml.safe_load(config.read_text())
    raw["target"]["rules"] = [HOLD]
    config.write_text(yaml.safe_dump(raw))
    done = bridgectl.run("catch-up", config, source, target)
    assert "Traceback" not in done.stderr
    if orthanc_version(source) >= (1, 12):
        assert done.returncode == 0, done.stderr
    else:  # they would never match: refused at start-up
        assert done.returncode == 2
        assert "target: its rules test `label`, but the source runs Orthanc 1.10" in done.stderr
