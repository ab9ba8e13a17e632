"""What each encoded frame declares, read from its codestream before any decoder sees it.

Decoders trust the codestream, not the DICOM header: OpenJPEG allocates the image its SIZ marker
declares (2 GiB for a 9 KB file whose SIZ was changed), and GDCM aborts or segfaults its process
on frames whose markers disagree with the header. So each frame's header is walked here, in
Python, and compared with the Image Pixel attributes; a frame that disagrees is refused with
both values named, and no decoder is ever called on it.

The walk also finds where the codestream really ends. Whatever follows its end marker is
padding, which DCMTK and GDCM ignore whatever its value (a space padding an odd-length
fragment, zeros, 0xFF fill, a few stray bytes), and so does the bridge.

What real files legitimately do is accepted: a precision below BitsAllocated (J2K precision 8
in a BitsAllocated 16 instance), a precision different from BitsStored, an RGB codestream under
a YBR header, a JPEG process other than the one the transfer syntax names.
"""

from __future__ import annotations

import itertools
import re
import struct
from dataclasses import dataclass
from typing import Protocol

from bridge.dicom.jpegls_presets import Presets, check_presets
from bridge.errors import DecodeError
from bridge.uids import (
    HTJ2K,
    HTJ2K_LOSSLESS,
    HTJ2K_LOSSLESS_RPCL,
    JPEG_2000,
    JPEG_2000_LOSSLESS,
    JPEG_BASELINE,
    JPEG_EXTENDED,
    JPEG_LOSSLESS,
    JPEG_LOSSLESS_SV1,
    JPEG_LS_LOSSLESS,
    JPEG_LS_NEAR_LOSSLESS,
    RLE_LOSSLESS,
)

_JPEG = {JPEG_BASELINE, JPEG_EXTENDED, JPEG_LOSSLESS, JPEG_LOSSLESS_SV1}
_JPEG_LS = {JPEG_LS_LOSSLESS, JPEG_LS_NEAR_LOSSLESS}
# HTJ2K has the same SIZ/COD/SOT structure.
_J2K = {JPEG_2000_LOSSLESS, JPEG_2000, HTJ2K_LOSSLESS, HTJ2K_LOSSLESS_RPCL, HTJ2K}
_RLE = RLE_LOSSLESS

# JPEG (T.81) and JPEG-LS (T.87) markers.
_SOI, _EOI, _SOS, _DNL = 0xFFD8, 0xFFD9, 0xFFDA, 0xFFDC
_SOF55, _LSE = 0xFFF7, 0xFFF8
# Start-of-frame markers of every JPEG process; C4 (DHT), C8 (JPG) and CC (DAC) are not.
_SOF = {0xFFC0, 0xFFC1, 0xFFC2, 0xFFC3, 0xFFC5, 0xFFC6, 0xFFC7}
_SOF |= {0xFFC9, 0xFFCA, 0xFFCB, 0xFFCD, 0xFFCE, 0xFFCF}
# Precisions each process allows (T.81 B.2.2); lossless and JPEG-LS allow 2 to 16.
_DCT_PRECISION = {0xFFC0: (8,)}
_LOSSLESS_SOF = {0xFFC3, 0xFFC7, 0xFFCB, 0xFFCF}
# Markers with no length field: SOI, EOI, RSTn and TEM.
_STANDALONE = {_SOI, _EOI, 0xFF01, *range(0xFFD0, 0xFFD8)}
# The end of an entropy-coded segment: 0xFF followed by anything but a stuffed 0x00, a restart
# marker or fill bytes (T.81 B.1.1.5); in JPEG-LS any byte with its top bit set (T.87 A.1).
_JPEG_MARKER = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")
_JPEG_LS_MARKER = re.compile(rb"\xff[\x80-\xff]")

# JPEG 2000 (T.800) markers.
_SOC_SIZ = b"\xff\x4f\xff\x51"
_J2K_COD, _J2K_SOT, _J2K_EOC = 0xFF52, 0xFF90, 0xFFD9
_MAX_TILES = 65535  # Isot is 16 bits wide (T.800 A.4.2)


class ImageHeader(Protocol):
    """The Image Pixel attributes a frame is compared with (bridge.dicom.codecs.PixelSpec)."""

    @property
    def rows(self) -> int: ...
    @property
    def columns(self) -> int: ...
    @property
    def samples_per_pixel(self) -> int: ...
    @property
    def bits_allocated(self) -> int: ...


