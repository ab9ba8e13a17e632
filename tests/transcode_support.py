"""Helpers for the transcoder tests: bundled files, reference decoders, synthetic instances."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

# Elements that legitimately change when the pixel encoding changes.
PIXEL_ENCODING_TAGS = {
    0x7FE00010,  # Pixel Data
    0x7FE00001,  # Extended Offset Table
    0x7FE00002,  # Extended Offset Table Lengths
    0x00282110,  # Lossy Image Compression
    0x00282114,  # Lossy Image Compression Method (only ever added)
    0x00280004,  # Photometric Interpretation (YBR_* -> RGB / YBR_FULL)
    0x00280006,  # Planar Configuration (decoders give colour-by-pixel)
    0x00880200,  # Icon Image Sequence (compared separately)
}
_SWAP = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def bundled(name: str) -> Path:
    """Return the path of a test file shipped inside the pydicom wheel (never downloaded)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(name)
    return Path(str(path))


def read(data: bytes | bytearray) -> pydicom.Dataset:
    """Parse a Part-10 file held in memory."""
    return pydicom.dcmread(BytesIO(bytes(data)))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run an outside tool and fail loudly with its output."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"{args[0]} failed: {done.stdout}{done.stderr}")
    return done


def reference_pixels(tool: str, source: Path, tmp: Path) -> pydicom.Dataset:
    """Decode `source` with an independent implementation (DCMTK or GDCM)."""
    out = tmp / f"reference-{tool}.dcm"
    commands = {
        "dcmdjpeg": ["dcmdjpeg", str(source), str(out)],
        "dcmdjpls": ["dcmdjpls", str(source), str(out)],
        "dcmdrle": ["dcmdrle", str(source), str(out)],
        "dcmconv": ["dcmconv", "+te", str(source), str(out)],
        "gdcmconv": ["gdcmconv", "--raw", str(source), str(out)],
    }
    run(*commands[tool])
    return pydicom.dcmread(out)


def native_array(ds: pydicom.Dataset) -> np.ndarray[Any, Any]:
    """Return the pixels of a native dataset, keeping the bits above BitsStored."""
    return np.asarray(ds.pixel_array if ds.BitsAllocated == 1 else _raw_array(ds))


def _raw_array(ds: pydicom.Dataset) -> np.ndarray[Any, Any]:
    from pydicom.pixels.utils import pixel_array

    return np.asarray(pixel_array(ds, correct_unused_bits=False, raw=True))


def swapped(value: bytes, width: int) -> bytes:
    """Reverse every `width`-byte word (an independent copy of the big-endian rule)."""
    if width <= 1:
        return value
    whole = len(value) // width * width
    words = [value[i : i + width][::-1] for i in range(0, whole, width)]
    return b"".join(words) + value[whole:]


def assert_same_elements(
    source: Dataset, output: Dataset, big_endian: bool = False, path: str = ""
) -> None:
    """Assert every element of `source` except pixel encoding is identical in `output`."""
    for elem in source:
        if elem.tag in PIXEL_ENCODING_TAGS and not path:
            continue
        if elem.tag.element == 0:
            # Group lengths are retired and would be wrong after re-encoding: pydicom drops them.
            continue
        where = f"{path}{elem.tag}"
        assert elem.tag in output, f"{where} {elem.keyword} missing from output"
        other = output[elem.tag]
        if elem.VR == "SQ":
            assert len(other.value) == len(elem.value), where
            for index, (a, b) in enumerate(zip(elem.value, other.value, strict=True)):
                assert_same_elements(a, b, big_endian, f"{where}[{index}].")
            continue
        expected = elem.value
        if big_endian and elem.VR in _SWAP and isinstance(expected, bytes):
            expected = swapped(expected, _SWAP[elem.VR])
        assert other.value == expected, f"{where} {elem.keyword}: {other.value!r} != {expected!r}"


def relabel(path: Path, transfer_syntax: str) -> bytes:
    """Return the file with only its Transfer Syntax UID changed: the dataset bytes are kept."""
    data = path.read_bytes()
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    meta_end = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    fp = DicomBytesIO()
    write_file_meta_info(fp, meta, enforce_standard=True)
    return data[:128] + b"DICM" + fp.getvalue() + data[meta_end:]


def to_bytes(ds: Dataset) -> bytes:
    """Serialize a dataset that has file meta, as its transfer syntax says."""
    fp = BytesIO()
    ds.save_as(fp, enforce_file_format=True)
    return fp.getvalue()


def encapsulated_uncompressed(native: Path) -> bytes:
    """Build an Encapsulated Uncompressed (1.2.840.10008.1.2.1.98) copy of a native file."""
    ds = pydicom.dcmread(native)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    size = ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    chunks = [ds.PixelData[i * size : (i + 1) * size] for i in range(frames)]
    # Each frame is one fragment, padded to even length: the padding must be trimmed again.
    ds.PixelData = encapsulate([c + b"\0" * (len(c) % 2) for c in chunks])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1.98")
    return to_bytes(ds)


def j2k_monochrome(frames: Sequence[bytes], size: int, sop_class: str, **elements: Any) -> bytes:
    """A JPEG 2000 lossless Part-10 file of encoded 12-bit MONOCHROME2 frames, size x size.

    New UIDs each call; `elements` (keyword=value) are added or override the defaults.
    """
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = encapsulate(list(frames))
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


def j2k_multiframe(frames: int, size: int = 512) -> bytes:
    """A new JPEG 2000 lossless instance of `frames` 12-bit noise frames of size x size.

    Every frame is the same codestream (encoding is the slow part); UIDs are new each call.
    """
    from openjpeg.utils import encode_array

    pixels = np.random.default_rng(0).integers(0, 4096, (size, size), dtype="<u2")
    frame = encode_array(pixels, bits_stored=12, photometric_interpretation=2)
    return j2k_monochrome(
        [frame] * frames,
        size,
        "1.2.840.10008.5.1.4.1.1.7",
        PatientID="MULTIFRAME",
        NumberOfFrames=frames,
    )
