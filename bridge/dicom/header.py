"""How many bytes an instance will decode to, read from its header in the main process.

The byte budget must count a decoded copy before it exists: a transfer thread that waited for
room only after reading its decoded file from a worker would hold that file uncounted meanwhile.
pydicom is not loaded here (it stays in the decoding processes, see bridge.decoding.pool), so this
walks the few elements before (0028,0100) itself. Anything it cannot read simply returns None:
the budget then counts the decoded copy when it arrives, as it always does.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Collection
from dataclasses import dataclass

from bridge.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)

_DICM = b"DICM"
# VRs with a 2-byte reserved field and a 4-byte length in explicit VR encodings.
LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_ROWS, _COLUMNS, _SAMPLES, _FRAMES, _BITS = (
    0x00280010,
    0x00280011,
    0x00280002,
    0x00280008,
    0x00280100,
)
_WANTED = {_ROWS, _COLUMNS, _SAMPLES, _FRAMES, _BITS}
_SOP_CLASS, _SOP_INSTANCE, _STUDY, _SERIES = 0x00080016, 0x00080018, 0x0020000D, 0x0020000E
_UIDS = {_SOP_CLASS, _SOP_INSTANCE, _STUDY, _SERIES}
_INFLATE_AT_MOST = 1 << 20  # the image attributes come long before the first MiB
_MAX_ELEMENTS = 100_000


class _Unreadable(Exception):
    """The header is not what this simple reader expects."""


@dataclass(frozen=True)
class ImageSize:
    """The native size of an instance's pixel data, as its header declares it."""

    frame_bytes: int  # one frame, one byte per sample when 1-bit (as decoders return it)
    total_bytes: int  # every frame, bit-packed when 1-bit


def decoded_size(data: bytes | bytearray | memoryview, limit: int | None = None) -> int | None:
    """The native size of the pixel data the header declares, at most `limit`; None when the
    header cannot tell or declares an impossible image (never negative)."""
    size = image_size(data)
    if size is None:
        return None
    return size.total_bytes if limit is None else min(size.total_bytes, limit)


