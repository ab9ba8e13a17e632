"""Targets of every kind, end to end: the bridge's commands against real peers.

An Orthanc with its DICOMweb plugin is the DICOMweb archive (STOW-RS, WADO-RS, QIDO-RS);
DCMTK's storescp and an Orthanc's DICOM port are the DICOM nodes, Orthanc also the Storage
Commitment SCP. Each copy is compared with the original's pixels as pydicom decodes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from tests import bridgectl
from tests.conftest import MakeOrthanc
from tests.orthanc import EXPLICIT_VR_LITTLE_ENDIAN, OrthancServer

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
