"""Bytes in, Explicit VR Little Endian bytes out, with the DICOM rules.

The output is assembled in one preallocated buffer (a bytearray, or a memory file the caller
gives: bridge.memfile): every element but Pixel Data is serialized first, then each frame is
decoded into its slice, straight into it where the threads decode (bridge.dicom.frames), so that
memory stays near the decoded size plus the frames in flight.
"""

from __future__ import annotations

import contextlib
import logging
import re
import struct
from collections.abc import Iterator

import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID

from bridge.dicom.codecs import (
    DECODER_CHAINS,
    DecodedFrame,
    PixelSpec,
    has_decoder,
    iter_decoded,
    missing_decoder_hint,
    split_frames,
)
from bridge.dicom.dicomfile import (
    PIXEL_DATA,
    Parsed,
    parse,
    pixel_swap_width,
    read_meta,
    swap_in_place,
    swap_to_little_endian,
    transfer_syntax_of,
)
from bridge.dicom.header import image_size
from bridge.dicom.lossy import lossy_method
from bridge.errors import (
    PROCESS_EXITS,
    BridgeError,
    DecodeError,
    TooLarge,
    UnsupportedSyntax,
    one_line,
)
from bridge.jobs import Output, Transcoded, TranscodeOptions
from bridge.uids import EXPLICIT_VR_LITTLE_ENDIAN

log = logging.getLogger(__name__)

_NATIVE_SOURCES = {
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.DeflatedExplicitVRLittleEndian,
}
_EXTENDED_OFFSET_TABLE = (0x7FE00001, 0x7FE00002)
_ICON_IMAGE_SEQUENCE = 0x00880200
_ICON_IMAGE_SEQUENCE_BYTES = struct.pack("<HH", 0x0088, 0x0200) + b"SQ"
# Guards against absurd headers, independent of the configured size limit.
_MAX_FRAMES = 2**31 - 1
_MAX_SAMPLES = 4
# What a dataset may hold besides its pixel data; real ones hold kilobytes, rarely megabytes.
_NON_PIXEL_ROOM = 64 * 1024**2
_UID_TEXT = re.compile(r"[0-9.]{1,64}")


class _Context:
    """What is known about the instance so far, for error messages."""

    def __init__(self) -> None:
        self.sop_instance_uid = ""
        self.transfer_syntax = ""

    def describe(self, reason: str) -> str:
        syntax = "unknown transfer syntax"
        if self.transfer_syntax and not _UID_TEXT.fullmatch(self.transfer_syntax):
            syntax = _shown_uid(self.transfer_syntax)
        elif self.transfer_syntax:
            name = UID(self.transfer_syntax).name
            syntax = (
                f"{name} ({self.transfer_syntax})"
                if name != self.transfer_syntax
                else self.transfer_syntax
            )
        sop = _shown_uid(self.sop_instance_uid) if self.sop_instance_uid else "unknown"
        return f"{reason} [SOP Instance UID {sop}, {syntax}]"


def _shown_uid(value: str) -> str:
    """A UID as a reason shows it: itself when it is one (PS3.5 9.1), else the start of what
    the file holds there (a length a hostile file enlarged swallows the elements after it)."""
    if _UID_TEXT.fullmatch(value):
        return value
    return f"{value[:64]!r} ({len(value)} characters, not a UID)"


