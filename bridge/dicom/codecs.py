"""Per-syntax decoder chains: encapsulated frames in, native pixel frames out, one at a time."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import itertools
import os
import struct
import sys
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import uid
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import get_decoder

from bridge.dicom import frames as threaded_frames
from bridge.dicom.codestream import check_frame
from bridge.dicom.dicomfile import ITEM, SEQUENCE_DELIMITER
from bridge.dicom.verdicts import invalid_data
from bridge.errors import PROCESS_EXITS, DecodeError, one_line
from bridge.jobs import DECODER_STEP
from bridge.uids import ENCAPSULATED_UNCOMPRESSED

# Order matters: the first decoder that reads a frame wins and is tried first for the next one.
# GDCM is never given RLE: it decoded 16/32-bit RGB RLE wrongly and aborted on 1-bit RLE.
# "gdcm-direct" is our own call into GDCM, because pydicom's GDCM plugin refuses 12-bit JPEG.
DECODER_CHAINS: dict[str, tuple[str, ...]] = {
    uid.JPEGBaseline8Bit: ("pylibjpeg", "gdcm"),
    uid.JPEGExtended12Bit: ("pylibjpeg", "gdcm", "gdcm-direct"),
    uid.JPEGLossless: ("pylibjpeg", "gdcm"),
    uid.JPEGLosslessSV1: ("pylibjpeg", "gdcm"),
    uid.JPEGLSLossless: ("pyjpegls", "gdcm", "pylibjpeg"),
    uid.JPEGLSNearLossless: ("pyjpegls", "gdcm", "pylibjpeg"),
    uid.JPEG2000Lossless: ("pylibjpeg", "gdcm"),
    uid.JPEG2000: ("pylibjpeg", "gdcm"),
    uid.HTJ2KLossless: ("pylibjpeg",),
    uid.HTJ2KLosslessRPCL: ("pylibjpeg",),
    uid.HTJ2K: ("pylibjpeg",),
    uid.RLELossless: ("pylibjpeg", "pydicom"),
    ENCAPSULATED_UNCOMPRESSED: ("native",),
}

# What to install when a chain has no usable decoder; pydicom's "pylibjpeg" plugin means a
# different package per family.
_PACKAGES: dict[str, str] = {
    uid.JPEGBaseline8Bit: "pylibjpeg-libjpeg (GPL-3.0: orthanc-bridge[gpl]) or python-gdcm",
    uid.JPEGExtended12Bit: "pylibjpeg-libjpeg (GPL-3.0: orthanc-bridge[gpl]) or python-gdcm",
    uid.JPEGLossless: "pylibjpeg-libjpeg (GPL-3.0: orthanc-bridge[gpl]) or python-gdcm",
    uid.JPEGLosslessSV1: "pylibjpeg-libjpeg (GPL-3.0: orthanc-bridge[gpl]) or python-gdcm",
    uid.JPEGLSLossless: "pyjpegls or python-gdcm",
    uid.JPEGLSNearLossless: "pyjpegls or python-gdcm",
    uid.JPEG2000Lossless: "pylibjpeg-openjpeg or python-gdcm",
    uid.JPEG2000: "pylibjpeg-openjpeg or python-gdcm",
    uid.HTJ2KLossless: "pylibjpeg-openjpeg",
    uid.HTJ2KLosslessRPCL: "pylibjpeg-openjpeg",
    uid.HTJ2K: "pylibjpeg-openjpeg",
    uid.RLELossless: "pylibjpeg-rle (or nothing: pydicom's own RLE decoder needs only numpy)",
}

# Lossy JPEG is converted to RGB like DCMTK's dcmdjpeg does; every other syntax keeps the colour
# space its decoder delivers, so that lossless data stays bit-exact.
_TO_RGB = {uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit}

_JPEG_SOI = b"\xff\xd8"
_J2K_SOC = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "


@dataclass(frozen=True)
class PixelSpec:
    """The Image Pixel attributes that size and describe the decoded frames."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric_interpretation: str
    planar_configuration: int
    number_of_frames: int

    @property
    def frame_pixels(self) -> int:
        """Number of samples in one frame."""
        return self.rows * self.columns * self.samples_per_pixel

    @property
    def frame_bytes(self) -> int:
        """Decoded size of one frame in bytes (one byte per sample while 1-bit is unpacked)."""
        return self.frame_pixels * max(1, self.bits_allocated // 8)

    @property
    def total_bytes(self) -> int:
        """Native size of all frames, bit-packed for 1-bit, before padding to even length."""
        if self.bits_allocated == 1:
            return (self.frame_pixels * self.number_of_frames + 7) // 8
        return self.frame_bytes * self.number_of_frames


@dataclass(frozen=True)
class DecodedFrame:
    """One decoded frame and the photometric interpretation of its samples."""

    pixels: np.ndarray[Any, Any]
    photometric_interpretation: str
    placed: bool = False  # decoded straight into its place in the output (iter_decoded)


_noted_fd: int | None = None


def note_decoder_calls(fd: int | None) -> None:
    """Write a line to `fd` before each decoder call (a decoding process's stderr: if a decoder
    crashes the process, the bridge reads there which one, on which frame)."""
    global _noted_fd
    _noted_fd = fd


def has_decoder(transfer_syntax: str) -> bool:
    """Return True when at least one decoder of the syntax's chain is installed."""
    return bool(_available_chain(transfer_syntax))


def missing_decoder_hint(transfer_syntax: str) -> str:
    """Return the packages that would decode the syntax, for error messages."""
    return _PACKAGES.get(transfer_syntax, "no known decoder")


def _available_chain(transfer_syntax: str) -> list[str]:
    chain = DECODER_CHAINS.get(transfer_syntax, ())
    if transfer_syntax == ENCAPSULATED_UNCOMPRESSED:
        return list(chain)
    available = set(get_decoder(transfer_syntax).available_plugins)
    if _gdcm_deferred() and transfer_syntax in _gdcm_plugin().DECODER_DEPENDENCIES:
        available.add("gdcm")  # loaded when the chain first reaches it
    if "gdcm" in available:
        available.add("gdcm-direct")
    return [name for name in chain if name in available]


_GDCM_PLUGIN = ("pydicom.pixels.decoders.gdcm", "_decode_frame")


def _gdcm_plugin() -> Any:
    return sys.modules[_GDCM_PLUGIN[0]]


def _gdcm_deferred() -> bool:
    """True when python-gdcm is installed but was kept out of pydicom's import (preload.py)."""
    if _GDCM_PLUGIN[0] not in sys.modules or _gdcm_plugin().HAVE_GDCM:
        return False
    return _gdcm_installed()


@functools.cache
def _gdcm_installed() -> bool:
    try:
        return importlib.util.find_spec("gdcm") is not None
    except (ImportError, ValueError):  # blocked: sys.modules["gdcm"] is None
        return False


def load_deferred_gdcm() -> None:
    """Import GDCM now and give pydicom's decoders back the GDCM plugin it then lacked."""
    if not _gdcm_deferred():
        return
    # pydicom decides a plugin's availability when it is added: re-read the plugin's module
    # with gdcm importable, then add the plugin again (public, documented Decoder methods).
    plugin = importlib.reload(_gdcm_plugin())
    for syntax in plugin.DECODER_DEPENDENCIES:
        decoder = get_decoder(syntax)
        if "gdcm" not in decoder.available_plugins:
            with contextlib.suppress(ValueError):  # not registered at all
                decoder.remove_plugin("gdcm")
            decoder.add_plugin("gdcm", _GDCM_PLUGIN)


def _items(value: memoryview) -> tuple[memoryview, list[tuple[int, memoryview]]]:
    """Split an encapsulated value into its Basic Offset Table and (offset, fragment) pairs."""
    items: list[tuple[int, memoryview]] = []
    pos = 0
    while pos + 8 <= len(value):
        tag, length = struct.unpack_from("<II", value, pos)
        if tag == SEQUENCE_DELIMITER:
            break
        if tag != ITEM or pos + 8 + length > len(value):
            raise DecodeError(f"encapsulated pixel data has a bad or truncated item at byte {pos}")
        items.append((pos, value[pos + 8 : pos + 8 + length]))
        pos += 8 + length
    if not items:
        raise DecodeError("encapsulated pixel data has no Basic Offset Table item")
    bot = items[0][1]
    first = items[1][0] if len(items) > 1 else 0
    # Offsets in the BOT and EOT count from the first fragment's item tag.
    return bot, [(offset - first, frag) for offset, frag in items[1:]]


def split_frames(
    value: memoryview,
    number_of_frames: int,
    transfer_syntax: str,
    extended_offsets: list[int] | None = None,
) -> list[list[memoryview]]:
    """Group the fragments of an encapsulated value into frames, without copying them."""
    bot, fragments = _items(value)
    if not fragments:
        raise DecodeError("encapsulated pixel data has no fragments")
    offsets: list[int] | None = extended_offsets
    if offsets is None and len(bot) >= 4:
        offsets = list(struct.unpack(f"<{len(bot) // 4}I", bot[: len(bot) // 4 * 4]))
    if offsets and not _offsets_fit(offsets, {o for o, _ in fragments}, number_of_frames):
        # A table whose offsets miss the fragments' item tags (all zeros, or off by the item
        # headers): DCMTK and GDCM find the frames without it, and so does the bridge.
        offsets = None
    if offsets:
        frames: list[list[memoryview]] = []
        bounds = [*offsets, 2**64]
        for start, end in itertools.pairwise(bounds):
            frames.append([f for o, f in fragments if start <= o < end])
    elif number_of_frames == 1:
        frames = [[f for _, f in fragments]]
    elif len(fragments) == number_of_frames:
        frames = [[f] for _, f in fragments]
    else:
        # No offset table and more fragments than frames: a frame starts at each codestream start.
        frames = []
        for _, frag in fragments:
            head = bytes(frag[:12])
            starts = (
                head.startswith((_JPEG_SOI, _J2K_SOC, _JP2_SIGNATURE))
                and transfer_syntax != uid.RLELossless
            )
            if starts or not frames:
                frames.append([frag])
            else:
                frames[-1].append(frag)
    if len(frames) < number_of_frames or any(not f for f in frames[:number_of_frames]):
        raise DecodeError(
            f"encapsulated pixel data holds {len(frames)} frames, NumberOfFrames is "
            f"{number_of_frames}"
        )
    return frames[:number_of_frames]


def _offsets_fit(offsets: list[int], starts: set[int], number_of_frames: int) -> bool:
    """Whether an offset table gives each frame a distinct fragment start, in order."""
    return (
        len(offsets) >= number_of_frames
        and offsets[0] == 0
        and all(b > a for a, b in itertools.pairwise(offsets))
        and all(o in starts for o in offsets)
    )


def iter_decoded(
    frames: list[list[memoryview]],
    transfer_syntax: str,
    spec: PixelSpec,
    place: Callable[[int], memoryview | None] | None = None,
) -> Generator[DecodedFrame, None, None]:
    """Yield each frame decoded, trying the decoder chain until one gives the right size.

    The frames of a multi-frame JPEG 2000 instance are decoded by several threads at once
    where the result is the chain's (bridge.dicom.frames), each straight into its place in
    the output when `place(index)` gives one (then `placed`); the others, one by one by the
    chain.
    """
    chain = _available_chain(transfer_syntax)
    if not chain:
        raise DecodeError(f"no decoder installed; needs {missing_decoder_hint(transfer_syntax)}")
    jobs = (
        (index, _checked(index, fragments, transfer_syntax, spec))
        for index, fragments in enumerate(frames)
    )
    if not threaded_frames.wanted(
        len(frames), transfer_syntax, spec.samples_per_pixel, spec.bits_allocated
    ):
        for index, encoded in jobs:
            yield _by_chain(index, encoded, transfer_syntax, spec, chain)
        return
    dtype = np.dtype(f"<{'ui'[spec.pixel_representation]}{spec.bits_allocated // 8}")
    shape = (spec.rows, spec.columns)

    placed: set[int] = set()  # the frames decoded in their place

    def run(index: int, encoded: bytes) -> np.ndarray[Any, Any] | None:
        into = place(index) if place else None
        pixels = threaded_frames.decode(
            encoded, transfer_syntax, shape, dtype, spec.bits_stored, into
        )
        if pixels is not None and into is not None:
            placed.add(index)
        return pixels

    if _noted_fd is not None:
        os.write(_noted_fd, f"{DECODER_STEP} imagecodecs on frames 0-{len(frames) - 1}\n".encode())
    for index, encoded, pixels in threaded_frames.ordered(jobs, run):
        if pixels is None:
            yield _by_chain(index, encoded, transfer_syntax, spec, chain)
        else:
            yield DecodedFrame(pixels, spec.photometric_interpretation, index in placed)


def _checked(
    index: int, fragments: list[memoryview], transfer_syntax: str, spec: PixelSpec
) -> bytes:
    """One frame's codestream, checked against the header and trimmed to the codestream."""
    encoded = fragments[0].tobytes() if len(fragments) == 1 else b"".join(fragments)
    # Checked before any decoder sees it: decoders trust the codestream, allocate what it
    # declares and some crash their process on a mismatch (bridge.dicom.codestream).
    try:
        start, end = check_frame(transfer_syntax, encoded, spec)
    except DecodeError as exc:
        raise DecodeError(f"frame {index}: {exc}") from None
    if (start, end) != (0, len(encoded)):
        # Decoders see the codestream alone: not the padding after its end marker, nor the
        # boxes of a JP2 file around it (pydicom loops for ever on a box of length 0).
        encoded = encoded[start:end]
    return encoded


def _by_chain(
    index: int, encoded: bytes, transfer_syntax: str, spec: PixelSpec, chain: list[str]
) -> DecodedFrame:
    """One frame decoded by the first decoder of the chain that reads it; that decoder moves
    to the head of the chain for the following frames."""
    failures: list[str] = []
    for name in list(chain):
        if _noted_fd is not None:
            os.write(_noted_fd, f"{DECODER_STEP} {name} on frame {index}\n".encode())
        try:
            frame = _decode_one(name, encoded, transfer_syntax, spec)
        except DecodeError as exc:
            failures.append(f"{name}: {exc}")
            continue
        except PROCESS_EXITS:
            raise
        except BaseException as exc:  # decoders raise anything, pyo3 panics included
            failures.append(f"{name}: {one_line(exc)}")
            if invalid_data(name, exc):
                # No other decoder is given a frame found invalid (bridge.dicom.verdicts): GDCM
                # crashes or loops on such data, and libjpeg decodes a JPEG-LS scan that
                # CharLS rejects to wrong pixels, which would replace the original.
                raise DecodeError(
                    f"frame {index} is invalid, no other decoder was tried ({'; '.join(failures)})"
                ) from None
            continue
        chain.remove(name)
        chain.insert(0, name)
        return frame
    raise DecodeError(f"frame {index} could not be decoded ({'; '.join(failures)})")


def _decode_one(name: str, encoded: bytes, transfer_syntax: str, spec: PixelSpec) -> DecodedFrame:
    if name == "native":
        return _native_frame(encoded, spec)
    if name in ("gdcm", "gdcm-direct"):
        load_deferred_gdcm()
    if name == "gdcm-direct":
        frame = _gdcm_direct(encoded, transfer_syntax, spec)
    else:
        frame = _pydicom_plugin(name, encoded, transfer_syntax, spec)
    if frame.pixels.nbytes != spec.frame_bytes:
        raise DecodeError(
            f"decoded frame is {frame.pixels.nbytes} bytes, expected {spec.frame_bytes}"
        )
    return frame


def _pydicom_plugin(
    name: str, encoded: bytes, transfer_syntax: str, spec: PixelSpec
) -> DecodedFrame:
    decoder = get_decoder(transfer_syntax)
    arrays = decoder.iter_array(
        encapsulate([encoded]),
        decoding_plugin=name,
        raw=transfer_syntax not in _TO_RGB,
        # Bits above BitsStored may hold overlays: keep them as DCMTK does.
        correct_unused_bits=False,
        rows=spec.rows,
        columns=spec.columns,
        samples_per_pixel=spec.samples_per_pixel,
        bits_allocated=spec.bits_allocated,
        bits_stored=spec.bits_stored,
        pixel_representation=spec.pixel_representation,
        photometric_interpretation=spec.photometric_interpretation,
        planar_configuration=spec.planar_configuration,
        number_of_frames=1,
        pixel_keyword="PixelData",
    )
    arr, props = next(iter(arrays))
    photometric = str(props.get("photometric_interpretation", spec.photometric_interpretation))
    if photometric == "YBR_FULL_422":
        # Decoders return full-resolution samples; 422 would describe subsampled data.
        photometric = "YBR_FULL"
    return DecodedFrame(np.ascontiguousarray(arr), photometric)


def _gdcm_direct(encoded: bytes, transfer_syntax: str, spec: PixelSpec) -> DecodedFrame:
    """Decode one JPEG frame with GDCM, which reads 12-bit JPEG that pydicom's plugin refuses."""
    import gdcm  # optional: absent installs simply drop this decoder from the chain

    if transfer_syntax not in _TO_RGB or spec.samples_per_pixel != 1:
        raise DecodeError("direct GDCM decoding is used only for monochrome lossy JPEG")
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(encoded)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    elem.SetValue(fragments.__ref__())
    img = gdcm.Image()
    img.SetNumberOfDimensions(2)
    img.SetDimensions((spec.columns, spec.rows, 1))
    img.SetDataElement(elem)
    pi_type = gdcm.PhotometricInterpretation.GetPIType(spec.photometric_interpretation)
    img.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi_type))
    img.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(transfer_syntax)))
    img.SetPixelFormat(
        gdcm.PixelFormat(
            1,
            spec.bits_allocated,
            spec.bits_stored,
            spec.bits_stored - 1,
            spec.pixel_representation,
        )
    )
    # GDCM hands the buffer back as str; surrogateescape restores the exact bytes.
    raw = img.GetBuffer().encode("utf-8", "surrogateescape")
    dtype = np.dtype(f"<{'ui'[spec.pixel_representation]}{spec.bits_allocated // 8}")
    return DecodedFrame(np.frombuffer(raw, dtype=dtype), spec.photometric_interpretation)


def _native_frame(encoded: bytes, spec: PixelSpec) -> DecodedFrame:
    """Take one Encapsulated Uncompressed frame: its fragment, trimmed of the padding byte."""
    if spec.bits_allocated == 1:
        raise DecodeError("1-bit Encapsulated Uncompressed pixel data is not supported")
    if len(encoded) < spec.frame_bytes:
        raise DecodeError(f"frame is {len(encoded)} bytes, expected {spec.frame_bytes}")
    return DecodedFrame(
        np.frombuffer(encoded, dtype=np.uint8, count=spec.frame_bytes),
        spec.photometric_interpretation,
    )
