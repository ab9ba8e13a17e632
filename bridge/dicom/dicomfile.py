"""Part-10 parsing that leaves the pixel data where it is, and big-endian to little-endian swaps."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO, cast

import numpy as np
import pydicom.config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from bridge.dicom.header import LONG_VRS
from bridge.dicom.vr import resolve as resolve_vrs
from bridge.errors import DecodeError, TooLarge

# An element the sender wrote with VR UN is kept as UN, byte for byte, as DCMTK does: pydicom
# would otherwise re-encode it with the dictionary's VR, and when that element is an identifier
# (PatientID...) Orthanc then files the copy under another ID. Set here, once for the process,
# as every pydicom read of the bridge's imports this module first (the transcoder, so the
# decoding processes and their parent; the Implicit VR path; Dask workers through those).
# Never saved, set and restored around a call: transfer threads convert at once, and one
# restoring it would change it under another still reading.
pydicom.config.replace_un_with_known_vr = False

PIXEL_DATA = 0x7FE00010
ITEM = 0xE000FFFE  # (FFFE,E000) read as one little-endian uint32
SEQUENCE_DELIMITER = 0xE0DDFFFE
_VALID_VRS = LONG_VRS | {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
    b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
}  # fmt: skip
# Byte width of the values that pydicom keeps as raw bytes and that therefore still carry the
# big-endian order. UN is left alone: its value's structure is unknown, so no swap can be right.
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


@dataclass
class Parsed:
    """A Part-10 file split around its top-level Pixel Data element."""

    meta: FileMetaDataset
    transfer_syntax: UID
    implicit_vr: bool
    little_endian: bool
    dataset: Dataset  # every element before Pixel Data
    tail: Dataset  # every element after Pixel Data (usually none)
    pixel_vr: str  # as encoded in the source; "" when implicit VR or absent
    pixel_value: memoryview | None  # a view into the source, never a copy
    encapsulated: bool
    # The encoded bytes of `dataset` and `tail` as they are in the source, when they are
    # already Explicit VR Little Endian (every compressed syntax): while nothing in the dataset
    # changes, they are copied rather than parsed and written again (2 ms per CT slice).
    verbatim: tuple[memoryview, memoryview] | None = None
    modified: bool = False  # set by whoever changes `dataset` or `tail`


def read_meta(buf: memoryview) -> tuple[FileMetaDataset, int]:
    """Return the File Meta Information and the offset where the dataset starts."""
    if len(buf) < 132 or bytes(buf[128:132]) != b"DICM":
        raise DecodeError("not a DICOM Part-10 file: no 'DICM' prefix, file meta is missing")
    pos = 132
    while pos + 8 <= len(buf):
        group = struct.unpack_from("<H", buf, pos)[0]
        if group != 0x0002:
            break
        vr = bytes(buf[pos + 4 : pos + 6])
        if vr in LONG_VRS:
            pos += 12 + struct.unpack_from("<I", buf, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", buf, pos + 6)[0]
    if pos > len(buf):
        raise DecodeError("file meta information is truncated")
    meta = FileMetaDataset(
        read_dataset(BytesIO(buf[132:pos].tobytes()), is_implicit_VR=False, is_little_endian=True)
    )
    if "TransferSyntaxUID" not in meta or not meta.TransferSyntaxUID:
        raise DecodeError("file meta information has no Transfer Syntax UID")
    return meta, pos


def encoding_of(transfer_syntax: UID) -> tuple[bool, bool, bool]:
    """Return (implicit VR, little endian, deflated); unknown syntaxes are explicit LE."""
    if transfer_syntax.is_transfer_syntax:
        return (
            transfer_syntax.is_implicit_VR,
            transfer_syntax.is_little_endian,
            transfer_syntax.is_deflated,
        )
    return False, True, False


def _stop_at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) == PIXEL_DATA


def transfer_syntax_of(meta: FileMetaDataset) -> UID:
    """Return the Transfer Syntax UID of the file meta, without padding."""
    return UID(str(meta.TransferSyntaxUID).strip("\0 "))


def parse(
    data: bytes | memoryview, meta: FileMetaDataset, start: int, inflate_limit: int
) -> Parsed:
    """Parse the dataset of `data` around its Pixel Data without copying the pixel data.

    A deflated dataset is inflated up to `inflate_limit` bytes, no further.
    """
    transfer_syntax = transfer_syntax_of(meta)
    implicit, little, deflated = encoding_of(transfer_syntax)
    source = data
    if deflated:
        source = inflate(memoryview(data)[start:], inflate_limit)
        start = 0
    buf = memoryview(source)
    implicit = _detect_vr_encoding(buf, start, implicit, little)
    # BytesIO over a bytes object shares its buffer: no copy of the (large) input is made.
    # It would copy any other buffer (a memory file's mapping): that is read where it is.
    fp = BytesIO(source) if isinstance(source, bytes) else cast(BinaryIO, _ViewReader(buf))
    fp.seek(start)
    dataset = read_dataset(fp, implicit, little, stop_when=_stop_at_pixel_data)
    pos = fp.tell()
    pixel_vr, pixel_value, encapsulated = "", None, False
    end = pos
    if pos + 8 <= len(buf):
        order = "<" if little else ">"
        if implicit:
            length = struct.unpack_from(f"{order}I", buf, pos + 4)[0]
            value_start = pos + 8
        else:
            pixel_vr = bytes(buf[pos + 4 : pos + 6]).decode("ascii", "replace")
            length = struct.unpack_from(f"{order}I", buf, pos + 8)[0]
            value_start = pos + 12
        if length == 0xFFFFFFFF:
            encapsulated = True
            end = find_sequence_end(buf, value_start)
            pixel_value = buf[value_start : end - 8]
        else:
            end = value_start + length
            if end > len(buf):
                raise DecodeError(
                    f"pixel data is truncated: {len(buf) - value_start} of {length} bytes present"
                )
            pixel_value = buf[value_start:end]
    fp.seek(end)
    tail = read_dataset(fp, implicit, little)
    if implicit:
        # Before anything reads a value: pydicom would decide some VRs its own way on access.
        resolve_vrs(dataset)
        resolve_vrs(tail)
    verbatim = None
    if little and not implicit and not deflated and pixel_value is not None:
        verbatim = (buf[start:pos], buf[end:])
    return Parsed(
        meta,
        transfer_syntax,
        implicit,
        little,
        dataset,
        tail,
        pixel_vr,
        pixel_value,
        encapsulated,
        verbatim,
    )


class _ViewReader:
    """The reading side of a file over a buffer, which it never copies whole (pydicom reads a
    dataset through read, seek and tell)."""

    def __init__(self, buf: memoryview) -> None:
        self._buf = buf
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._buf) if size < 0 else min(len(self._buf), self._pos + size)
        data = self._buf[self._pos : end].tobytes()
        self._pos = max(self._pos, end)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, pos + (0, self._pos, len(self._buf))[whence])
        return self._pos

    def tell(self) -> int:
        return self._pos


def inflate(deflated: memoryview, limit: int) -> bytes:
    """The inflated dataset; a DecodeError as soon as it would grow beyond `limit` bytes."""
    # A stream, stopped at the limit: a deflate bomb (269 KB holding 1.5 GiB of zeros) must
    # not allocate what it would inflate to before its size can be judged.
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(deflated, limit + 1)
    except zlib.error as exc:
        raise DecodeError(f"deflated dataset cannot be inflated: {exc}") from exc
    if len(inflated) > limit:
        raise TooLarge(
            f"the deflated dataset inflates to more than {limit} bytes ({len(deflated)} bytes "
            "deflated), beyond what its image needs"
        )
    return inflated


def _detect_vr_encoding(buf: memoryview, start: int, implicit: bool, little: bool) -> bool:
    """Return whether the dataset really is implicit VR, as pydicom and DCMTK detect it."""
    # Some writers label implicit VR datasets as explicit (and back); the first element tells
    # without ambiguity, and pydicom follows it anyway, so the pixel data header must too.
    if start + 6 > len(buf):
        return implicit
    declared = struct.unpack_from("<H" if little else ">H", buf, start)[0]
    swapped_group = struct.unpack_from(">H" if little else "<H", buf, start)[0]
    if swapped_group < 0x0100 <= declared and declared & 0xFF == 0:
        # The first group is nearly always a small one (0008 usually): read in the wrong byte
        # order it becomes 0x0800, while a genuine private group like 3F03 stays alone.
        raise DecodeError("byte order of the dataset contradicts the transfer syntax")
    looks_explicit = bytes(buf[start + 4 : start + 6]) in _VALID_VRS
    if not little and not looks_explicit:
        raise DecodeError("transfer syntax says explicit VR big endian but the dataset is not")
    return not looks_explicit


def swap_to_little_endian(dataset: Dataset) -> None:
    """Byte-swap, in place and recursively, the raw-byte values read from a big-endian dataset."""
    bits_allocated = dataset.get("BitsAllocated")
    for elem in dataset:
        if elem.VR == "SQ":
            for item in elem.value:
                swap_to_little_endian(item)
            continue
        width = _SWAP_WIDTH.get(elem.VR)
        if not width or not elem.value:
            continue
        if elem.tag == PIXEL_DATA:
            width = pixel_swap_width(elem.VR, bits_allocated)
        elem.value = swapped(elem.value, width)


def pixel_swap_width(vr: str, bits_allocated: int | None) -> int:
    """Return the swap width for big-endian Pixel Data: one pixel cell, or a 16-bit OW word."""
    # 8-bit and 1-bit data as OW are 16-bit words (DCMTK agrees); OB is a byte stream. Cells of
    # 32 or 64 bits are stored most significant byte first, as pydicom reads them.
    if vr == "OB":
        return 1
    if bits_allocated in (32, 64):
        return bits_allocated // 8
    return 2


def swapped(value: bytes, width: int) -> bytes:
    """Return `value` with every `width`-byte word reversed (a trailing odd byte is kept)."""
    if width <= 1:
        return value
    whole = len(value) // width * width
    arr = np.frombuffer(value, dtype=np.uint8, count=whole).reshape(-1, width)[:, ::-1]
    return arr.tobytes() + value[whole:]


def swap_in_place(buf: bytearray | memoryview, offset: int, length: int, width: int) -> None:
    """Reverse every `width`-byte word of buf[offset:offset+length] without another copy."""
    if width <= 1:
        return
    count = length // width
    dtype = {2: np.uint16, 4: np.uint32, 8: np.uint64}[width]
    np.frombuffer(buf, dtype=dtype, count=count, offset=offset).byteswap(inplace=True)


def find_sequence_end(buf: memoryview, start: int) -> int:
    """Return the offset just past the delimiter of encapsulated data starting at `start`."""
    pos = start
    while pos + 8 <= len(buf):
        tag, length = struct.unpack_from("<II", buf, pos)
        if tag == SEQUENCE_DELIMITER:
            return pos + 8
        if tag != ITEM or length == 0xFFFFFFFF:
            raise DecodeError(f"encapsulated pixel data has a bad item tag at byte {pos}")
        pos += 8 + length
    raise DecodeError("encapsulated pixel data is truncated (no sequence delimiter)")
