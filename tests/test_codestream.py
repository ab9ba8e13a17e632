"""Frames whose codestream disagrees with the header are refused before any decoder sees them.

Each case is one of pydicom's real files with one field or one byte changed, as a damaged file
or a careless modality would have it. Decoders must not be reached: GDCM aborts or segfaults its
process on such frames, and OpenJPEG allocates whatever the SIZ marker declares.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid

import bridge.dicom.codecs
from bridge.dicom.transcode import transcode
from bridge.errors import DecodeError
from tests.transcode_support import bundled

Change = Callable[[Dataset, bytearray], None]


def _instance(name: str, change: Change) -> bytes:
    """`name` with a fresh SOP Instance UID and its first frame (and header) changed."""
    ds = pydicom.dcmread(bundled(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=frames)))
    change(ds, frame)
    ds.PixelData = encapsulate([bytes(frame)])
    ds.NumberOfFrames = 1
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _put(marker: bytes, offset: int, fmt: str, *values: int) -> Change:
    """Write `values` at `offset` bytes after the first `marker` of the frame."""

    def change(ds: Dataset, frame: bytearray) -> None:
        struct.pack_into(fmt, frame, frame.index(marker) + offset, *values)

    return change


def _header(**values: object) -> Change:
    def change(ds: Dataset, frame: bytearray) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return change


SOF1, SOF55, APP0, DQT = b"\xff\xc1", b"\xff\xf7", b"\xff\xe0", b"\xff\xdb"
LSE = b"\xff\xf8\x00\x0d\x01"  # JPEG-LS preset parameters: MAXVAL, T1, T2, T3, RESET follow
SIZ, COD = b"\xff\x51", b"\xff\x52"
J2K, J2KI, JPEG12, JPEG8, JLS, RLE = (
    "MR_small_jp2klossless.dcm",
    "693_J2KI.dcm",
    "JPGExtended.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_RLE.dcm",
)

# name -> (file, change, what the reason must say)
REFUSED: dict[str, tuple[str, Change, str]] = {
    # OpenJPEG would allocate 40000 x 40000 x 4 bytes for this 1.5 KB frame.
    "j2k-siz-larger": (
        J2KI,
        _put(SIZ, 6, ">I", 40000),
        "40000 columns, the DICOM header Columns 512",
    ),
    "j2k-header-columns-larger": (
        J2K,
        _header(Columns=80),
        "64 columns, the DICOM header Columns 80",
    ),
    "j2k-three-components-in-a-one-sample-header": (J2K, _put(SIZ, 38, ">H", 3), "3 components"),
    "j2k-tiles-of-one-pixel": (J2KI, _put(SIZ, 22, ">II", 1, 1), "262144 tiles"),
    "j2k-cod-levels": (J2K, _put(COD, 9, ">B", 40), "impossible coding style"),
    "j2k-precision-above-bits-allocated": (J2K, _put(SIZ, 40, ">B", 16), "17 bits"),
    "jpeg-sof-precision-17": (JPEG12, _put(SOF1, 4, ">B", 17), "precision of 17 bits"),
    "jpeg-app0-length": (JPEG8, _put(APP0, 2, ">H", 0x0F00), "0xFFE0"),
    "jpeg-dqt-length": (JPEG8, _put(DQT, 2, ">H", 0x0050), "no marker at byte"),
    "jpeg-three-components-as-one": (
        JPEG8,
        _header(SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2"),
        "3 components, the DICOM header SamplesPerPixel 1",
    ),
    "jpeg-header-columns-larger": (JPEG12, _header(Columns=300), "256 columns"),
    "jpeg-ls-width-0": (JLS, _put(SOF55, 7, ">H", 0), "0 columns, the DICOM header Columns 64"),
    "jpeg-ls-rows-larger": (JLS, _put(SOF55, 5, ">H", 4000), "4000 rows"),
    # The fuzzer's input 34115 (MAXVAL 3, RESET 32768): GDCM's decoder loops for ever on it.
    "jpeg-ls-preset-maxval-below-t1": (
        JLS,
        _put(LSE, 5, ">H", 3),
        "declares T1 18, outside 1..3 (precision 16 bits, MAXVAL 3, NEAR 0)",
    ),
    "jpeg-ls-preset-maxval-above-precision": (
        JLS,
        _put(SOF55, 4, ">B", 12),
        "declares MAXVAL 65535, outside 1..4095",
    ),
    "jpeg-ls-preset-t2-below-t1": (
        JLS,
        _put(LSE, 7, ">HH", 67, 18),
        "declares T2 18, outside 67..",
    ),
    "jpeg-ls-preset-t3-above-maxval": (
        JLS,
        _put(LSE, 5, ">HHHH", 300, 0, 0, 301),
        "declares T3 301, outside 7..300",
    ),
    "jpeg-ls-preset-reset-2": (JLS, _put(LSE, 13, ">H", 2), "declares RESET 2, outside 3..65535"),
    "jpeg-ls-preset-length": (JLS, _put(LSE, 2, ">H", 0x0B), "preset parameters segment"),
    "rle-segment-count": (RLE, _put(b"\x02\x00\x00\x00", 0, "<I", 3), "3 segments"),
}


@pytest.fixture
def no_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any decoder is called."""

    def called(*args: object) -> None:
        raise AssertionError("a decoder was called on a frame the pre-check should refuse")

    monkeypatch.setattr(bridge.dicom.codecs, "_decode_one", called)


@pytest.mark.usefixtures("no_decoder")
@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_a_frame_that_disagrees_with_its_header_is_refused_before_decoding(case: str) -> None:
    name, change, reason = REFUSED[case]
    with pytest.raises(DecodeError) as info:
        transcode(_instance(name, change))
    assert reason in str(info.value)
    assert "frame 0: " in str(info.value)


def _pixels(data: bytes | bytearray | memoryview) -> bytes:
    return bytes(pydicom.dcmread(io.BytesIO(bytes(data))).PixelData)


def _pad(padding: bytes) -> Change:
    def change(ds: Dataset, frame: bytearray) -> None:
        end = frame.rindex(b"\xff\xd9") + 2
        frame[end:] = padding

    return change


@pytest.mark.parametrize("name", [JPEG8, JPEG12, JLS, J2K])
@pytest.mark.parametrize(
    "padding",
    [b" ", b"\0\0\0", b"\xff", b"\xff\xff\xff", b"\x13\x37\x42\x99\x01\xff\x00"],
    ids=["space", "zeros", "ff", "ff-fill", "stray-bytes"],
)
def test_any_padding_after_the_end_marker_is_accepted(name: str, padding: bytes) -> None:
    """The habit: an odd-length codestream padded to even length with a space (seen on JPEG
    Lossless from modalities), or stray bytes after EOI; DCMTK and GDCM ignore them."""
    clean = transcode(_instance(name, _pad(b"")))
    padded = transcode(_instance(name, _pad(padding)))
    assert _pixels(padded.data) == _pixels(clean.data)


@pytest.mark.parametrize("name", [JPEG8, JPEG12, JLS, J2K, J2KI])
def test_a_codestream_cut_before_its_end_marker_is_truncated(name: str) -> None:
    def cut(ds: Dataset, frame: bytearray) -> None:
        del frame[len(frame) * 2 // 3 :]

    with pytest.raises(DecodeError, match="truncated"):
        transcode(_instance(name, cut))
