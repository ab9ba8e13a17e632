"""Explicit VR Little Endian in, Implicit VR Little Endian out: for targets that need it.

Both syntaxes are native and little endian: only how each element states its VR changes, never
a value, so pixel data stays byte for byte. Done in the transfer thread, after decoding, and
only for a target whose `syntax` asks for it (a legacy workstation).

The dataset is rewritten as a byte stream: each element's header loses its VR, sequences are
walked into, and defined lengths are computed again (a long-VR header shrinks by 4 bytes).
pydicom's read-and-write took 25 ms per CT slice, as long as decoding it; this takes well under
a millisecond. What the walker does not handle (an undefined-length element other than a
sequence, a truncated file) goes through pydicom instead.
"""

from __future__ import annotations

import io
import logging
import struct

from bridge.dicom.header import LONG_VRS
from bridge.errors import DecodeError, one_line
from bridge.uids import IMPLICIT_VR_LITTLE_ENDIAN

log = logging.getLogger(__name__)

_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xE000, 0xE00D, 0xE0DD
_HEADER = struct.Struct("<HH")
_IMPLICIT = struct.Struct("<HHI")


class _Unusual(Exception):
    """Something the byte walker leaves to pydicom."""


def to_implicit(data: bytes | bytearray | memoryview) -> bytes:
    """The Part-10 file `data` (native, little endian) rewritten in Implicit VR Little Endian."""
    # pydicom only now: the main process never loads it unless a target asks for this.
    from bridge.dicom.dicomfile import read_meta

    buf = memoryview(data)
    meta, start = read_meta(buf)
    try:
        chunks: list[bytes | memoryview] = []
        _rewrite(buf, start, len(buf), chunks)
    except (_Unusual, struct.error):
        return _through_pydicom(data)
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID

    meta.TransferSyntaxUID = UID(IMPLICIT_VR_LITTLE_ENDIAN)
    head = DicomBytesIO()
    head.write(bytes(buf[:132]))  # the preamble and "DICM", as they came
    write_file_meta_info(head, meta, enforce_standard=True)
    return head.getvalue() + b"".join(chunks)


def _rewrite(buf: memoryview, pos: int, end: int, out: list[bytes | memoryview]) -> int:
    """Rewrite the Explicit VR elements in buf[pos:end] into `out`; the bytes written.

    Stops early at an item delimiter (the end of an undefined-length item) and returns with
    `pos` past it, which the caller reads back from the returned position.
    """
    written = 0
    while pos < end:
        group, element = _HEADER.unpack_from(buf, pos)
        if group == 0xFFFE:
            raise _Unusual("a delimiter outside a sequence")
        vr = bytes(buf[pos + 4 : pos + 6])
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<I", buf, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", buf, pos + 6)
            pos += 8
        if vr == b"SQ":
            pos, size = _sequence(buf, pos, length, out, group, element)
            written += size
            continue
        if length == _UNDEFINED or pos + length > end:
            raise _Unusual("an undefined or impossible length")
        out.append(_IMPLICIT.pack(group, element, length))
        out.append(buf[pos : pos + length])
        pos += length
        written += 8 + length
    return written


def _sequence(
    buf: memoryview, pos: int, length: int, out: list[bytes | memoryview], group: int, element: int
) -> tuple[int, int]:
    """Rewrite one sequence's items; (the position after it, the bytes written for it)."""
    header_at = len(out)
    out.append(b"")  # the sequence's header, once its new length is known
    body = 0
    end = len(buf) if length == _UNDEFINED else pos + length
    while pos < end:
        tag_group, tag_element, item_length = struct.unpack_from("<HHI", buf, pos)
        pos += 8
        if tag_group != 0xFFFE:
            raise _Unusual("an element where an item was expected")
        if tag_element == _SEQUENCE_END:
            break
        if tag_element != _ITEM:
            raise _Unusual("an unexpected delimiter in a sequence")
        item_at = len(out)
        out.append(b"")
        if item_length == _UNDEFINED:
            size, pos = _undefined_item(buf, pos, out)
            out[item_at] = _IMPLICIT.pack(0xFFFE, _ITEM, _UNDEFINED)
            out.append(_IMPLICIT.pack(0xFFFE, _ITEM_END, 0))
            body += 16 + size
        else:
            size = _rewrite(buf, pos, pos + item_length, out)
            pos += item_length
            out[item_at] = _IMPLICIT.pack(0xFFFE, _ITEM, size)
            body += 8 + size
    if length == _UNDEFINED:
        out[header_at] = _IMPLICIT.pack(group, element, _UNDEFINED)
        out.append(_IMPLICIT.pack(0xFFFE, _SEQUENCE_END, 0))
        return pos, 8 + body + 8
    out[header_at] = _IMPLICIT.pack(group, element, body)
    return pos, 8 + body


def _undefined_item(buf: memoryview, pos: int, out: list[bytes | memoryview]) -> tuple[int, int]:
    """Rewrite the elements of an undefined-length item; (bytes written, position after it)."""
    written = 0
    while True:
        group, element = _HEADER.unpack_from(buf, pos)
        if group == 0xFFFE and element == _ITEM_END:
            return written, pos + 8
        # One element at a time: find where it ends by reading its header.
        vr = bytes(buf[pos + 4 : pos + 6])
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<I", buf, pos + 8)
            size = 12 + (0 if length == _UNDEFINED else length)
        else:
            (length,) = struct.unpack_from("<H", buf, pos + 6)
            size = 8 + length
        if vr == b"SQ":
            group_element = _HEADER.unpack_from(buf, pos)
            pos, used = _sequence(buf, pos + 12, length, out, *group_element)
            written += used
            continue
        if length == _UNDEFINED:
            raise _Unusual("an undefined length in an item")
        written += _rewrite(buf, pos, pos + size, out)
        pos += size


def _through_pydicom(data: bytes | bytearray | memoryview) -> bytes:
    import pydicom
    from pydicom.uid import UID

    # An element the sender wrote as UN stays UN: bridge.dicom.dicomfile, imported by now, says so.
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        dataset.file_meta.TransferSyntaxUID = UID(IMPLICIT_VR_LITTLE_ENDIAN)
        out = io.BytesIO()
        pydicom.dcmwrite(
            out, dataset, implicit_vr=True, little_endian=True, enforce_file_format=True
        )
    except Exception as exc:  # pydicom raises anything on data it cannot write
        log.debug("pydicom cannot write it in Implicit VR Little Endian", exc_info=True)
        raise DecodeError(f"cannot write it in Implicit VR Little Endian: {one_line(exc)}") from exc
    return out.getvalue()