@dataclass(frozen=True)
class Declared:
    """What a frame's codestream says about the image it holds."""

    rows: int
    columns: int
    components: int
    precision: int
    end: int  # offset just past the end marker: whatever follows is padding
    start: int = 0  # where the codestream starts: a JP2 file's boxes come before it


def check_frame(transfer_syntax: str, frame: bytes, spec: ImageHeader) -> tuple[int, int]:
    """Refuse a frame whose codestream is malformed or disagrees with the header; return where
    the codestream starts and ends within it (the whole frame for unchecked syntaxes)."""
    if transfer_syntax == _RLE:
        _check_rle(frame, spec)
        return 0, len(frame)
    declared = read_declared(transfer_syntax, frame)
    if declared is None:
        return 0, len(frame)
    if transfer_syntax not in _J2K and spec.bits_allocated not in (8, 16):
        # JPEG samples are at most 16 bits: GDCM aborts when asked for 24- or 64-bit cells.
        raise DecodeError(f"BitsAllocated {spec.bits_allocated} cannot hold JPEG samples")
    for name, ours, theirs in (
        ("rows", declared.rows, spec.rows),
        ("columns", declared.columns, spec.columns),
        ("components", declared.components, spec.samples_per_pixel),
    ):
        if ours != theirs:
            header = "SamplesPerPixel" if name == "components" else name.capitalize()
            raise DecodeError(
                f"the codestream declares {ours} {name}, the DICOM header {header} {theirs}"
            )
    if declared.precision > max(spec.bits_allocated, 8):
        raise DecodeError(
            f"the codestream declares a precision of {declared.precision} bits, more than "
            f"BitsAllocated {spec.bits_allocated}"
        )
    return declared.start, declared.end


def read_declared(transfer_syntax: str, frame: bytes) -> Declared | None:
    """The image a JPEG, JPEG-LS or JPEG 2000 frame declares; None for other syntaxes."""
    try:
        if transfer_syntax in _JPEG or transfer_syntax in _JPEG_LS:
            return _JpegWalk(frame, ls=transfer_syntax in _JPEG_LS).run()
        if transfer_syntax in _J2K:
            return _read_j2k(frame)
    except struct.error:
        raise DecodeError("the codestream is truncated inside a marker segment") from None
    return None


