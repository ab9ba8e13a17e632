"""The frames of a multi-frame JPEG 2000 instance decoded by threads (bridge.dicom.frames): the same
bytes as the decoder chain gives one frame at a time, and pydicom's own decoding; frames that may
not take that path (lossy, another precision or sign) still go to the chain."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pydicom
import pytest
from openjpeg.utils import encode_array

from bridge.dicom import codecs
from bridge.dicom import frames as threaded
from bridge.dicom.transcode import transcode
from tests.transcode_support import j2k_monochrome


def _instance(count: int, bits: int, signed: bool, lossy: bool = False) -> bytes:
    """`count` different frames of noise, 256 x 256, JPEG 2000 (lossless unless `lossy`)."""
    rng = np.random.default_rng(bits + signed)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    dtype = "<i2" if signed else "<u2"
    if bits <= 8:
        dtype = "i1" if signed else "u1"
    encoded = []
    for _ in range(count):
        pixels = rng.integers(low, high, (256, 256)).astype(dtype)
        options: dict[str, Any] = {"compression_ratios": [10]} if lossy else {}
        encoded.append(
            encode_array(pixels, bits_stored=bits, photometric_interpretation=2, **options)
        )
    allocated = 8 if bits <= 8 else 16
    return j2k_monochrome(
        encoded,
        256,
        "1.2.840.10008.5.1.4.1.1.7",
        NumberOfFrames=count,
        BitsAllocated=allocated,
        BitsStored=bits,
        HighBit=bits - 1,
        PixelRepresentation=int(signed),
    )


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which path each frame took: "threads", or the chain's decoder name."""
    taken: list[str] = []
    real_decode, real_one = threaded.decode, codecs._decode_one

    def decode(*args: Any) -> Any:
        pixels = real_decode(*args)
        if pixels is not None:
            taken.append("threads")
        return pixels

    def one(name: str, *args: Any) -> Any:
        taken.append(name)
        return real_one(name, *args)

    monkeypatch.setattr(threaded, "decode", decode)
    monkeypatch.setattr(codecs, "_decode_one", one)
    return taken


@pytest.mark.parametrize(
    ("bits", "signed"), [(12, False), (16, False), (12, True), (16, True), (8, False)]
)
def test_threaded_frames_are_the_chain_s_bytes_and_pydicom_s_pixels(
    bits: int, signed: bool, calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _instance(12, bits, signed)
    threaded_out = transcode(data).data
    assert calls and set(calls) == {"threads"}, calls
    calls.clear()
    monkeypatch.setattr(threaded, "wanted", lambda *args: False)
    chain_out = transcode(data).data
    assert set(calls) == {"pylibjpeg"}, calls
    assert bytes(threaded_out) == bytes(chain_out)
    expected = pydicom.dcmread(io.BytesIO(data)).pixel_array
    converted = pydicom.dcmread(io.BytesIO(bytes(threaded_out)))
    assert np.array_equal(converted.pixel_array, expected)


def test_lossy_frames_go_to_the_chain(calls: list[str]) -> None:
    transcode(_instance(6, 12, False, lossy=True))
    assert "threads" not in calls and calls.count("pylibjpeg") == 6, calls


def test_a_frame_of_another_precision_goes_to_the_chain(calls: list[str]) -> None:
    # The codestreams say 12 bits, the header 13: only the chain may reconcile the two.
    data = _instance(6, 12, False)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.BitsStored, ds.HighBit = 13, 12
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    transcode(out.getvalue())
    assert "threads" not in calls, calls