def transcode(
    data: bytes | memoryview,
    options: TranscodeOptions = TranscodeOptions(),  # noqa: B008
    output: Output | None = None,
) -> Transcoded:
    """Convert a DICOM Part-10 file to Explicit VR Little Endian, keeping every UID.

    The output goes into a new bytearray, or into what `output` gives (a memory file's view).
    """
    context = _Context()
    try:
        # A view is read where it is (a memory file's mapping); anything else as bytes.
        source = data if isinstance(data, (bytes, memoryview)) else bytes(data)
        return _transcode(source, options, context, output)
    except (DecodeError, UnsupportedSyntax, TooLarge) as exc:
        raise type(exc)(context.describe(str(exc))) from None
    except (BridgeError, *PROCESS_EXITS):
        raise
    except MemoryError:
        limit = _address_space_limit()
        allowed = f"the {limit // 2**20} MiB" if limit else "the memory"
        raise DecodeError(
            context.describe(f"decoding needed more than {allowed} its process may use for it")
        ) from None
    except BaseException as exc:  # pydicom, numpy and the decoders raise anything on bad input
        # One line for the reason: pydicom puts whole tracebacks into some of its messages.
        log.debug("instance %s could not be converted", context.sop_instance_uid, exc_info=True)
        if isinstance(exc, TypeError) and isinstance(exc.__context__, UnicodeError):
            # pydicom's tag_in_exception re-raises `type(exc)(message)`, which fails for a
            # UnicodeEncodeError (a value read with replacement characters cannot be written
            # back) and leaves "function takes exactly 5 arguments": the error it was handling
            # is the reason.
            exc = exc.__context__
        raise DecodeError(context.describe(one_line(exc))) from exc