class _JpegWalk:
    """Walks the marker segments and scans of a JPEG or JPEG-LS codestream up to EOI."""

    def __init__(self, frame: bytes, ls: bool) -> None:
        self.frame = frame
        self.ls = ls
        self.kind = "JPEG-LS" if ls else "JPEG"
        self.sof: tuple[int, int, int, int] | None = None  # precision, rows, columns, components
        self.lse_size: tuple[int, int] | None = None  # rows, columns from an LSE oversize segment
        self.dnl_rows: int | None = None
        self.presets: tuple[Presets, int] | None = None  # the LSE id 1 in force, its offset

    def run(self) -> Declared:
        frame = self.frame
        if not frame.startswith(b"\xff\xd8"):
            raise DecodeError(f"the {self.kind} codestream does not start with SOI")
        pos = 2
        scans = 0
        while True:
            while frame[pos : pos + 2] == b"\xff\xff":  # fill bytes before a marker
                pos += 1
            if pos + 2 > len(frame):
                raise DecodeError(f"the {self.kind} codestream is truncated: no EOI marker")
            (marker,) = struct.unpack_from(">H", frame, pos)
            if marker >> 8 != 0xFF or marker == 0xFF00:
                raise DecodeError(
                    f"the {self.kind} codestream has no marker at byte {pos} where one must be "
                    "(a segment length is wrong)"
                )
            if marker == _EOI:
                return self._declared(pos + 2, scans)
            if marker in _STANDALONE:
                pos += 2
                continue
            (length,) = struct.unpack_from(">H", frame, pos + 2)
            if length < 2 or pos + 2 + length > len(frame):
                raise DecodeError(
                    f"the {self.kind} marker 0x{marker:04X} at byte {pos} has a length of "
                    f"{length}, which does not fit the codestream"
                )
            segment = frame[pos + 4 : pos + 2 + length]
            self._segment(marker, segment, pos)
            pos += 2 + length
            if marker == _SOS:
                if self.sof is None:
                    raise DecodeError(f"the {self.kind} codestream has a scan before its frame")
                scans += 1
                pos = self._skip_scan(pos)

    def _segment(self, marker: int, segment: bytes, pos: int) -> None:
        if marker in _SOF or marker == _SOF55:
            if self.sof is not None:
                raise DecodeError(f"the {self.kind} codestream has two frame headers")
            if (marker == _SOF55) != self.ls:
                # A JPEG-LS codestream labelled JPEG, or the reverse: libjpeg decodes both, so
                # the scans are read the way the frame header says.
                self.ls = marker == _SOF55
                self.kind = "JPEG-LS" if self.ls else "JPEG"
            precision, rows, columns, components = struct.unpack_from(">BHHB", segment)
            if len(segment) != 6 + 3 * components:
                raise DecodeError(
                    f"the {self.kind} frame header is {len(segment) + 2} bytes long for "
                    f"{components} components"
                )
            self._check_precision(marker, precision)
            self.sof = (precision, rows, columns, components)
        elif marker == _LSE and self.ls and segment[:1] == b"\x04":
            # Oversize image dimensions (T.87 C.2.4.1.4): rows and columns wider than 16 bits.
            width = segment[1] if len(segment) > 1 else 0
            if width not in (2, 3, 4) or len(segment) < 2 + 2 * width:
                raise DecodeError(f"the JPEG-LS size segment at byte {pos} is malformed")
            rows = int.from_bytes(segment[2 : 2 + width], "big")
            columns = int.from_bytes(segment[2 + width : 2 + 2 * width], "big")
            self.lse_size = (rows, columns)
        elif marker == _LSE and self.ls and segment[:1] == b"\x01":
            self.presets = (Presets.parse(segment, pos), pos)
        elif marker == _SOS and self.ls and self.presets and self.sof:
            # The bounds depend on the scan's NEAR, after its Ns component selectors.
            near_at = 1 + 2 * segment[0] if segment else 0
            if len(segment) <= near_at:
                raise DecodeError(f"the JPEG-LS scan header at byte {pos} is too short")
            presets, at = self.presets
            check_presets(presets, self.sof[0], segment[near_at], at)
        elif marker == _DNL and len(segment) >= 2:
            (self.dnl_rows,) = struct.unpack_from(">H", segment)

    def _check_precision(self, marker: int, precision: int) -> None:
        if marker in _DCT_PRECISION:
            allowed: tuple[int, ...] = _DCT_PRECISION[marker]
        elif marker in _LOSSLESS_SOF or marker == _SOF55:
            allowed = tuple(range(2, 17))
        else:
            allowed = (8, 12)
        if precision not in allowed:
            raise DecodeError(
                f"the {self.kind} frame header declares a precision of {precision} bits, "
                f"which its process does not allow"
            )

    def _skip_scan(self, pos: int) -> int:
        """The offset of the marker that ends the entropy-coded data starting at `pos`."""
        found = (_JPEG_LS_MARKER if self.ls else _JPEG_MARKER).search(self.frame, pos)
        if found is None:
            raise DecodeError(f"the {self.kind} codestream is truncated: no EOI marker")
        return found.end() - 2  # at the marker itself, after any fill bytes

    def _declared(self, end: int, scans: int) -> Declared:
        if self.sof is None or not scans:
            raise DecodeError(f"the {self.kind} codestream has no frame header or no scan")
        precision, rows, columns, components = self.sof
        if self.lse_size is not None:
            rows = rows or self.lse_size[0]
            columns = columns or self.lse_size[1]
        if not rows and self.dnl_rows is not None:
            rows = self.dnl_rows  # the number of lines comes after the first scan (T.81 B.2.5)
        return Declared(rows, columns, components, precision, end)


