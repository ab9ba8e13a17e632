"""Helpers for the transcoder tests: bundled files, reference decoders, synthetic instances."""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom._dicom_dict import DicomDictionary
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


def read(data: bytes | bytearray | memoryview) -> pydicom.Dataset:
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


def _fresh_uids(ds: Dataset) -> None:
    """New instance, series and study UIDs: the result is an instance of its own."""
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()


def _implicit(ds: Dataset) -> bytes:
    fp = BytesIO()
    ds.save_as(fp, implicit_vr=True, little_endian=True, enforce_file_format=True)
    return fp.getvalue()


def with_curves_and_overlay() -> bytes:
    """A real Implicit VR Little Endian MR image carrying two retired curves and an overlay.

    Curve Data (50xx,3000) and Overlay Data (60xx,3000) are "OB or OW" in the dictionary, which
    Implicit VR leaves undecided. The curves are shaped like a modality's: a time-activity
    curve of 32 unsigned (time, counts) points and a 3-point signed physiological trace.
    """
    ds = pydicom.dcmread(bundled("MR_small_implicit.dcm"))
    _fresh_uids(ds)
    points = 32
    times = np.arange(points, dtype="<u2") * 40
    counts = (1000 + 500 * np.sin(np.arange(points) / 4)).astype("<u2")
    # Written with their resolved VRs; Implicit VR drops them, which is the point.
    ds.add_new(0x50000005, "US", 2)  # CurveDimensions
    ds.add_new(0x50000010, "US", points)  # NumberOfPoints
    ds.add_new(0x50000020, "CS", "TAC")  # TypeOfData
    ds.add_new(0x50000022, "LO", "ROI 1 time activity")  # CurveDescription
    ds.add_new(0x50000030, "SH", ["MSEC", "COUNTS"])  # AxisUnits
    ds.add_new(0x50000103, "US", 0)  # DataValueRepresentation: unsigned short
    ds.add_new(0x50003000, "OB", np.stack([times, counts], 1).tobytes())  # CurveData
    ds.add_new(0x50020005, "US", 1)
    ds.add_new(0x50020010, "US", 3)
    ds.add_new(0x50020020, "CS", "PHYSIO")
    ds.add_new(0x50020103, "US", 1)  # signed short
    ds.add_new(0x50023000, "OB", np.array([-5, 0, 7], "<i2").tobytes())
    overlay = np.zeros((int(ds.Rows), int(ds.Columns)), np.uint8)
    overlay[10:20, 5:60] = 1
    ds.add_new(0x60000010, "US", int(ds.Rows))  # OverlayRows
    ds.add_new(0x60000011, "US", int(ds.Columns))  # OverlayColumns
    ds.add_new(0x60000040, "CS", "G")  # OverlayType
    ds.add_new(0x60000050, "SS", [1, 1])  # OverlayOrigin
    ds.add_new(0x60000100, "US", 1)  # OverlayBitsAllocated
    ds.add_new(0x60000102, "US", 0)  # OverlayBitPosition
    ds.add_new(0x60003000, "OW", np.packbits(overlay.ravel(), bitorder="little").tobytes())
    return _implicit(ds)


# Tags whose dictionary VR is ambiguous ("US or SS", "OB or OW", "US or OW", "US or SS or OW"),
# Pixel Data aside, plus repeating groups other than the first.
AMBIGUOUS_TAGS = sorted(
    {tag for tag, entry in DicomDictionary.items() if " or " in entry[0]} - {0x7FE00010}
    | {0x5000200C, 0x50023000, 0x60023000, 0x7F000010, 0x7F020010}
)
_DESCRIPTORS = {0x00281100, 0x00281101, 0x00281102, 0x00281103, 0x00283002}
_LARGE_DESCRIPTORS = {0x00281111, 0x00281112, 0x00281113}


def _ambiguous_value(tag: int) -> bytes:
    # 0xFFFF and 0x8000 read differently as US and SS: a wrong VR shows in the values.
    if tag in _DESCRIPTORS:
        return struct.pack("<3H", 0xFFFF, 0x8000, 16)
    if tag in _LARGE_DESCRIPTORS:
        return struct.pack("<4H", 0xFFFF, 0x8000, 16, 0)
    return struct.pack("<2H", 0xFFFF, 2)


def with_every_ambiguous_vr() -> bytes:
    """An Implicit VR image holding every element whose VR the dictionary leaves open.

    They sit at the top level (PixelRepresentation 1) and in items with PixelRepresentation
    0 or 1 and WaveformBitsAllocated 8 or 16, or with neither: what decides each VR.
    """
    ds = pydicom.dcmread(bundled("MR_small_implicit.dcm"))
    _fresh_uids(ds)
    for tag in AMBIGUOUS_TAGS:
        ds.add_new(tag, "OB", _ambiguous_value(tag))
    items = []
    for representation, waveform_bits in ((0, 8), (1, 16), (None, None)):
        item = Dataset()
        if representation is not None:
            item.add_new(0x00280103, "US", representation)  # PixelRepresentation
        if waveform_bits is not None:
            item.add_new(0x54001004, "US", waveform_bits)  # WaveformBitsAllocated
        for tag in AMBIGUOUS_TAGS:
            item.add_new(tag, "OB", _ambiguous_value(tag))
        items.append(item)
    lut = Dataset()
    lut.add_new(0x00283002, "OB", struct.pack("<3H", 1, 0, 16))  # a LUT of one entry
    lut.add_new(0x00283006, "OB", struct.pack("<H", 7))
    items.append(lut)
    ds.add_new(0x00283010, "SQ", pydicom.sequence.Sequence(items))  # VOILUTSequence
    # Private elements pydicom's private dictionaries know with an open VR.
    ds.add_new(0x00270010, "LO", "FDMS 1.0")
    ds.add_new(0x002710A3, "OB", struct.pack("<2H", 0xFFFF, 2))  # "US or SS"
    ds.add_new(0x70190010, "LO", "TOSHIBA_MEC_OT3")
    ds.add_new(0x70191080, "OB", struct.pack("<2H", 0xFFFF, 2))  # "OB_OW"
    return _implicit(ds)


def dump_without_meta(path: Path) -> list[str]:
    """dcmdump's lines for the dataset of `path`, without its file meta information."""
    lines = run("dcmdump", "-q", "+L", str(path)).stdout.splitlines()
    return lines[lines.index("# Dicom-Data-Set") :]


def with_broken_signature() -> bytes:
    """An Implicit VR image whose Digital Signatures Sequence, after the pixel data, holds an
    FD element of 6 bytes: pydicom fails on it while writing, and its message carries a whole
    traceback (pydicom.tag.tag_in_exception)."""
    ds = pydicom.dcmread(bundled("MR_small_implicit.dcm"))
    _fresh_uids(ds)
    item = Dataset()
    item.add_new(0x04000005, "US", 1)  # MACIDNumber
    item.add_new(0x00189087, "OB", b"\1" * 6)  # DiffusionBValue, FD: 6 bytes, not 8
    item.add_new(0x04000120, "OB", b"\0" * 8)  # Signature
    ds.add_new(0xFFFAFFFA, "SQ", pydicom.sequence.Sequence([item]))  # DigitalSignaturesSequence
    return _implicit(ds)


def uid_text(ds: Dataset, keyword: str) -> str:
    """A UID as text, also when the file wrote it with VR UN: pydicom then keeps its raw bytes
    (the bridge sets replace_un_with_known_vr off, in every process that imports it)."""
    value = ds[keyword].value
    return (value.decode() if isinstance(value, bytes) else str(value)).rstrip("\0 ")
