"""Signed HTJ2K through the bridge's real transcode path, against known originals.

The streams are made at test time by two encoders independent of the bridge's decoder (Grok
from Debian's grokj2k-tools, OpenJPH through imagecodecs) from values the test chose, and
each lossless stream is first shown to decode to those values by a decoder other than the
bridge's (OpenJPH for Grok's streams, Grok for OpenJPH's). A third family needs no encoder's
signed path at all: an unsigned lossless stream relabelled signed in its SIZ marker, whose only
correct decoding is the original minus 2**(bits-1) (see htj2k_support.with_sign). README,
"HTJ2K", says what these prove and what the conformance codestreams showed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import imagecodecs  # noqa: F401  (a missing test dependency fails the module, never skips it)
import numpy as np
import pytest
from pydicom import uid

from bridge.dicom.transcode import transcode
from bridge.uids import EXPLICIT_VR_LITTLE_ENDIAN
from tests.htj2k_support import (
    grok_decode,
    grok_encode,
    htj2k_dicom,
    openjph_decode,
    openjph_encode,
    progression_of,
    sample_dtype,
    signed_values,
    siz_components,
    smooth_signed,
    with_sign,
)
from tests.transcode_support import native_array, read

ROWS, COLUMNS = 40, 56
Encoder = Callable[[np.ndarray[Any, Any], int, Path, str, bool], bytes]


def _grok(pixels: np.ndarray[Any, Any], bits: int, tmp: Path, order: str, lossy: bool) -> bytes:
    return grok_encode(pixels, bits, tmp, progression=order, irreversible=lossy)


def _openjph(pixels: np.ndarray[Any, Any], bits: int, tmp: Path, order: str, lossy: bool) -> bytes:
    return openjph_encode(pixels, progression=order, irreversible=lossy)


ENCODERS: dict[str, Encoder] = {"grok": _grok, "openjph": _openjph}
# imagecodecs' OpenJPH takes the depth from the array's type: 8 or 16 bits only.
DEPTHS = {"grok": (16, 12, 8), "openjph": (16, 8)}
LOSSLESS = [
    pytest.param(name, bits, syntax, id=f"{name}-{bits}bit-{label}")
    for name in ENCODERS
    for bits in DEPTHS[name]
    for syntax, label in ((uid.HTJ2KLossless, "201"), (uid.HTJ2KLosslessRPCL, "202-rpcl"))
]


def _other_decoder(name: str, codestream: bytes, bits: int, tmp: Path) -> np.ndarray[Any, Any]:
    """The decoder that is neither the encoder's own nor the bridge's."""
    if name == "grok":
        return openjph_decode(codestream)
    return grok_decode(codestream, bits, signed=True, tmp=tmp)


def _bridge_pixels(source: bytes) -> tuple[np.ndarray[Any, Any], Any]:
    """Transcode like the bridge does and return the native pixels and the output dataset."""
    done = transcode(source)
    out = read(done.data)
    assert out.file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN
    return native_array(out), out


@pytest.mark.parametrize(("name", "bits", "syntax"), LOSSLESS)
def test_signed_lossless_is_bit_exact(name: str, bits: int, syntax: str, tmp_path: Path) -> None:
    order = "RPCL" if syntax == uid.HTJ2KLosslessRPCL else "LRCP"
    originals = [signed_values(bits, ROWS, COLUMNS, seed) for seed in (1, 2)]
    frames = [ENCODERS[name](pixels, bits, tmp_path, order, False) for pixels in originals]
    for pixels, frame in zip(originals, frames, strict=True):
        assert siz_components(frame) == [(bits, True)]
        assert progression_of(frame) == order
        # The stream holds the values: an independent decoder says so before the bridge runs.
        other = _other_decoder(name, frame, bits, tmp_path)
        assert np.array_equal(other.reshape(pixels.shape), pixels), "reference decoder disagrees"

    source = htj2k_dicom(frames, ROWS, COLUMNS, bits, True, syntax)
    decoded, out = _bridge_pixels(source)

    assert out.PixelRepresentation == 1
    assert out.BitsStored == bits
    assert "LossyImageCompression" not in out
    expected = np.stack(originals).astype(sample_dtype(bits, signed=True))
    # Every allocated bit: values below 16 bits come out sign-extended, as the originals are.
    assert decoded.dtype == expected.dtype
    assert np.array_equal(decoded.reshape(expected.shape), expected)


@pytest.mark.parametrize(
    ("name", "bits"),
    [pytest.param(n, b, id=f"{n}-{b}bit") for n in ENCODERS for b in DEPTHS[n]],
)
def test_unsigned_stream_relabelled_signed(name: str, bits: int, tmp_path: Path) -> None:
    # No encoder's signed path is involved: unsigned coding is the common, well-trodden one,
    # and the relabelled stream has exactly one correct decoding.
    unsigned = signed_values(bits, ROWS, COLUMNS, 3).astype(np.int64) + 2 ** (bits - 1)
    pixels = unsigned.astype(sample_dtype(bits, signed=False))
    frame = ENCODERS[name](pixels, bits, tmp_path, "RPCL", False)
    assert siz_components(frame) == [(bits, False)]
    unsigned_source = htj2k_dicom([frame], ROWS, COLUMNS, bits, False, uid.HTJ2KLosslessRPCL)
    decoded_unsigned, _ = _bridge_pixels(unsigned_source)
    assert np.array_equal(decoded_unsigned.reshape(pixels.shape), pixels)

    signed_frame = with_sign(frame, signed=True)
    source = htj2k_dicom([signed_frame], ROWS, COLUMNS, bits, True, uid.HTJ2KLosslessRPCL)
    decoded, _ = _bridge_pixels(source)

    expected = (unsigned - 2 ** (bits - 1)).astype(sample_dtype(bits, signed=True))
    assert np.array_equal(decoded.reshape(expected.shape), expected)


@pytest.mark.parametrize(
    ("name", "bits"),
    [pytest.param(n, b, id=f"{n}-{b}bit") for n in ENCODERS for b in DEPTHS[n] if b > 8],
)
def test_signed_lossy_matches_independent_decoders(name: str, bits: int, tmp_path: Path) -> None:
    originals = [smooth_signed(bits, ROWS, COLUMNS, phase) for phase in (0.0, 1.5)]
    frames = [ENCODERS[name](pixels, bits, tmp_path, "LRCP", True) for pixels in originals]
    source = htj2k_dicom(frames, ROWS, COLUMNS, bits, True, uid.HTJ2K)
    decoded, out = _bridge_pixels(source)

    assert out.LossyImageCompression == "01"
    assert out.LossyImageCompressionMethod == "ISO_15444_15"
    decoded = decoded.reshape(len(frames), ROWS, COLUMNS).astype(np.int64)
    for index, (pixels, frame) in enumerate(zip(originals, frames, strict=True)):
        mine = decoded[index]
        # The 9-7 wavelet is computed in floating or fixed point, differently per decoder.
        for reference in (
            openjph_decode(frame),
            grok_decode(frame, bits, signed=True, tmp=tmp_path),
        ):
            reference = reference.reshape(mine.shape).astype(np.int64)
            assert np.abs(mine - reference).max() <= 2
        # Near the original: no sign lost, nothing clipped (the image spans 80% of the range).
        error = np.abs(mine - pixels.astype(np.int64))
        assert error.max() <= 2 ** (bits - 1) // 256
        far = np.abs(pixels) > 64
        assert np.array_equal(np.sign(mine[far]), np.sign(pixels[far]))
