"""JPEG-LS preset coding parameters (T.87 C.2.4.1.1): refused outside Table C.1, never inside.

Every JPEG-LS codestream pydicom ships and the T.87 conformance streams that pyjpegls ships
(two with non-default parameters) must pass; DCMTK's and GDCM's encoders, with default and
chosen thresholds, were checked the same way when the check was written.
"""

from __future__ import annotations

from pathlib import Path

import jpeg_ls
import pydicom
import pytest
from pydicom.encaps import generate_frames

from bridge.dicom.codestream import read_declared
from bridge.dicom.jpegls_presets import Presets, check_presets, default_thresholds
from bridge.errors import DecodeError
from tests.orthanc import pydicom_test_files

JPEG_LS = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")
CONFORMANCE = Path(jpeg_ls.__file__).parent / "tests" / "jlsimV100"


def test_default_thresholds_are_those_of_the_standard() -> None:
    assert default_thresholds(255, 0) == (3, 7, 21)  # Table C.3
    assert default_thresholds(65535, 0) == (18, 67, 276)  # what DCMTK and GDCM write for 16 bits
    assert default_thresholds(65535, 3) == (27, 82, 297)
    assert default_thresholds(3, 0) == (2, 3, 3)  # T3 4 is above MAXVAL: clamped to T2


@pytest.mark.parametrize(
    ("precision", "near"),
    # NEAR may reach MAXVAL / 2 (T.87 C.2.3).
    [(p, near) for p in range(2, 17) for near in (0, 1, 3) if near <= ((1 << p) - 1) // 2],
)
def test_parameters_left_at_their_defaults_pass_at_every_precision(
    precision: int, near: int
) -> None:
    check_presets(Presets(0, 0, 0, 0, 0), precision, near, 0)
    maxval = (1 << precision) - 1
    check_presets(Presets(maxval, *default_thresholds(maxval, near), 64), precision, near, 0)


@pytest.mark.parametrize(
    ("presets", "precision", "near"),
    [
        (Presets(4095, 0, 0, 0, 0), 12, 0),  # MAXVAL at 2^P - 1
        (Presets(1, 0, 0, 0, 0), 8, 0),
        (Presets(0, 1, 1, 1, 3), 8, 0),  # T1 = NEAR + 1, T1 = T2 = T3, RESET at 3
        (Presets(0, 4, 4, 4, 0), 8, 3),
        (Presets(3, 0, 0, 0, 255), 16, 0),  # RESET may reach 255 whatever MAXVAL
        (Presets(0, 0, 0, 0, 65535), 16, 0),  # ...or MAXVAL
        (Presets(0, 65535, 65535, 65535, 0), 16, 0),  # thresholds at MAXVAL
    ],
)
def test_parameters_at_the_bounds_pass(presets: Presets, precision: int, near: int) -> None:
    check_presets(presets, precision, near, 0)


@pytest.mark.parametrize(
    ("presets", "precision", "near", "reason"),
    [
        (Presets(4096, 0, 0, 0, 0), 12, 0, "MAXVAL 4096, outside 1..4095"),
        (Presets(3, 18, 67, 276, 32768), 16, 0, "T1 18, outside 1..3"),  # input 34115
        (Presets(0, 3, 0, 0, 0), 8, 3, "T1 3, outside 4..255"),  # T1 must exceed NEAR
        (Presets(0, 10, 9, 0, 0), 8, 0, "T2 9, outside 10..255"),
        (Presets(0, 0, 2, 0, 0), 8, 0, "T2 2, outside 3..255"),  # below the default T1
        (Presets(0, 0, 0, 6, 0), 8, 0, "T3 6, outside 7..255"),  # below the default T2
        (Presets(100, 0, 0, 101, 0), 8, 0, "T3 101, outside 3..100"),
        (Presets(0, 0, 0, 0, 2), 8, 0, "RESET 2, outside 3..255"),
        (Presets(3, 0, 0, 0, 256), 16, 0, "RESET 256, outside 3..255"),
        (Presets(1000, 0, 0, 0, 1001), 16, 0, "RESET 1001, outside 3..1000"),
    ],
)
def test_parameters_outside_table_c1_are_refused_with_their_name(
    presets: Presets, precision: int, near: int, reason: str
) -> None:
    with pytest.raises(DecodeError, match=f"declares {reason}"):
        check_presets(presets, precision, near, 15)


def _shipped() -> list[tuple[str, bytes]]:
    streams = []
    for path in sorted(pydicom_test_files().glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:  # pydicom's raw data sets, none JPEG-LS
            continue
        if str(ds.file_meta.get("TransferSyntaxUID", "")) in JPEG_LS:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            for frame in generate_frames(ds.PixelData, number_of_frames=frames):
                streams.append((path.name, frame))
    streams += [(path.name, path.read_bytes()) for path in sorted(CONFORMANCE.glob("*.JLS"))]
    return streams


def test_every_jpeg_ls_stream_shipped_passes() -> None:
    streams = _shipped()
    names = {name for name, _ in streams}
    # pydicom's five files (two with preset parameters), T.87's twelve conformance streams.
    assert {"MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_16.dcm", "T8NDE3.JLS"} <= names
    assert len(names) >= 17, names
    with_presets = [name for name, stream in streams if b"\xff\xf8\x00\x0d\x01" in stream]
    assert len(with_presets) >= 4, with_presets
    for name, stream in streams:
        assert read_declared(JPEG_LS[0], stream) is not None, name