def image_size(data: bytes | bytearray | memoryview) -> ImageSize | None:
    """Frame and total sizes of the pixel data the header declares, or None when it cannot
    tell or the values are impossible (a zero or negative count, BitsAllocated 0)."""
    try:
        values = _image_attributes(memoryview(data))
    except (_Unreadable, struct.error, ValueError, zlib.error, RecursionError):
        return None  # RecursionError: sequences nested thousands deep, a hostile file
    try:
        rows, columns, bits = values[_ROWS], values[_COLUMNS], values[_BITS]
    except KeyError:
        return None  # no image, or not one this reader understands
    samples = values.get(_SAMPLES, 1) or 1  # 0 is read as 1, as the transcoder reads it
    frames = values.get(_FRAMES, 1)
    if min(rows, columns, bits, samples, frames) <= 0:
        return None  # NumberOfFrames "-1" or "0": the decoder refuses such a header anyway
    pixels = rows * columns * samples
    if bits == 1:
        return ImageSize(pixels, (pixels * frames + 7) // 8)
    frame = pixels * ((bits + 7) // 8)
    return ImageSize(frame, frame * frames)


def transfer_syntax(data: bytes | bytearray | memoryview) -> str | None:
    """The transfer syntax UID the file meta declares, or None when it cannot be read.

    For the ledger, logs and metrics of an instance that fails before a decoder names it.
    """
    try:
        syntax, _ = _file_meta(memoryview(data))
    except (_Unreadable, struct.error, ValueError):
        return None
    return syntax if 0 < len(syntax) <= 64 else None  # a UID has at most 64 characters


@dataclass(frozen=True)
class Identifiers:
    """The UIDs that name an instance, as its file declares them."""

    study: str
    series: str
    sop_instance: str
    sop_class: str  # "" when the file lacks it


def identifiers(data: bytes | bytearray | memoryview) -> Identifiers | None:
    """The study, series, SOP instance and SOP class UIDs of a DICOM file; None when they
    cannot be read or the study, series or SOP instance UID is missing."""
    try:
        values, _ = _values(memoryview(data), _UIDS, _SERIES)
    except (_Unreadable, struct.error, ValueError, zlib.error, RecursionError):
        return None
    uids = {tag: value.rstrip(b"\0 ").decode("ascii", "replace") for tag, value in values.items()}
    found = Identifiers(
        uids.get(_STUDY, ""),
        uids.get(_SERIES, ""),
        uids.get(_SOP_INSTANCE, ""),
        uids.get(_SOP_CLASS, ""),
    )
    return found if found.study and found.series and found.sop_instance else None


@dataclass(frozen=True)
class MetaUIDs:
    """The UIDs a file's meta names: what a C-STORE needs to choose its presentation context."""

    sop_class: str
    sop_instance: str
    transfer_syntax: str


def meta_uids(data: bytes | bytearray | memoryview) -> MetaUIDs | None:
    """The SOP class, SOP instance and transfer syntax UIDs of the file meta, or None when it
    cannot be read or lacks one of them."""
    try:
        values, _ = _meta_values(memoryview(data))
    except (_Unreadable, struct.error, ValueError):
        return None
    uids = [values.get(tag, "") for tag in (0x00020002, 0x00020003, 0x00020010)]
    if not all(0 < len(uid) <= 64 for uid in uids):
        return None
    return MetaUIDs(*uids)


def _file_meta(data: memoryview) -> tuple[str, int]:
    """The transfer syntax UID ("" if absent) and where the dataset after the meta begins."""
    values, pos = _meta_values(data)
    return values.get(0x00020010, ""), pos


def _meta_values(data: memoryview) -> tuple[dict[int, str], int]:
    """The file meta's UI values by tag, and where the dataset after the meta begins."""
    if len(data) < 132 or bytes(data[128:132]) != _DICM:
        raise _Unreadable("no DICM preamble")
    reader = _Reader(data, 132, little=True, implicit=False)
    values: dict[int, str] = {}
    while reader.pos < len(data) and reader.peek_group() == 0x0002:
        tag, value = reader.element()
        if tag in (0x00020002, 0x00020003, 0x00020010) and value is not None:
            values[tag] = bytes(value).rstrip(b"\0 ").decode("ascii")
    return values, reader.pos


def _image_attributes(data: memoryview) -> dict[int, int]:
    values, little = _values(data, _WANTED, _BITS)
    return {tag: _number(tag, raw, little) for tag, raw in values.items()}


def _values(data: memoryview, wanted: Collection[int], last: int) -> tuple[dict[int, bytes], bool]:
    """The raw values of the `wanted` top-level elements (none after tag `last`), and whether
    the dataset is little endian."""
    syntax, start = _file_meta(data)
    body = data
    if syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        body = memoryview(
            zlib.decompressobj(-zlib.MAX_WBITS).decompress(data[start:], _INFLATE_AT_MOST)
        )
        reader = _Reader(body, 0, little=True, implicit=False)
    else:
        reader = _Reader(
            body,
            start,
            little=syntax != EXPLICIT_VR_BIG_ENDIAN,
            implicit=syntax == IMPLICIT_VR_LITTLE_ENDIAN,
        )
    values: dict[int, bytes] = {}
    for _ in range(_MAX_ELEMENTS):
        if reader.pos >= len(body):
            break
        tag, value = reader.element()
        if tag > last:
            break
        if tag in wanted and value is not None:
            values[tag] = bytes(value)
    return values, reader.little


def _number(tag: int, raw: bytes, little: bool) -> int:
    if tag == _FRAMES:  # IS: a decimal string
        text = raw.rstrip(b"\0 ").strip()
        return int(text) if text else 1
    if len(raw) < 2:
        raise _Unreadable("short US value")
    return int.from_bytes(raw[:2], "little" if little else "big")


class _Reader:
    """Walks data elements, skipping sequences of any depth."""

    def __init__(self, data: memoryview, pos: int, *, little: bool, implicit: bool) -> None:
        self.data = data
        self.pos = pos
        self.little = little
        self.implicit = implicit
        self._order = "<" if little else ">"

    def peek_group(self) -> int:
        (group,) = struct.unpack_from("<H", self.data, self.pos)  # the meta is always LE
        return int(group)

    def _peek_tag(self) -> int:
        group, element = struct.unpack_from(self._order + "HH", self.data, self.pos)
        return int(group) << 16 | int(element)

    def _tag(self) -> int:
        tag = self._peek_tag()
        self.pos += 4
        return tag

    def element(self) -> tuple[int, memoryview | None]:
        """The next element's tag and value (None for a sequence, which is skipped)."""
        tag = self._tag()
        if tag >> 16 == 0xFFFE:
            raise _Unreadable("item outside a sequence")
        if self.implicit:
            vr = b""
            (length,) = struct.unpack_from(self._order + "I", self.data, self.pos)
            self.pos += 4
        else:
            vr = bytes(self.data[self.pos : self.pos + 2])
            if vr in LONG_VRS:
                (length,) = struct.unpack_from(self._order + "I", self.data, self.pos + 4)
                self.pos += 8
            else:
                (length,) = struct.unpack_from(self._order + "H", self.data, self.pos + 2)
                self.pos += 4
        if length == _UNDEFINED:
            self._skip_sequence()
            return tag, None
        end = self.pos + length
        if end > len(self.data):
            raise _Unreadable("element runs past the end")
        value = self.data[self.pos : end]
        self.pos = end
        return tag, None if vr == b"SQ" else value

    def _skip_sequence(self) -> None:
        """Move past a sequence (or encapsulated data) of undefined length."""
        while True:
            tag = self._tag()
            (length,) = struct.unpack_from(self._order + "I", self.data, self.pos)
            self.pos += 4
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM:
                raise _Unreadable("expected an item")
            if length != _UNDEFINED:
                self.pos += length
                continue
            while True:  # an item of undefined length: its elements, up to the item end
                if self._peek_tag() == _ITEM_END:
                    self.pos += 8
                    break
                self.element()