def _read_j2k(frame: bytes) -> Declared:
    # A frame may be a raw codestream or a JP2 file around one.
    start = frame.find(_SOC_SIZ)
    if start < 0:
        raise DecodeError("the JPEG 2000 frame has no codestream (no SOC and SIZ markers)")
    pos = start + 2
    (length,) = struct.unpack_from(">H", frame, pos + 2)
    siz = frame[pos + 4 : pos + 2 + length]
    (_, xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz, components) = struct.unpack_from(
        ">H8IH", siz
    )
    if len(siz) != 36 + 3 * components or not components:
        raise DecodeError(
            f"the JPEG 2000 SIZ marker is {length} bytes long for {components} components"
        )
    if not (xosiz < xsiz and yosiz < ysiz and xtsiz and ytsiz):
        raise DecodeError("the JPEG 2000 SIZ marker declares an empty image or empty tiles")
    if xtosiz > xosiz or ytosiz > yosiz or xtosiz + xtsiz <= xosiz or ytosiz + ytsiz <= yosiz:
        raise DecodeError("the JPEG 2000 SIZ marker places its first tile outside the image")
    tiles = -(-(xsiz - xtosiz) // xtsiz) * -(-(ysiz - ytosiz) // ytsiz)
    if tiles > _MAX_TILES:
        raise DecodeError(f"the JPEG 2000 SIZ marker declares {tiles} tiles, more than 65535")
    precision = max((siz[36 + 3 * c] & 0x7F) + 1 for c in range(components))
    for c in range(components):
        if siz[37 + 3 * c] != 1 or siz[38 + 3 * c] != 1:
            raise DecodeError(f"JPEG 2000 component {c} is subsampled, which DICOM does not use")
    pos += 2 + length
    # The rest of the main header, up to the first tile-part: each segment must fit, and the
    # coding style must be one a decoder can follow (T.800 A.6.1).
    while True:
        (marker, length) = struct.unpack_from(">HH", frame, pos)
        if marker >> 8 != 0xFF or length < 2 or pos + 2 + length > len(frame):
            raise DecodeError(f"the JPEG 2000 main header is malformed at byte {pos - start}")
        if marker == _J2K_SOT:
            break
        if marker == _J2K_COD:
            _check_cod(frame[pos + 4 : pos + 2 + length])
        pos += 2 + length
    end = _tile_parts_end(frame, pos, start)
    return Declared(ysiz - yosiz, xsiz - xosiz, components, precision, end, start)


def _check_cod(cod: bytes) -> None:
    # Scod(1) progression(1) layers(2) MCT(1) levels(1) xcb(1) ycb(1) style(1) transform(1)
    if len(cod) < 10:
        raise DecodeError("the JPEG 2000 COD marker is too short")
    layers = int.from_bytes(cod[2:4], "big")
    levels, xcb, ycb, transform = cod[5], cod[6], cod[7], cod[9]
    if not layers or levels > 32 or xcb > 8 or ycb > 8 or xcb + ycb > 8 or transform > 1:
        raise DecodeError(
            f"the JPEG 2000 COD marker declares an impossible coding style ({layers} layers, "
            f"{levels} levels, code-blocks 2^{xcb + 2} x 2^{ycb + 2}, transform {transform})"
        )


def _tile_parts_end(frame: bytes, pos: int, start: int) -> int:
    """Follow the tile-parts' lengths (Psot) to the EOC marker; return the offset after it."""
    while True:
        if pos + 2 > len(frame):
            raise DecodeError("the JPEG 2000 codestream is truncated: no EOC marker")
        (marker,) = struct.unpack_from(">H", frame, pos)
        if marker == _J2K_EOC:
            return pos + 2
        if marker != _J2K_SOT:
            raise DecodeError(
                f"the JPEG 2000 codestream has no tile-part at byte {pos - start} where one must be"
            )
        (psot,) = struct.unpack_from(">I", frame, pos + 6)
        if psot == 0:
            # The last tile-part runs to the EOC marker (T.800 A.4.2).
            eoc = frame.rfind(b"\xff\xd9", pos + 12)
            if eoc < 0:
                raise DecodeError("the JPEG 2000 codestream is truncated: no EOC marker")
            return eoc + 2
        if psot < 14 or pos + psot > len(frame):
            raise DecodeError(
                f"the JPEG 2000 codestream is truncated: a tile-part of {psot} bytes at byte "
                f"{pos - start} runs past its end"
            )
        pos += psot


def _check_rle(frame: bytes, spec: ImageHeader) -> None:
    """The RLE header (PS3.5 G.3.1): one segment per sample byte, in order, inside the frame."""
    if len(frame) < 64:
        raise DecodeError(f"the RLE frame is {len(frame)} bytes, shorter than its 64-byte header")
    count, *offsets = struct.unpack_from("<16I", frame)
    expected = spec.samples_per_pixel * max(1, spec.bits_allocated // 8)
    if count != expected:
        raise DecodeError(
            f"the RLE header declares {count} segments, the DICOM header needs {expected} "
            f"(SamplesPerPixel {spec.samples_per_pixel}, BitsAllocated {spec.bits_allocated})"
        )
    used = offsets[:count]
    if used[0] != 64 or any(b <= a for a, b in itertools.pairwise(used)) or used[-1] >= len(frame):
        raise DecodeError("the RLE header's segment offsets are out of order or out of the frame")
