"""Once a decoder finds a frame's data invalid, no other decoder is tried on it: GDCM aborts,
segfaults or loops for ever on such frames, and libjpeg decodes a JPEG-LS scan CharLS rejects to
wrong pixels. Where the first decoder only lacks a feature, the chain goes on.

The verdicts are those the decoders really give (measured on corrupted pydicom files): CharLS
"Invalid JPEG-LS stream", libjpeg's error codes for a stream that ran out or is malformed,
OpenJPEG's "failed to read the header" or "failed to decode image"; against pydicom's GDCM
plugin refusing 12-bit JPEG ("GDCM does not support"), which the direct GDCM call then decodes.
"""

from __future__ import annotations

from typing import Any

import pydicom
import pytest
from pydicom import uid
from pydicom.encaps import generate_frames

import bridge.dicom.codecs
from bridge.dicom.codecs import PixelSpec, iter_decoded
from bridge.dicom.verdicts import invalid_data
from bridge.errors import DecodeError
from tests.transcode_support import bundled


def _frame_and_spec(name: str) -> tuple[bytes, str, PixelSpec]:
    ds = pydicom.dcmread(bundled(name))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    spec = PixelSpec(
        ds.Rows,
        ds.Columns,
        ds.SamplesPerPixel,
        ds.BitsAllocated,
        ds.BitsStored,
        ds.PixelRepresentation,
        str(ds.PhotometricInterpretation),
        int(ds.get("PlanarConfiguration", 0) or 0),
        1,
    )
    return frame, str(ds.file_meta.TransferSyntaxUID), spec


@pytest.fixture
def called(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The decoders iter_decoded calls, in order (GDCM is refused here, never run)."""
    names: list[str] = []
    real = bridge.dicom.codecs._decode_one

    def spy(name: str, *args: Any) -> Any:
        names.append(name)
        if name.startswith("gdcm"):
            raise AssertionError("GDCM reached")
        return real(name, *args)

    monkeypatch.setattr(bridge.dicom.codecs, "_decode_one", spy)
    return names


def test_no_decoder_is_tried_on_a_frame_charls_finds_invalid(called: list[str]) -> None:
    frame, syntax, spec = _frame_and_spec("MR_small_jpeg_ls_lossless.dcm")
    middle = len(frame) // 2
    broken = frame[:middle] + bytes(32) + frame[middle + 32 :]  # the scan's bits, no marker
    # libjpeg, after GDCM in the chain, decodes it to wrong pixels: neither is tried.
    with pytest.raises(DecodeError, match="invalid, no other decoder was tried") as info:
        list(iter_decoded([[memoryview(broken)]], syntax, spec))
    assert called == ["pyjpegls"], called
    assert "Invalid JPEG-LS stream" in str(info.value)


def test_gdcm_is_not_tried_once_libjpeg_ran_out_of_data(
    monkeypatch: pytest.MonkeyPatch, called: list[str]
) -> None:
    monkeypatch.setattr(
        bridge.dicom.codecs, "_available_chain", lambda syntax: ["pylibjpeg", "gdcm"]
    )
    monkeypatch.setattr(bridge.dicom.codecs, "_pydicom_plugin", _ran_out)
    frame, syntax, spec = _frame_and_spec("SC_rgb_jpeg_gdcm.dcm")
    with pytest.raises(DecodeError) as info:
        list(iter_decoded([[memoryview(frame)]], syntax, spec))
    assert called == ["pylibjpeg"], called
    assert "invalid, no other decoder was tried" in str(info.value)


def _ran_out(*args: object) -> None:
    raise RuntimeError(
        "Unable to decode as exceptions were raised by all available plugins:\n  pylibjpeg: "
        "libjpeg error code '-1025' returned from Decode(): Stream run out of data - "
    )


def test_gdcm_still_decodes_the_valid_file_libjpeg_refuses() -> None:
    # libjpeg: -1038, "a misplaced marker segment" (its scan's Ss/Se), which is no verdict;
    # pydicom's GDCM plugin refuses 12 bits, the direct GDCM call decodes it.
    frame, syntax, spec = _frame_and_spec("JPEG-lossy.dcm")
    assert bridge.dicom.codecs._available_chain(syntax) == ["pylibjpeg", "gdcm", "gdcm-direct"]
    (decoded,) = iter_decoded([[memoryview(frame)]], syntax, spec)
    assert decoded.pixels.nbytes == spec.frame_bytes


def test_a_decoder_that_lacks_a_feature_hands_over_to_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without pylibjpeg, 12-bit JPEG goes to pydicom's GDCM plugin, which refuses 12 bits,
    # then to the direct GDCM call, which decodes it.
    monkeypatch.setattr(
        bridge.dicom.codecs, "_available_chain", lambda syntax: ["gdcm", "gdcm-direct"]
    )
    frame, syntax, spec = _frame_and_spec("JPGExtended.dcm")
    assert syntax == uid.JPEGExtended12Bit
    (decoded,) = iter_decoded([[memoryview(frame)]], syntax, spec)
    assert decoded.pixels.nbytes == spec.frame_bytes


@pytest.mark.parametrize(
    ("decoder", "message", "invalid"),
    [
        ("pyjpegls", "pyjpegls: Decoding error: Invalid JPEG-LS stream, the encoded bit", True),
        ("pyjpegls", "Invalid JPEG-LS stream: JPEG-LS preset parameters segment contains", True),
        ("pyjpegls", "Unsupported JPEG-LS stream: JPEG-LS preset parameters segment", False),
        ("pyjpegls", "The JPEG-LS stream is encoded with a parameter value that is not", False),
        ("pylibjpeg", "libjpeg error code '-1025' returned from Decode(): Stream run out", True),
        ("pylibjpeg", "libjpeg error code '-1038' returned from Decode(): A misplaced", False),
        ("pylibjpeg", "libjpeg error code '-1040' returned from Decode(): not supported", False),
        ("pylibjpeg", "Error decoding the J2K data: failed to read the header", True),
        ("pylibjpeg", "Error decoding the J2K data: failed to decode image", True),
        ("pylibjpeg", "Error decoding the J2K data: support for more than 32-bits", False),
        ("gdcm", "GDCM does not support 'JPEG Extended' for samples with 12-bit", False),
        ("pydicom", "Invalid JPEG-LS stream", False),  # only the decoder's own words count
    ],
)
def test_verdicts_are_read_from_each_decoder_s_own_messages(
    decoder: str, message: str, invalid: bool
) -> None:
    exc = RuntimeError(f"Unable to decode as exceptions were raised by all plugins:\n  {message}")
    assert invalid_data(decoder, exc) is invalid
