"""Broken and hostile DICOM files that Orthanc 1.10 stores but nobody can (or should) decode.

Each is built from a real pydicom test file with a fresh SOP Instance UID, so that it is a new
instance, and each is accepted by Orthanc (tests/test_resilience.py checks every upload): the
point is what the bridge does with it after the PACS delivered it.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import UID, generate_uid

from tests.orthanc import pydicom_test_files

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
MPEG4_AVC = "1.2.840.10008.1.2.4.102"

J2K_SOURCE = "693_J2KI.dcm"  # JPEG 2000, 512x512, 16-bit, one frame


def _load(filename: str) -> Dataset:
    ds = pydicom.dcmread(pydicom_test_files() / filename)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _save(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _first_frame(ds: Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def truncated_codestream() -> bytes:
    """A JPEG 2000 file whose codestream was cut to a third."""
    ds = _load(J2K_SOURCE)
    frame = _first_frame(ds)
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    return _save(ds)


def mislabelled(syntax: str) -> Callable[[], bytes]:
    """A factory: a valid JPEG 2000 codestream in a file whose meta claims `syntax`."""

    def build() -> bytes:
        ds = _load(J2K_SOURCE)
        ds.file_meta.TransferSyntaxUID = UID(syntax)
        return _save(ds)

    build.__name__ = f"j2k_labelled_{syntax}"
    return build


def gigantic_header() -> bytes:
    """Declares 65535 x 65535 x 16 bits x 1000 frames (8 TB decoded) with a few bytes of data."""
    ds = _load(J2K_SOURCE)
    frame = _first_frame(ds)
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 1000
    ds.PixelData = encapsulate([frame[:64]])
    return _save(ds)


def lying_dimensions() -> bytes:
    """A valid 512 x 512 codestream in a header claiming 30000 x 30000 (1.7 GB decoded)."""
    # Under the default size limit: only a bridge that checks the first frame before
    # allocating the whole output stays small.
    ds = _load(J2K_SOURCE)
    ds.Rows = ds.Columns = 30000
    return _save(ds)


def video() -> bytes:
    """An MPEG-4 AVC/H.264 instance: a few bytes of "video" in encapsulated pixel data."""
    ds = _load(J2K_SOURCE)
    ds.file_meta.TransferSyntaxUID = UID(MPEG4_AVC)
    # Start code and an SPS-like NAL header: not a playable stream, nobody here decodes video.
    ds.PixelData = encapsulate([b"\x00\x00\x00\x01\x67\x42\x00\x1e" + bytes(range(256)) * 4])
    ds.NumberOfFrames = 1
    return _save(ds)


# name -> builder; each call makes a new instance.
BAD_FILES: dict[str, Callable[[], bytes]] = {
    "truncated": truncated_codestream,
    "j2k_as_jpeg_ls": mislabelled(JPEG_LS_LOSSLESS),
    "j2k_as_rle": mislabelled(RLE_LOSSLESS),
    "gigantic": gigantic_header,
    "lying_dimensions": lying_dimensions,
    "video": video,
}