def _transcode(
    data: bytes | memoryview, options: TranscodeOptions, context: _Context, output: Output | None
) -> Transcoded:
    meta, start = read_meta(memoryview(data))
    syntax = transfer_syntax_of(meta)
    context.transfer_syntax = str(syntax)
    context.sop_instance_uid = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    parsed = parse(data, meta, start, inflate_limit(data, options.max_decoded_bytes))
    sop = _uid(parsed.dataset, "SOPInstanceUID") or context.sop_instance_uid
    context.sop_instance_uid = sop
    if not sop or not (parsed.dataset.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")):
        raise DecodeError("instance has no SOP Instance UID or no SOP Class UID")

    def forward() -> Transcoded:
        return Transcoded(data, str(syntax), sop, forwarded=True)

    if syntax == EXPLICIT_VR_LITTLE_ENDIAN:
        if parsed.encapsulated:
            raise DecodeError("transfer syntax is native but the pixel data is encapsulated")
        return forward()
    if syntax in options.forward_unchanged:
        return forward()
    if syntax not in _NATIVE_SOURCES and syntax not in DECODER_CHAINS:
        raise UnsupportedSyntax("transfer syntax cannot be decoded to native pixels")
    if syntax in DECODER_CHAINS and not has_decoder(syntax):
        raise UnsupportedSyntax(f"no decoder installed; needs {missing_decoder_hint(syntax)}")
    if parsed.pixel_value is not None and parsed.encapsulated != (syntax in DECODER_CHAINS):
        state = "encapsulated" if parsed.encapsulated else "native"
        raise DecodeError(f"pixel data is {state}, which contradicts the transfer syntax")

    dataset = parsed.dataset
    if not parsed.little_endian:
        swap_to_little_endian(dataset)
        swap_to_little_endian(parsed.tail)
    extended_offsets = _extended_offsets(dataset)
    for tag in _EXTENDED_OFFSET_TABLE:
        if tag in dataset:
            del dataset[tag]
            parsed.modified = True
    if _may_hold_icons(parsed):
        parsed.modified |= _decompress_icons(dataset, str(syntax))
    if parsed.pixel_value is None:
        return Transcoded(_allocate(parsed, 0, "OB", output)[0], str(syntax), sop, forwarded=False)

    if not parsed.encapsulated and "Rows" not in dataset:
        # Native pixel data without an Image Pixel module: nothing to check, carried verbatim.
        out = _copy_unknown_native(parsed, output)
        return Transcoded(out, str(syntax), sop, forwarded=False)
    spec = pixel_spec(dataset, options.max_decoded_bytes)
    if parsed.encapsulated:
        out = _decode_encapsulated(parsed, spec, extended_offsets, output)
    else:
        out = _copy_native(parsed, spec, output)
    return Transcoded(out, str(syntax), sop, forwarded=False)


def inflate_limit(data: bytes | memoryview, max_decoded_bytes: int) -> int:
    """How far a deflated dataset may inflate: the pixel data its header declares (within the
    size limit), and room for everything else."""
    size = image_size(data)
    pixels = min(size.total_bytes, max_decoded_bytes) if size else 0
    return pixels + _NON_PIXEL_ROOM


def pixel_spec(dataset: Dataset, max_decoded_bytes: int) -> PixelSpec:
    """Read and sanity-check the Image Pixel attributes; refuse oversized instances."""
    try:
        rows = int(dataset.Rows)
        columns = int(dataset.Columns)
        bits_allocated = int(dataset.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise DecodeError(
            f"pixel data without usable Rows/Columns/BitsAllocated: {one_line(exc)}"
        ) from exc
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    bits_stored = int(dataset.get("BitsStored", bits_allocated) or bits_allocated)
    frames_value = dataset.get("NumberOfFrames", 1)
    try:
        frames = int(frames_value) if frames_value not in (None, "") else 1
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"NumberOfFrames is not a number: {frames_value!r}") from exc
    if bits_allocated != 1 and (bits_allocated % 8 or not 8 <= bits_allocated <= 64):
        raise DecodeError(f"BitsAllocated {bits_allocated} is not 1 or a multiple of 8 up to 64")
    if not 0 < bits_stored <= bits_allocated:
        raise DecodeError(f"BitsStored {bits_stored} is not within 1..{bits_allocated}")
    if not 0 < samples <= _MAX_SAMPLES or not 0 < frames <= _MAX_FRAMES:
        raise DecodeError(f"SamplesPerPixel {samples} or NumberOfFrames {frames} is absurd")
    representation = int(dataset.get("PixelRepresentation", 0) or 0)
    if representation not in (0, 1):
        raise DecodeError(f"PixelRepresentation {representation} is neither 0 nor 1")
    if rows <= 0 or columns <= 0:
        raise DecodeError(f"image has {rows} rows and {columns} columns")
    spec = PixelSpec(
        rows=rows,
        columns=columns,
        samples_per_pixel=samples,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        pixel_representation=representation,
        photometric_interpretation=str(dataset.get("PhotometricInterpretation", "MONOCHROME2")),
        planar_configuration=int(dataset.get("PlanarConfiguration", 0) or 0),
        number_of_frames=frames,
    )
    if spec.total_bytes > max_decoded_bytes:
        raise TooLarge(
            f"declared decoded size {spec.total_bytes} bytes ({rows}x{columns}x{samples}, "
            f"{bits_allocated} bits, {frames} frames) exceeds the limit of "
            f"{max_decoded_bytes} bytes"
        )
    return spec


def _copy_native(parsed: Parsed, spec: PixelSpec, output: Output | None) -> bytearray | memoryview:
    """Re-encode native pixel data: copied as is, byte-swapped when the source is big endian."""
    value = parsed.pixel_value
    assert value is not None
    if len(value) < spec.total_bytes:
        raise DecodeError(f"pixel data is {len(value)} bytes, expected {spec.total_bytes}")
    length = len(value) + len(value) % 2
    out, offset = _allocate(parsed, length, _pixel_vr(spec.bits_allocated), output)
    out[offset : offset + len(value)] = value
    if not parsed.little_endian:
        width = pixel_swap_width(parsed.pixel_vr, spec.bits_allocated)
        swap_in_place(out, offset, len(value) // width * width, width)
    return out


def _copy_unknown_native(parsed: Parsed, output: Output | None) -> bytearray | memoryview:
    value = parsed.pixel_value
    assert value is not None
    vr = "OB" if parsed.pixel_vr == "OB" else "OW"
    out, offset = _allocate(parsed, len(value) + len(value) % 2, vr, output)
    out[offset : offset + len(value)] = value
    if not parsed.little_endian and vr == "OW":
        swap_in_place(out, offset, len(value) // 2 * 2, 2)
    return out


def _decode_encapsulated(
    parsed: Parsed, spec: PixelSpec, extended_offsets: list[int] | None, output: Output | None
) -> bytearray | memoryview:
    """Decode each frame into its slice of the preallocated output."""
    value = parsed.pixel_value
    assert value is not None
    syntax = str(parsed.transfer_syntax)
    dataset = parsed.dataset
    frames = split_frames(value, spec.number_of_frames, syntax, extended_offsets)
    method = _lossy_method(syntax, frames)
    if method:
        _mark_lossy(dataset, method)
        parsed.modified = True

    size = spec.frame_bytes
    # The output exists once the first frame has told its photometric interpretation (which
    # may change the header); the frames decoded from then on go straight into their place.
    pixels: list[memoryview] = []

    def place(index: int) -> memoryview | None:
        return pixels[0][index * size : (index + 1) * size] if pixels else None

    decoded = iter_decoded(frames, syntax, spec, place if spec.bits_allocated != 1 else None)
    with contextlib.closing(decoded):  # frames still decoding end before the output can
        first = next(decoded)
        parsed.modified |= _set_photometric(dataset, first, spec)
        length = spec.total_bytes + spec.total_bytes % 2
        out, offset = _allocate(parsed, length, _pixel_vr(spec.bits_allocated), output)
        if spec.bits_allocated == 1:
            # Frames of 1-bit data are packed back to back, not byte-aligned: pack them together.
            unpacked = [first.pixels.ravel()] + [f.pixels.ravel() for f in decoded]
            packed = np.packbits(np.concatenate(unpacked) & 1, bitorder="little")
            out[offset : offset + len(packed)] = packed.tobytes()
            return out
        pixels.append(memoryview(out)[offset : offset + spec.total_bytes])
        for index, frame in enumerate(_chain_first(first, decoded)):
            if frame.photometric_interpretation != first.photometric_interpretation:
                raise DecodeError(f"frame {index} decoded as {frame.photometric_interpretation}")
            if not frame.placed:
                start = offset + index * size
                out[start : start + size] = frame.pixels.data.cast("B")
        pixels.clear()
    return out


def _chain_first(first: DecodedFrame, rest: Iterator[DecodedFrame]) -> Iterator[DecodedFrame]:
    yield first
    yield from rest


def _extended_offsets(dataset: Dataset) -> list[int] | None:
    """Return the Extended Offset Table (7FE0,0001) as integers, when the source has one."""
    if _EXTENDED_OFFSET_TABLE[0] not in dataset:
        return None
    raw = bytes(dataset[_EXTENDED_OFFSET_TABLE[0]].value or b"")
    return list(struct.unpack(f"<{len(raw) // 8}Q", raw[: len(raw) // 8 * 8])) or None


def _lossy_method(syntax: str, frames: list[list[memoryview]]) -> str | None:
    """Return the lossy compression method when any frame's codestream is lossy."""
    for frame in frames:
        parts = frame if syntax in (uid.JPEGLSLossless, uid.JPEGLSNearLossless) else frame[:1]
        for part in parts:
            method = lossy_method(syntax, part)
            if method:
                return method
    return None


def _mark_lossy(dataset: Dataset, method: str) -> None:
    """Record lossy history; existing ratio and method values are kept, '01' is never reset."""
    dataset.LossyImageCompression = "01"
    if "LossyImageCompressionMethod" not in dataset:
        dataset.LossyImageCompressionMethod = method


def _set_photometric(dataset: Dataset, frame: DecodedFrame, spec: PixelSpec) -> bool:
    """Describe the decoded pixels; return whether that changed the dataset."""
    changed = bool(dataset.get("PhotometricInterpretation") != frame.photometric_interpretation)
    if changed:
        dataset.PhotometricInterpretation = frame.photometric_interpretation
    if spec.samples_per_pixel > 1 and dataset.get("PlanarConfiguration") != 0:
        # Decoders return colour-by-pixel samples.
        dataset.PlanarConfiguration = 0
        changed = True
    return changed


def _pixel_vr(bits_allocated: int) -> str:
    return "OB" if bits_allocated <= 8 else "OW"


def _may_hold_icons(parsed: Parsed) -> bool:
    """False only when the source bytes cannot contain an Icon Image Sequence anywhere."""
    if parsed.verbatim is None:
        return True
    # Its tag and VR as explicit little endian encodes them; any element of any item of any
    # sequence would show them. (A match inside some value only costs the slow path.)
    return any(_ICON_IMAGE_SEQUENCE_BYTES in part.tobytes() for part in parsed.verbatim)


def _decompress_icons(dataset: Dataset, syntax: str) -> bool:
    """Decode every encapsulated icon (IconImageSequence anywhere in the dataset) to native;
    return whether there was any."""
    found = False
    for elem in dataset:
        if elem.VR != "SQ":
            continue
        for item in elem.value:
            if elem.tag == _ICON_IMAGE_SEQUENCE and PIXEL_DATA in item:
                pixel = item[PIXEL_DATA]
                if pixel.is_undefined_length:
                    _decompress_icon(item, syntax)
                    found = True
            found |= _decompress_icons(item, syntax)
    return found


def _decompress_icon(item: Dataset, syntax: str) -> None:
    spec = pixel_spec(item, 64 * 1024**2)
    value = memoryview(item.PixelData)
    frames = split_frames(value, spec.number_of_frames, syntax)
    decoded = list(iter_decoded(frames, syntax, spec))
    if spec.bits_allocated == 1:
        bits = np.concatenate([f.pixels.ravel() for f in decoded]) & 1
        pixels = np.packbits(bits, bitorder="little").tobytes()
    else:
        pixels = b"".join(f.pixels.data.cast("B") for f in decoded)
    _set_photometric(item, decoded[0], spec)
    item.PixelData = pixels + b"\0" * (len(pixels) % 2)
    pixel = item[PIXEL_DATA]
    pixel.VR = _pixel_vr(spec.bits_allocated)
    pixel.is_undefined_length = False


def _file_meta(parsed: Parsed) -> FileMetaDataset:
    """Return the source meta with the new transfer syntax and the dataset's SOP identity."""
    meta = FileMetaDataset(parsed.meta)
    meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
    dataset = parsed.dataset
    if "SOPClassUID" in dataset:
        meta.MediaStorageSOPClassUID = UID(_uid(dataset, "SOPClassUID"))
    if "SOPInstanceUID" in dataset:
        meta.MediaStorageSOPInstanceUID = UID(_uid(dataset, "SOPInstanceUID"))
    # This implementation wrote the file, so it names itself (PS3.10 7.1): a bad output can then
    # be traced to the bridge rather than to the modality that produced the source.
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    return meta


def _uid(dataset: Dataset, keyword: str) -> str:
    """A UID as text, also when the sender wrote it with VR UN (kept as raw bytes, see above)."""
    value = dataset.get(keyword, "")
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").rstrip("\x00 ")


def _serialize(dataset: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, dataset)
    return fp.getvalue()


def _allocate(
    parsed: Parsed, pixel_length: int, pixel_vr: str, output: Output | None
) -> tuple[bytearray | memoryview, int]:
    """Allocate the whole output file (a bytearray, or what `output` gives) with everything
    but the pixel bytes filled in."""
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, _file_meta(parsed), enforce_standard=True)
    if parsed.verbatim is not None and not parsed.modified:
        before, tail = (bytes(part) for part in parsed.verbatim)
    else:
        before, tail = _serialize(parsed.dataset), _serialize(parsed.tail)
    prefix = head.getvalue() + before
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, pixel_vr.encode(), 0, pixel_length)
    if parsed.pixel_value is None:
        if output is None:
            return bytearray(prefix + tail), len(prefix)
        element = b""
    total = len(prefix) + len(element) + pixel_length + len(tail)
    out = bytearray(total) if output is None else output(total)
    offset = len(prefix) + len(element)
    out[: len(prefix)] = prefix
    out[len(prefix) : offset] = element
    out[offset + pixel_length :] = tail
    return out, offset


def _address_space_limit() -> int | None:
    """The address-space limit in force here (bridge.decoding.limits sets it), or None."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return None if soft == resource.RLIM_INFINITY else soft
