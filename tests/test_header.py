"""The decoded size read from a header without pydicom, checked against pydicom's reading."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from bridge.dicom.header import decoded_size, transfer_syntax
from tests.orthanc import pydicom_test_files


def _expected(ds: Dataset) -> int | None:
    if not all(keyword in ds for keyword in ("Rows", "Columns", "BitsAllocated")):
        return None
    pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
    pixels *= int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    return (pixels + 7) // 8 if bits == 1 else pixels * (bits // 8)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on its own odd test files
def test_every_pydicom_file_with_a_preamble_reads_as_pydicom_reads_it() -> None:
    checked = 0
    for path in sorted(pydicom_test_files().glob("*.dcm")):
        data = path.read_bytes()
        if data[128:132] != b"DICM":
            continue
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            expected = _expected(ds)
        except Exception:
            continue  # pydicom itself cannot read it: nothing to compare with
        got = decoded_size(data)
        assert got in (expected, None), path.name
        checked += got is not None
    assert checked >= 60  # all but a handful: multi-frame, colour, 1-bit, big endian, deflated


def test_transfer_syntax_is_read_from_the_file_meta_as_pydicom_reads_it() -> None:
    checked = 0
    for path in sorted(pydicom_test_files().glob("*.dcm")):
        data = path.read_bytes()
        try:
            meta = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
            expected = str(meta.TransferSyntaxUID)
        except Exception:
            continue
        if data[128:132] != b"DICM":
            assert transfer_syntax(data) is None, path.name
            continue
        assert transfer_syntax(data) == expected, path.name
        checked += 1
    assert checked >= 70
    valid = (pydicom_test_files() / "CT_small.dcm").read_bytes()
    assert transfer_syntax(valid[:140]) is None  # cut inside the meta
    assert transfer_syntax(b"\0" * 200) is None


def _with_sequences(syntax: str) -> bytes:
    """An image whose header has undefined-length sequences, nested, before group 0028."""
    inner = Dataset()
    inner.CodeValue = "T-D0050"
    inner.CodingSchemeDesignator = "SRT"
    inner.is_undefined_length_sequence_item = True
    item = Dataset()
    item.ReferencedSOPInstanceUID = uid.generate_uid()
    item.ConceptNameCodeSequence = Sequence([inner, inner])
    item["ConceptNameCodeSequence"].is_undefined_length = True
    item.is_undefined_length_sequence_item = True
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = uid.generate_uid()
    ds.ReferencedImageSequence = Sequence([item, item])
    ds["ReferencedImageSequence"].is_undefined_length = True
    ds.AnatomicRegionSequence = Sequence([inner])  # defined length, items undefined
    ds.SamplesPerPixel = 3
    ds.NumberOfFrames = "7"
    ds.Rows = 33
    ds.Columns = 65
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.PixelData = b"\0" * (33 * 65 * 3 * 7 * 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.UID(syntax)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize(
    "syntax",
    [
        uid.ExplicitVRLittleEndian,
        uid.ImplicitVRLittleEndian,
        uid.ExplicitVRBigEndian,
        uid.DeflatedExplicitVRLittleEndian,
    ],
)
def test_nested_undefined_length_sequences_in_every_encoding(syntax: str) -> None:
    data = _with_sequences(syntax)
    if syntax != uid.DeflatedExplicitVRLittleEndian:
        item_end = b"\xfe\xff\x0d\xe0" if syntax != uid.ExplicitVRBigEndian else b"\xff\xfe\xe0\x0d"
        assert data.count(item_end) == 7  # the items really are of undefined length
    assert decoded_size(data) == 33 * 65 * 3 * 7 * 2


def test_what_it_cannot_read_is_none_not_an_error() -> None:
    good = _with_sequences(uid.ExplicitVRLittleEndian)
    assert decoded_size(good[:200]) is None  # cut off before the image attributes
    assert decoded_size(good[128:]) is None  # no preamble
    assert decoded_size(b"") is None
    assert decoded_size(b"\0" * 128 + b"DICM" + b"\xff" * 64) is None
    # Sequences nested 100000 deep (explicit VR LE, undefined lengths): no RecursionError.
    nested = b"\x08\x00\x15\x11SQ\0\0\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff"
    meta = good[: good.index(b"\x08\x00\x16\x00")]  # preamble and file meta, then the dataset
    assert decoded_size(meta + nested * 100_000) is None
    no_image = Path(pydicom_test_files() / "rtplan.dcm").read_bytes()
    assert decoded_size(no_image) is None


def _frames_as_written(value: bytes) -> bytes:
    """The test image with NumberOfFrames written as raw `value`, whatever pydicom allows."""
    data = _with_sequences(uid.ExplicitVRLittleEndian)
    element = b"\x28\x00\x08\x00IS\x02\x007 "  # (0028,0008) IS "7 "
    assert data.count(element) == 1
    value += b" " * (len(value) % 2)
    return data.replace(element, element[:6] + struct.pack("<H", len(value)) + value)


@pytest.mark.parametrize(
    "frames", [b"-1", b"0", b"-99999999999", b"1.5", b"x", b"9" * 30, b"1" * 5000]
)
def test_a_nonsense_frame_count_gives_none_or_a_size_within_the_limit(frames: bytes) -> None:
    """A negative count once made the byte budget count negative bytes; a huge one, an 83-bit
    number of bytes."""
    limit = 2 * 1024**3
    data = _frames_as_written(frames)
    size = decoded_size(data, limit)
    assert size is None or 0 <= size <= limit
    if frames == b"9" * 30:
        assert size == limit  # refused by the decoder later; counted as the most it may be


def test_a_readable_frame_count_is_read() -> None:
    assert decoded_size(_frames_as_written(b"+3")) == 33 * 65 * 3 * 3 * 2
