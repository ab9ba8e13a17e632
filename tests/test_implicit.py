"""Implicit VR Little Endian output: the byte walker agrees with pydicom on every file."""

from __future__ import annotations

import io

import pydicom
import pytest

import bridge.dicom.implicit as implicit
from bridge.dicom.transcode import transcode
from tests.orthanc import EXPLICIT_VR_LITTLE_ENDIAN, pydicom_sample_paths, pydicom_test_files
from tests.transcode_support import with_curves_and_overlay

IMPLICIT = "1.2.840.10008.1.2"


def explicit_files() -> dict[str, bytes]:
    """pydicom's Explicit VR Little Endian files, and the bridge's conversions of its samples."""
    found = {}
    for path in sorted(pydicom_test_files().glob("*.dcm")):
        try:
            meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        except Exception:  # some of its files are broken on purpose
            continue
        if meta.get("TransferSyntaxUID") == EXPLICIT_VR_LITTLE_ENDIAN:
            found[path.name] = path.read_bytes()
    for key, path in pydicom_sample_paths().items():
        found[f"converted {key}"] = bytes(transcode(path.read_bytes()).data)
    # Elements whose VR Implicit VR left open, decided by the transcoder (bridge.dicom.vr).
    found["converted curves"] = bytes(transcode(with_curves_and_overlay()).data)
    return found


FILES = explicit_files()


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on its own odd files
@pytest.mark.parametrize("name", sorted(FILES))
def test_the_walker_writes_what_pydicom_writes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = FILES[name]
    reference = pydicom.dcmread(io.BytesIO(implicit._through_pydicom(data)))
    fell_back: list[bool] = []
    through = implicit._through_pydicom

    def noted(d: bytes | bytearray) -> bytes:
        fell_back.append(True)
        return through(d)

    monkeypatch.setattr(implicit, "_through_pydicom", noted)
    written = implicit.to_implicit(data)
    found = pydicom.dcmread(io.BytesIO(written))
    assert found.file_meta.TransferSyntaxUID == IMPLICIT
    assert found == reference  # every element, sequences and pixel data included
    # Only a truncated file is left to pydicom.
    assert fell_back == ([True] if name == "MR_truncated.dcm" else [])
