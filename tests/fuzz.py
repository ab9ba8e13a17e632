"""Mutational fuzzing of the header reader and the transcoder, each input in a forked child.

    python -m tests.fuzz --seconds 3600 --seed 1 --out fuzz-findings/ [--jobs N]
    python -m tests.fuzz --replay FILE [--decoder NAME]

Seeds are the Part-10 files pydicom ships in its wheel, plus relabelled copies for the transfer
syntaxes it has no file of (HTJ2K, JPEG Lossless process 14, Encapsulated Uncompressed). Each
input is a seed with one or more mutations, most of them aware of the structure: the dataset's
elements, sequences and items, the encapsulated fragments and Basic Offset Table, the marker
segments of JPEG, JPEG-LS and JPEG 2000 codestreams, and the RLE header. Input N of a run is a
function of (--seed, N) alone, whatever --jobs.

Every input runs in a child forked from this process, under an address-space limit and a
deadline: `decoded_size(data)`, then `transcode(data, options)`. A finding is a child that died
(crash), overran its deadline (timeout), ran out of memory (memory), a header size that is not
sane (header), an exception from the transcoder other than a BridgeError (leak), or a BridgeError
whose reason a person cannot read: control bytes, a traceback, over 1,000 characters (reason).
Each new finding is saved in --out as KIND-HASH.dcm with a line in findings.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import hashlib
import inspect
import json
import logging
import os
import random
import re
import resource
import select
import signal
import struct
import sys
import tempfile
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from io import BytesIO
from pathlib import Path
from typing import IO, Any, NoReturn

import pydicom
import pydicom.data
from pydicom import uid
from pydicom.datadict import dictionary_VR
from pydicom.encaps import encapsulate

import bridge.dicom.codecs
from bridge.dicom.header import decoded_size
from bridge.dicom.transcode import transcode
from bridge.errors import BridgeError
from bridge.jobs import TranscodeOptions

MIB = 1024 * 1024
KINDS = ("crash", "timeout", "memory", "header", "leak", "reason")
# A refusal's reason is one line a person reads in `status`: no control bytes, not a page long.
_UNREADABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]|Traceback|takes exactly")
_LONGEST_REASON = 1000

_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_TRANSFER_SYNTAX = 0x00020010
_GROUP_LENGTH = 0x00020000
_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_DEFLATED = uid.DeflatedExplicitVRLittleEndian
_ENCAPSULATED_UNCOMPRESSED = "1.2.840.10008.1.2.1.98"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "


# --- limits, inputs, outcomes, findings ----------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What one child may spend on one input."""

    timeout: float = 10.0  # seconds, enforced by the parent with SIGKILL
    memory_bytes: int = 1536 * MIB  # address space above the child's size at its start
    max_decoded_bytes: int = 256 * MIB  # TranscodeOptions.max_decoded_bytes, the header's bound


@dataclass(frozen=True)
class Seed:
    """One starting file."""

    name: str
    data: bytes
    syntax: str


@dataclass(frozen=True)
class Corpus:
    """The seeds, grouped by transfer syntax so that each syntax is picked as often."""

    seeds: tuple[Seed, ...]
    groups: tuple[tuple[Seed, ...], ...]

    def pick(self, rng: random.Random) -> Seed:
        """A syntax uniformly, then one of its files."""
        return rng.choice(rng.choice(self.groups))


@dataclass(frozen=True)
class Case:
    """One input: a seed after its mutations."""

    index: int
    seed: str
    syntax: str
    data: bytes
    mutations: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    """What the parent saw of one child."""

    events: tuple[dict[str, Any], ...]
    status: int  # as os.waitpid gives it
    timed_out: bool
    stderr: str
    seconds: float


@dataclass(frozen=True)
class Finding:
    """One input that broke a rule."""

    kind: str
    detail: str
    seed: str
    syntax: str
    mutations: tuple[str, ...]
    stage: str = ""
    decoder: str = ""
    frame: str = ""  # the innermost Python frame at a crash, from faulthandler
    stderr: str = ""

    def key(self) -> tuple[str, str, str, str]:
        """What two findings share when they are the same one."""
        return self.kind, self.seed, _normalized(self.detail), self.decoder


Event = dict[str, Any]
Report = Callable[[Event], None]
Check = Callable[[bytes, Limits, Report], None]


# --- seeds ---------------------------------------------------------------------------------------


def pydicom_test_files() -> Path:
    """Where pydicom's wheel keeps its test files."""
    return Path(pydicom.data.__file__).parent / "test_files"


def load_corpus(directory: Path | None = None, max_bytes: int = 2 * MIB) -> Corpus:
    """Every Part-10 file of `directory` up to `max_bytes`, plus the derived seeds."""
    seeds: list[Seed] = []
    for path in sorted((directory or pydicom_test_files()).rglob("*")):
        if not path.is_file() or path.stat().st_size > max_bytes:
            continue
        data = path.read_bytes()
        if data[128:132] == b"DICM":
            seeds.append(Seed(path.name, data, _syntax_of(data)))
    seeds += _derived(seeds)
    return _grouped(seeds)


def _grouped(seeds: Sequence[Seed]) -> Corpus:
    groups: dict[str, list[Seed]] = {}
    for seed in seeds:
        groups.setdefault(seed.syntax, []).append(seed)
    return Corpus(tuple(seeds), tuple(tuple(groups[key]) for key in sorted(groups)))


# Syntaxes pydicom ships no file of, and the syntax whose codestreams are also theirs.
_RELABELLED = (
    (uid.HTJ2KLossless, uid.JPEG2000Lossless),
    (uid.HTJ2KLosslessRPCL, uid.JPEG2000Lossless),
    (uid.HTJ2K, uid.JPEG2000),
    (uid.JPEGLossless, uid.JPEGLosslessSV1),
)
_ENCAPSULATE_FROM = ("CT_small.dcm", "SC_rgb_small_odd.dcm")


def _derived(seeds: Sequence[Seed]) -> list[Seed]:
    """Relabelled copies for syntaxes without a seed of their own (each decoder path is fed)."""
    present = {seed.syntax for seed in seeds}
    derived: list[Seed] = []
    for target, source in _RELABELLED:
        if target in present:
            continue
        for seed in seeds:
            if seed.syntax == source:
                doc = Doc.of(seed)
                _set_meta_value(doc, _TRANSFER_SYNTAX, _ui(target))
                derived.append(Seed(f"{seed.name}>{target}", doc.encoded(), str(target)))
    if _ENCAPSULATED_UNCOMPRESSED not in present:
        derived += [_encapsulated(seed) for seed in seeds if seed.name in _ENCAPSULATE_FROM]
    return derived


def _encapsulated(seed: Seed) -> Seed:
    """An Encapsulated Uncompressed copy of a native single-frame seed."""
    ds = pydicom.dcmread(BytesIO(seed.data))
    value = bytes(ds.PixelData)
    ds.PixelData = encapsulate([value + b"\0" * (len(value) % 2)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid.UID(_ENCAPSULATED_UNCOMPRESSED)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return Seed(
        f"{seed.name}>{_ENCAPSULATED_UNCOMPRESSED}", out.getvalue(), _ENCAPSULATED_UNCOMPRESSED
    )


def _syntax_of(data: bytes) -> str:
    meta = walk(data[: _meta_end(data)], 132, _EXPLICIT_LE)
    for element in meta:
        if element.tag == _TRANSFER_SYNTAX:
            return data[element.value_at : element.stop].rstrip(b"\0 ").decode("latin-1")
    return ""


def _numbers(text: str) -> tuple[int, ...]:
    """Integers written in a string, decimal or 0x hex, separated by spaces."""
    return tuple(int(word, 0) for word in text.split())


def _texts(text: str) -> tuple[bytes, ...]:
    """Byte strings written in a string, separated by |."""
    return tuple(word.encode("latin-1") for word in text.split("|"))


def _ui(text: str) -> bytes:
    raw = text.encode("ascii")
    return raw + b"\0" * (len(raw) % 2)


# --- walking a dataset ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoding:
    """How a dataset's elements are encoded."""

    little: bool
    implicit: bool

    @property
    def order(self) -> str:
        """The struct byte order."""
        return "<" if self.little else ">"


_EXPLICIT_LE = Encoding(little=True, implicit=False)
_IMPLICIT_LE = Encoding(little=True, implicit=True)


@dataclass(frozen=True)
class Element:
    """A data element, item, delimiter or fragment, as found in the bytes."""

    tag: int
    vr: str  # "" when implicit, and for items, delimiters and fragments
    kind: str  # "element", "item", "delimiter" or "fragment"
    start: int
    length_at: int
    length_size: int
    length: int
    value_at: int
    stop: int  # just past the element and everything nested in it
    depth: int
    little: bool
    owner: int = -1  # fragments and their delimiter: where their Pixel Data element starts

    @property
    def undefined(self) -> bool:
        """Whether the length is the undefined-length marker."""
        return self.length_size == 4 and self.length == _UNDEFINED

    @property
    def label(self) -> str:
        """The tag, and the VR or kind, for descriptions."""
        what = self.vr if self.kind == "element" else self.kind
        return f"({self.tag >> 16:04X},{self.tag & 0xFFFF:04X}) {what}".rstrip()


class _Stop(Exception):
    """The bytes stop making sense: the walk ends with what it found."""


class _Walker:
    """Finds elements down any nesting, tolerating (and stopping at) anything broken."""

    def __init__(self, buf: bytes | bytearray, limit: int) -> None:
        self.buf = buf
        self.limit = limit
        self.found: list[Element | None] = []

    def _reserve(self) -> int:
        if len(self.found) >= self.limit:
            raise _Stop
        self.found.append(None)
        return len(self.found) - 1

    def _tag(self, pos: int, enc: Encoding) -> int:
        group, elem = struct.unpack_from(enc.order + "HH", self.buf, pos)
        return int(group) << 16 | int(elem)

    def _u32(self, pos: int, enc: Encoding) -> int:
        return int(struct.unpack_from(enc.order + "I", self.buf, pos)[0])

    def dataset(self, pos: int, end: int, depth: int, enc: Encoding) -> int:
        """Walk elements from `pos` until `end` or a delimiter; return where it stopped."""
        if depth > 64:
            raise _Stop
        while pos + 8 <= end:
            if self._tag(pos, enc) >> 16 == 0xFFFE:
                return pos
            pos = self.element(pos, end, depth, enc)
        return pos

    def element(self, pos: int, end: int, depth: int, enc: Encoding) -> int:
        """Record the element at `pos` and what it holds; return where it ends."""
        tag = self._tag(pos, enc)
        vr, length_at, size = "", pos + 4, 4
        if not enc.implicit:
            vr = bytes(self.buf[pos + 4 : pos + 6]).decode("latin-1")
            length_at, size = (pos + 8, 4) if vr in _LONG_VRS else (pos + 6, 2)
        fmt = enc.order + ("I" if size == 4 else "H")
        length = int(struct.unpack_from(fmt, self.buf, length_at)[0])
        value_at = length_at + size
        index = self._reserve()
        element = Element(
            tag, vr, "element", pos, length_at, size, length, value_at, value_at, depth, enc.little
        )
        self.found[index] = element  # kept, with its header alone, if its contents are broken
        stop = self._contents(element, end, enc)
        self.found[index] = replace(element, stop=stop)
        if stop > end:
            raise _Stop
        return stop

    def _contents(self, element: Element, end: int, enc: Encoding) -> int:
        depth = element.depth + 1
        if element.undefined:
            if element.tag == _PIXEL_DATA:
                return self.fragments(element.value_at, end, depth, element.start, enc)
            # An undefined-length UN holds a sequence encoded implicit VR little endian.
            inner = _IMPLICIT_LE if element.vr == "UN" else enc
            return self.items(element.value_at, end, depth, inner)
        stop = element.value_at + element.length
        if element.vr == "SQ" or (enc.implicit and _dictionary_vr(element.tag) == "SQ"):
            self.items(element.value_at, min(stop, end), depth, enc)
        return stop

    def items(self, pos: int, end: int, depth: int, enc: Encoding) -> int:
        """Walk the items of a sequence; return where the sequence ends."""
        while pos + 8 <= end:
            tag, length = self._tag(pos, enc), self._u32(pos + 4, enc)
            if tag == _SEQUENCE_END:
                self._record(tag, "delimiter", pos, length, depth, enc)
                return pos + 8
            if tag != _ITEM:
                raise _Stop
            index = self._reserve()
            item = Element(tag, "", "item", pos, pos + 4, 4, length, pos + 8, 0, depth, enc.little)
            self.found[index] = replace(item, stop=pos + 8)
            stop = self._item(item, end, enc)
            self.found[index] = replace(item, stop=stop)
            pos = stop
        return pos

    def _item(self, item: Element, end: int, enc: Encoding) -> int:
        if not item.undefined:
            stop = item.value_at + item.length
            self.dataset(item.value_at, min(stop, end), item.depth + 1, enc)
            return stop
        after = self.dataset(item.value_at, end, item.depth + 1, enc)
        if after + 8 > end or self._tag(after, enc) != _ITEM_END:
            raise _Stop
        self._record(_ITEM_END, "delimiter", after, self._u32(after + 4, enc), item.depth, enc)
        return after + 8

    def fragments(self, pos: int, end: int, depth: int, owner: int, enc: Encoding) -> int:
        """Walk the Basic Offset Table and fragments of encapsulated pixel data."""
        while pos + 8 <= end:
            tag, length = self._tag(pos, enc), self._u32(pos + 4, enc)
            if tag == _SEQUENCE_END:
                self._record(tag, "delimiter", pos, length, depth, enc, owner)
                return pos + 8
            if tag != _ITEM or length == _UNDEFINED:
                raise _Stop
            self._record(tag, "fragment", pos, length, depth, enc, owner, pos + 8 + length)
            pos += 8 + length
        raise _Stop

    def _record(
        self,
        tag: int,
        kind: str,
        pos: int,
        length: int,
        depth: int,
        enc: Encoding,
        owner: int = -1,
        stop: int = 0,
    ) -> None:
        index = self._reserve()
        stop = stop or pos + 8
        self.found[index] = Element(
            tag, "", kind, pos, pos + 4, 4, length, pos + 8, stop, depth, enc.little, owner
        )


@cache
def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


def walk(buf: bytes | bytearray, start: int, enc: Encoding, limit: int = 20_000) -> list[Element]:
    """The elements, items, delimiters and fragments of a dataset, in the order of the bytes."""
    walker = _Walker(buf, limit)
    with contextlib.suppress(_Stop, struct.error):  # the rest is unreadable: keep what was found
        walker.dataset(start, len(buf), 0, enc)
    return [element for element in walker.found if element is not None]


def _meta_end(data: bytes | bytearray) -> int:
    """Where the file meta group ends (it is always explicit VR little endian)."""
    pos = 132
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        vr = bytes(data[pos + 4 : pos + 6]).decode("latin-1")
        if vr in _LONG_VRS:
            pos += 12 + int.from_bytes(data[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(data[pos + 6 : pos + 8], "little")
    return min(pos, len(data))


# --- the document being mutated ------------------------------------------------------------------


@dataclass
class Doc:
    """A seed split into its meta and its dataset (inflated when deflated), being mutated."""

    meta: bytearray  # preamble, DICM and the group 0002 elements
    body: bytearray
    enc: Encoding  # the body's, as the seed encoded it, whatever the meta later claims
    deflated: bool
    syntax: str

    @classmethod
    def of(cls, seed: Seed) -> Doc:
        """The seed, ready to mutate."""
        end = _meta_end(seed.data)
        body = seed.data[end:]
        deflated = seed.syntax == _DEFLATED
        if deflated:
            try:
                body = zlib.decompressobj(-zlib.MAX_WBITS).decompress(body)
            except zlib.error:
                deflated = False
        little = seed.syntax != uid.ExplicitVRBigEndian
        # Like pydicom, believe the first element over the meta about implicit or explicit VR.
        explicit = len(body) >= 6 and body[4:6].isalpha() and body[4:6].isupper()
        enc = Encoding(little=little, implicit=not explicit)
        return cls(bytearray(seed.data[:end]), bytearray(body), enc, deflated, seed.syntax)

    def elements(self) -> list[Element]:
        """The body's elements as they are now."""
        return walk(self.body, 0, self.enc)

    def meta_elements(self) -> list[Element]:
        """The meta's elements as they are now."""
        return walk(self.meta, 132, _EXPLICIT_LE)

    def encoded(self) -> bytes:
        """The file: the meta and the body, deflated again if it was."""
        body = bytes(self.body)
        if self.deflated:
            deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            body = deflater.compress(body) + deflater.flush()
        return bytes(self.meta) + body


def _put(buf: bytearray, at: int, size: int, value: int, little: bool) -> None:
    mask = (1 << (8 * size)) - 1
    buf[at : at + size] = (value & mask).to_bytes(size, "little" if little else "big")


def _get(buf: bytes | bytearray, at: int, size: int, little: bool) -> int:
    return int.from_bytes(buf[at : at + size], "little" if little else "big")


def _header(tag: int, vr: str, length: int, enc: Encoding) -> bytes:
    """An element's tag, VR and length as `enc` encodes them."""
    head = struct.pack(enc.order + "HH", tag >> 16, tag & 0xFFFF)
    if enc.implicit or tag >> 16 == 0xFFFE:
        return head + struct.pack(enc.order + "I", length & _UNDEFINED)
    if vr in _LONG_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack(enc.order + "I", length & _UNDEFINED)
    return head + vr.encode() + struct.pack(enc.order + "H", length & 0xFFFF)


def _set_value(buf: bytearray, element: Element, value: bytes) -> bool:
    """Replace an element's value and its length field; False when the length cannot say it."""
    if len(value) >= 1 << (8 * element.length_size) or element.undefined:
        return False
    buf[element.value_at : element.stop] = value
    _put(buf, element.length_at, element.length_size, len(value), element.little)
    return True


def _set_meta_value(doc: Doc, tag: int, value: bytes) -> None:
    """Set (or add) a meta element's value and keep the group length right."""
    elements = doc.meta_elements()
    found = [e for e in elements if e.tag == tag]
    if found:
        _set_value(doc.meta, found[0], value)
    else:
        after = [e for e in elements if e.tag > tag]
        at = after[0].start if after else len(doc.meta)
        doc.meta[at:at] = _header(tag, "UI", len(value), _EXPLICIT_LE) + value
    for element in doc.meta_elements():
        if element.tag == _GROUP_LENGTH and element.length == 4:
            _put(doc.meta, element.value_at, 4, len(doc.meta) - element.stop, little=True)


def _insert_top_level(doc: Doc, tag: int, encoded: bytes) -> None:
    """Insert an encoded element at depth 0, where its tag belongs."""
    top = [e for e in doc.elements() if e.depth == 0 and e.kind == "element"]
    after = [e for e in top if e.tag > tag]
    at = after[0].start if after else (top[-1].stop if top else len(doc.body))
    doc.body[at:at] = encoded


# --- dataset mutators ----------------------------------------------------------------------------

Mutator = Callable[[random.Random, Doc], "str | None"]


def _hex(value: int) -> str:
    return f"0x{value:X}" if value > 0xFFFF else str(value)


def _interesting_length(rng: random.Random, old: int, size: int, room: int) -> int:
    top = (1 << (8 * size)) - 1
    choices = [old + 1, old - 1, old + 2, old - 2, 0, 1, top, top - 1, room, room + 1]
    choices += [old * 2, old // 2, rng.randrange(max(room, 0) + 1)]
    if size == 4:
        choices += [0x7FFFFFFF, 0x80000000, 0x10000, 0xFFFFFFF0]
    return rng.choice(choices) & top


def _length_mutator(select: Callable[[Element], bool], meta_too: bool) -> Mutator:
    """A mutator that gives one selected element a wrong length."""

    def mutate(rng: random.Random, doc: Doc) -> str | None:
        in_meta = meta_too and rng.random() < 0.15
        buf = doc.meta if in_meta else doc.body
        candidates = [e for e in (doc.meta_elements() if in_meta else doc.elements()) if select(e)]
        if not candidates:
            return None
        element = rng.choice(candidates)
        room = len(buf) - element.value_at
        new = _interesting_length(rng, element.length, element.length_size, room)
        _put(buf, element.length_at, element.length_size, new, element.little)
        where = "meta" if in_meta else f"depth {element.depth}"
        return f"length of {element.label} ({where}) {_hex(element.length)} -> {_hex(new)}"

    return mutate


def _is_sequence_part(element: Element) -> bool:
    if element.kind in ("item", "delimiter") and element.owner < 0:
        return True
    return element.kind == "element" and (element.vr == "SQ" or element.undefined)


def _is_encapsulation_part(element: Element) -> bool:
    return element.owner >= 0 or element.tag == _PIXEL_DATA


_US_ATTRIBUTES = {
    0x00280002: "SamplesPerPixel",
    0x00280006: "PlanarConfiguration",
    0x00280010: "Rows",
    0x00280011: "Columns",
    0x00280100: "BitsAllocated",
    0x00280101: "BitsStored",
    0x00280102: "HighBit",
    0x00280103: "PixelRepresentation",
}
_US_VALUES = _numbers(
    "0 1 2 3 4 7 8 9 12 15 16 17 24 31 32 33 48 63 64 65 255 256 4096 0x7FFF 0x8000 0xFFFE 0xFFFF"
)


def mutate_us_attribute(rng: random.Random, doc: Doc) -> str | None:
    """Rows, Columns, BitsAllocated... set to an interesting value."""
    candidates = [
        e
        for e in doc.elements()
        if e.tag in _US_ATTRIBUTES and e.length >= 2 and e.kind == "element"
    ]
    if not candidates:
        return None
    element = rng.choice(candidates)
    old = _get(doc.body, element.value_at, 2, element.little)
    new = rng.choice((*_US_VALUES, old + 1, old - 1, old * 2, old // 2)) & 0xFFFF
    _put(doc.body, element.value_at, 2, new, element.little)
    return f"{_US_ATTRIBUTES[element.tag]} (depth {element.depth}) {old} -> {new}"


_TEXT_ATTRIBUTES: dict[int, tuple[str, str, tuple[bytes, ...]]] = {
    0x00280008: (
        "NumberOfFrames",
        "IS",
        _texts(
            "-1|0|1|2|3|16|1000|65536|2147483647|2147483648|4294967297|99999999999999999999|1.5|"
            "1e3|abc||  |1\\2|+2| -1|00000000000002|-0"
        ),
    ),
    0x00280004: (
        "PhotometricInterpretation",
        "CS",
        _texts(
            "MONOCHROME1|MONOCHROME2|RGB|YBR_FULL|YBR_FULL_422|YBR_PARTIAL_420|YBR_ICT|YBR_RCT|"
            "PALETTE COLOR|HSV||XYZ"
        ),
    ),
}


def mutate_text_attribute(rng: random.Random, doc: Doc) -> str | None:
    """NumberOfFrames or PhotometricInterpretation replaced (or added) with odd text."""
    tag = rng.choice(sorted(_TEXT_ATTRIBUTES))
    name, vr, values = _TEXT_ATTRIBUTES[tag]
    value = rng.choice(values)
    value += b" " * (len(value) % 2)
    found = [e for e in doc.elements() if e.tag == tag and e.depth == 0 and e.kind == "element"]
    if found:
        old = bytes(doc.body[found[0].value_at : found[0].stop])
        return f"{name} {old!r} -> {value!r}" if _set_value(doc.body, found[0], value) else None
    _insert_top_level(doc, tag, _header(tag, vr, len(value), doc.enc) + value)
    return f"{name} added as {value!r}"


_SYNTAXES = (
    *sorted(bridge.dicom.codecs.DECODER_CHAINS),
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.DeflatedExplicitVRLittleEndian,
    "1.2.840.10008.1.2.4.100",  # MPEG2
    "1.2.840.10008.1.2.4.94",  # JPIP
    "1.2.3.4",
    "",
)


def mutate_syntax(rng: random.Random, doc: Doc) -> str | None:
    """The meta's Transfer Syntax UID changed; the dataset stays as it was encoded."""
    target = rng.choice(_SYNTAXES)
    _set_meta_value(doc, _TRANSFER_SYNTAX, _ui(target))
    return f"TransferSyntaxUID -> {target!r}"


def mutate_drop_element(rng: random.Random, doc: Doc) -> str | None:
    """One element or item removed with all it holds."""
    candidates = [e for e in doc.elements() if e.kind in ("element", "item")]
    if not candidates:
        return None
    element = rng.choice(candidates)
    del doc.body[element.start : element.stop]
    return f"dropped {element.label} (depth {element.depth})"


def mutate_duplicate_element(rng: random.Random, doc: Doc) -> str | None:
    """One element or item repeated right after itself."""
    candidates = [
        e for e in doc.elements() if e.kind in ("element", "item") and e.stop - e.start < 4 * MIB
    ]
    if not candidates:
        return None
    element = rng.choice(candidates)
    doc.body[element.stop : element.stop] = doc.body[element.start : element.stop]
    return f"duplicated {element.label} (depth {element.depth})"


_VRS = ("UN", "OB", "OW", "SQ", "US", "UL", "SS", "IS", "CS", "UI", "UT", "OV", "XX", "\0\0")


def mutate_vr(rng: random.Random, doc: Doc) -> str | None:
    """An explicit VR replaced, which also changes how long its length field is read to be."""
    candidates = [e for e in doc.elements() if e.kind == "element" and e.vr]
    if not candidates:
        return None
    element = rng.choice(candidates)
    vr = rng.choice(_VRS)
    doc.body[element.start + 4 : element.start + 6] = vr.encode("latin-1")
    return f"VR of {element.label} -> {vr!r}"


_REFERENCED_IMAGES = 0x00081140


def mutate_deep_nesting(rng: random.Random, doc: Doc) -> str | None:
    """A sequence nested hundreds or thousands deep, terminated or not."""
    depth = rng.choice((8, 100, 1000, 5000))
    terminated = rng.random() < 0.7
    enc = doc.enc
    opening = _header(_REFERENCED_IMAGES, "SQ", _UNDEFINED, enc) + _header(
        _ITEM, "", _UNDEFINED, enc
    )
    closing = _header(_ITEM_END, "", 0, enc) + _header(_SEQUENCE_END, "", 0, enc)
    _insert_top_level(
        doc, _REFERENCED_IMAGES, opening * depth + (closing * depth if terminated else b"")
    )
    return f"sequences nested {depth} deep{'' if terminated else ', unterminated'}"


_ICON_IMAGE_SEQUENCE = 0x00880200


def mutate_icon(rng: random.Random, doc: Doc) -> str | None:
    """An Icon Image Sequence holding a copy of the image attributes and encapsulated pixels."""
    elements = doc.elements()
    pixels = [e for e in elements if e.tag == _PIXEL_DATA and e.depth == 0 and e.undefined]
    if not pixels or doc.enc.implicit or not doc.enc.little:
        return None
    image = [e for e in elements if e.depth == 0 and e.kind == "element" and e.tag >> 16 == 0x0028]
    content = b"".join(bytes(doc.body[e.start : e.stop]) for e in image)
    content += bytes(doc.body[pixels[0].start : pixels[0].stop])
    enc = doc.enc
    encoded = (
        _header(_ICON_IMAGE_SEQUENCE, "SQ", _UNDEFINED, enc)
        + _header(_ITEM, "", _UNDEFINED, enc)
        + content
        + _header(_ITEM_END, "", 0, enc)
        + _header(_SEQUENCE_END, "", 0, enc)
    )
    _insert_top_level(doc, _ICON_IMAGE_SEQUENCE, encoded)
    return "IconImageSequence added with the image's pixel data"


def _fragment_groups(elements: Sequence[Element]) -> list[list[Element]]:
    """Each encapsulated Pixel Data's items, its Basic Offset Table first."""
    groups: dict[int, list[Element]] = {}
    for element in elements:
        if element.kind == "fragment":
            groups.setdefault(element.owner, []).append(element)
    return list(groups.values())


def _offsets(fragments: Sequence[Element]) -> list[int]:
    """Where each fragment starts, counted from the first one's item tag."""
    return [f.start - fragments[0].start for f in fragments] if fragments else []


_EXTENDED_OFFSETS, _EXTENDED_LENGTHS = 0x7FE00001, 0x7FE00002


def mutate_extended_offsets(rng: random.Random, doc: Doc) -> str | None:
    """An Extended Offset Table added: right, shifted or absurd."""
    groups = _fragment_groups(doc.elements())
    if not groups:
        return None
    frames = groups[0][1:]
    offsets = _offsets(frames) or [0]
    style = rng.choice(("exact", "shifted", "huge", "random", "empty"))
    if style == "shifted":
        offsets = [o + rng.choice((-8, -1, 1, 8)) for o in offsets]
    elif style == "huge":
        offsets = [2**64 - 1] * len(offsets)
    elif style == "random":
        offsets = [rng.randrange(2**64) for _ in range(rng.randint(1, 6))]
    elif style == "empty":
        offsets = []
    lengths = [f.length for f in frames][: len(offsets)]
    lengths += [rng.randrange(2**32)] * (len(offsets) - len(lengths))
    enc = doc.enc
    table = struct.pack(f"{enc.order}{len(offsets)}Q", *offsets)
    sizes = struct.pack(f"{enc.order}{len(lengths)}Q", *lengths)
    encoded = _header(_EXTENDED_OFFSETS, "OV", len(table), enc) + table
    encoded += _header(_EXTENDED_LENGTHS, "OV", len(sizes), enc) + sizes
    _insert_top_level(doc, _EXTENDED_OFFSETS, encoded)
    return f"Extended Offset Table added ({style})"


def mutate_offset_table(rng: random.Random, doc: Doc) -> str | None:
    """The Basic Offset Table rewritten: empty, right, shifted, reversed, absurd."""
    groups = _fragment_groups(doc.elements())
    if not groups:
        return None
    group = rng.choice(groups)
    table, frames = group[0], group[1:]
    offsets = _offsets(frames)
    styles: dict[str, Callable[[], list[int]]] = {
        "empty": list,
        "exact": lambda: offsets,
        "shifted": lambda: [o + rng.choice((-8, -2, -1, 1, 2, 8)) for o in offsets],
        "reversed": lambda: offsets[::-1],
        "huge": lambda: [rng.choice((0xFFFFFFFF, 0x7FFFFFFF))] * max(1, len(offsets)),
        "random": lambda: [rng.randrange(2**32) for _ in range(rng.randint(1, 8))],
        "zeros": lambda: [0] * rng.randint(1, 8),
        "doubled": lambda: offsets + offsets,
        "many": lambda: list(range(0, 20_000 * 8, 8)),
    }
    style = rng.choice(sorted(styles))
    entries = [o & _UNDEFINED for o in styles[style]()]
    value = struct.pack(f"<{len(entries)}I", *entries)
    if rng.random() < 0.1:
        value += bytes(rng.choice((1, 2, 3)))  # not a multiple of 4
    doc.body[table.start : table.stop] = _header(_ITEM, "", len(value), _EXPLICIT_LE) + value
    return f"Basic Offset Table -> {style}"


def _item_bytes(value: bytes | bytearray) -> bytes:
    return _header(_ITEM, "", len(value), _EXPLICIT_LE) + bytes(value)


def mutate_fragments(rng: random.Random, doc: Doc) -> str | None:
    """Fragments split, merged, dropped, repeated, swapped, cut, or their delimiter removed."""
    elements = doc.elements()
    groups = _fragment_groups(elements)
    if not groups or len(groups[0]) < 2:
        return None
    frames = groups[0][1:]
    op = rng.choice(_FRAGMENT_OPS)
    return op(rng, doc, frames, elements)


FragmentOp = Callable[[random.Random, Doc, list[Element], list[Element]], "str | None"]


def _split(rng: random.Random, doc: Doc, frames: list[Element], _: list[Element]) -> str | None:
    frag = rng.choice(frames)
    value = doc.body[frag.value_at : frag.stop]
    if len(value) < 2:
        return None
    cut = rng.randrange(1, len(value))
    doc.body[frag.start : frag.stop] = _item_bytes(value[:cut]) + _item_bytes(value[cut:])
    return f"fragment split at {cut} of {len(value)}"


def _merge(rng: random.Random, doc: Doc, frames: list[Element], _: list[Element]) -> str | None:
    if len(frames) < 2:
        return None
    index = rng.randrange(len(frames) - 1)
    first, second = frames[index], frames[index + 1]
    value = doc.body[first.value_at : first.stop] + doc.body[second.value_at : second.stop]
    doc.body[first.start : second.stop] = _item_bytes(value)
    return f"fragments {index} and {index + 1} merged"


def _drop(rng: random.Random, doc: Doc, frames: list[Element], _: list[Element]) -> str | None:
    index = rng.randrange(len(frames))
    del doc.body[frames[index].start : frames[index].stop]
    return f"fragment {index} dropped"


def _repeat(rng: random.Random, doc: Doc, frames: list[Element], _: list[Element]) -> str | None:
    index = rng.randrange(len(frames))
    frag = frames[index]
    doc.body[frag.stop : frag.stop] = doc.body[frag.start : frag.stop]
    return f"fragment {index} repeated"


def _swap(rng: random.Random, doc: Doc, frames: list[Element], _: list[Element]) -> str | None:
    if len(frames) < 2:
        return None
    index = rng.randrange(len(frames) - 1)
    first, second = frames[index], frames[index + 1]
    swapped = doc.body[second.start : second.stop] + doc.body[first.start : first.stop]
    doc.body[first.start : second.stop] = swapped
    return f"fragments {index} and {index + 1} swapped"


def _cut(rng: random.Random, doc: Doc, frames: list[Element], _: list[Element]) -> str | None:
    frag = rng.choice(frames)
    value = doc.body[frag.value_at : frag.stop]
    keep = rng.choice((0, 1, len(value) // 2, len(value) - 1, len(value) - 2))
    doc.body[frag.start : frag.stop] = _item_bytes(value[: max(keep, 0)])
    return f"fragment cut to {max(keep, 0)} of {len(value)} bytes"


def _empty(rng: random.Random, doc: Doc, frames: list[Element], _: list[Element]) -> str | None:
    frag = rng.choice(frames)
    doc.body[frag.stop : frag.stop] = _item_bytes(b"" if rng.random() < 0.7 else b"\0")
    return "empty fragment inserted"


def _undelimited(
    rng: random.Random, doc: Doc, frames: list[Element], elements: list[Element]
) -> str | None:
    ends = [e for e in elements if e.kind == "delimiter" and e.owner == frames[0].owner]
    if not ends:
        return None
    del doc.body[ends[0].start : ends[0].stop]
    return "sequence delimiter of the pixel data removed"


def _bad_tag(rng: random.Random, doc: Doc, frames: list[Element], _: list[Element]) -> str | None:
    frag = rng.choice(frames)
    tag = rng.choice((_ITEM_END, _SEQUENCE_END, 0x7FE00010, 0xFFFEE001, rng.randrange(2**32)))
    _put(doc.body, frag.start, 2, tag >> 16, little=True)
    _put(doc.body, frag.start + 2, 2, tag & 0xFFFF, little=True)
    return f"fragment item tag -> {tag:08X}"


_FRAGMENT_OPS: tuple[FragmentOp, ...] = (
    _split,
    _merge,
    _drop,
    _repeat,
    _swap,
    _cut,
    _empty,
    _undelimited,
    _bad_tag,
)


# --- codestreams ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A marker segment, or (marker 0) entropy-coded or tile data."""

    marker: int
    start: int
    payload: int  # where its parameters start, after the marker and length
    end: int


_STANDALONE_JPEG = {0x01, 0xD8, 0xD9, *range(0xD0, 0xD8)}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def jpeg_segments(buf: bytes | bytearray) -> list[Segment]:
    """The marker segments of a JPEG or JPEG-LS codestream, and its scans' data."""
    found: list[Segment] = []
    pos, ls = 0, False
    while pos + 2 <= len(buf) and len(found) < 1000:
        if buf[pos] != 0xFF:
            break
        marker = buf[pos + 1]
        if marker == 0xFF:
            pos += 1  # a fill byte
            continue
        if marker in _STANDALONE_JPEG:
            found.append(Segment(0xFF00 | marker, pos, pos + 2, pos + 2))
            pos += 2
            if marker == 0xD9:
                break
            continue
        end = pos + 2 + _get(buf, pos + 2, 2, little=False)
        found.append(Segment(0xFF00 | marker, pos, pos + 4, min(end, len(buf))))
        ls |= marker == 0xF7
        pos = end
        if marker == 0xDA:
            scan_end = _scan_end(buf, pos, ls)
            found.append(Segment(0, pos, pos, scan_end))
            pos = scan_end
    return found


def _scan_end(buf: bytes | bytearray, pos: int, ls: bool) -> int:
    """Where a scan's entropy-coded data ends: at the first marker other than RSTn."""
    while True:
        pos = buf.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(buf):
            return len(buf)
        following = buf[pos + 1]
        # JPEG stuffs 0x00 after 0xFF; JPEG-LS stuffs a 0 bit, so its markers are >= 0x80.
        stuffed = following < 0x80 if ls else following == 0
        if stuffed or 0xD0 <= following <= 0xD7 or following == 0xFF:
            pos += 1
            continue
        return pos


def j2k_segments(buf: bytes | bytearray) -> list[Segment]:
    """The marker segments of a JPEG 2000 codestream (inside a JP2 file too), and tile data."""
    soc = buf.find(b"\xff\x4f\xff\x51")
    if soc < 0:
        return []
    found = [Segment(0xFF4F, soc, soc + 2, soc + 2)]
    pos, tile_end = soc + 2, 0
    while pos + 2 <= len(buf) and len(found) < 2000:
        marker = _get(buf, pos, 2, little=False)
        if marker == 0xFFD9 or marker < 0xFF30:
            if marker == 0xFFD9:
                found.append(Segment(marker, pos, pos + 2, pos + 2))
            break
        if marker == 0xFF93 or 0xFF30 <= marker <= 0xFF3F:
            found.append(Segment(marker, pos, pos + 2, pos + 2))
            pos += 2
            if marker == 0xFF93:  # SOD: the tile-part's data, up to where SOT said it ends
                end = tile_end if tile_end > pos else len(buf) - 2
                found.append(Segment(0, pos, pos, min(max(end, pos), len(buf))))
                pos = max(end, pos)
            continue
        end = pos + 2 + _get(buf, pos + 2, 2, little=False)
        if marker == 0xFF90:
            psot = _get(buf, pos + 6, 4, little=False)
            tile_end = pos + psot if psot else len(buf) - 2
        found.append(Segment(marker, pos, pos + 4, min(end, len(buf))))
        pos = end
    return found


_NAMES = {
    0xFFC4: "DHT",
    0xFFDA: "SOS",
    0xFFDB: "DQT",
    0xFFDD: "DRI",
    0xFFDC: "DNL",
    0xFFF7: "SOF55",
    0xFFF8: "LSE",
    0xFFFE: "COM",
    0xFFD8: "SOI",
    0xFFD9: "EOI/EOC",
    0xFF4F: "SOC",
    0xFF50: "CAP",
    0xFF51: "SIZ",
    0xFF52: "COD",
    0xFF53: "COC",
    0xFF55: "TLM",
    0xFF58: "PLT",
    0xFF5C: "QCD",
    0xFF5D: "QCC",
    0xFF5E: "RGN",
    0xFF5F: "POC",
    0xFF64: "COM",
    0xFF90: "SOT",
    0xFF93: "SOD",
}


def _name(marker: int) -> str:
    if marker == 0:
        return "data"
    if marker & 0xFF in _SOF and marker != 0xFFF7:
        return f"SOF{(marker & 0xFF) - 0xC0}"
    if 0xFFE0 <= marker <= 0xFFEF:
        return f"APP{marker - 0xFFE0}"
    return _NAMES.get(marker, f"{marker:04X}")


Field = tuple[str, int, int, tuple[int, ...]]  # name, offset after the length, size, values
_U8 = (0, 1, 2, 3, 4, 7, 8, 15, 16, 127, 128, 255)
_U16 = (0, 1, 2, 3, 7, 8, 255, 256, 4095, 4096, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)
_U32 = _numbers(
    "0 1 2 3 7 8 15 16 64 255 256 0xFFFF 0x10000 46340 46341 0x7FFFFFFF 0x80000000 0xFFFFFFFE "
    "0xFFFFFFFF"
)
_SAMPLING = (0x00, 0x01, 0x10, 0x11, 0x12, 0x21, 0x22, 0x41, 0x14, 0x44, 0x0F, 0xF0, 0xFF)


def _jpeg_fields(buf: bytes | bytearray, seg: Segment) -> list[Field]:
    """The parameters of a JPEG or JPEG-LS marker segment worth changing."""
    marker = seg.marker & 0xFF
    at = seg.payload
    if marker in _SOF:
        fields: list[Field] = [
            ("P", 0, 1, (0, 1, 2, 7, 8, 9, 12, 16, 17, 255)),
            ("Y", 1, 2, _U16),
            ("X", 3, 2, _U16),
            ("Nf", 5, 1, (0, 1, 2, 3, 4, 5, 255)),
        ]
        for c in range(min(buf[at + 5] if at + 5 < len(buf) else 0, 4)):
            fields += [
                (f"C{c}", 6 + 3 * c, 1, (0, 1, 2, 3, 255)),
                (f"HV{c}", 7 + 3 * c, 1, _SAMPLING),
                (f"Tq{c}", 8 + 3 * c, 1, _U8),
            ]
        return fields
    if marker == 0xDB:
        return [("PqTq", 0, 1, (0x00, 0x01, 0x03, 0x04, 0x10, 0x13, 0xF0, 0xFF)), ("Q0", 1, 1, _U8)]
    if marker == 0xC4:
        counts = [(f"L{i + 1}", 1 + i, 1, (0, 1, 2, 16, 255)) for i in range(16)]
        return [("TcTh", 0, 1, (0x00, 0x01, 0x10, 0x11, 0x02, 0x04, 0x20, 0xFF)), *counts]
    if marker == 0xDA:
        count = buf[at] if at < len(buf) else 0
        fields = [("Ns", 0, 1, (0, 1, 2, 3, 4, 5, 255))]
        for j in range(min(count, 4)):
            fields += [
                (f"Cs{j}", 1 + 2 * j, 1, (0, 1, 2, 3, 255)),
                (f"TdTa{j}", 2 + 2 * j, 1, (0x00, 0x11, 0x04, 0x40, 0x44, 0xFF)),
            ]
        tail = 1 + 2 * count
        # Lossless: predictor, point transform; JPEG-LS: NEAR, ILV, point transform.
        return [
            *fields,
            ("Ss/NEAR", tail, 1, (0, 1, 2, 3, 7, 8, 63, 64, 255)),
            ("Se/ILV", tail + 1, 1, (0, 1, 2, 3, 63, 64, 255)),
            ("AhAl", tail + 2, 1, (0x00, 0x01, 0x0E, 0x0F, 0x10, 0xF0, 0xFF)),
        ]
    if marker == 0xF8:
        return [
            ("ID", 0, 1, (0, 1, 2, 3, 4, 5, 255)),
            ("MAXVAL", 1, 2, _U16),
            ("T1", 3, 2, _U16),
            ("T2", 5, 2, _U16),
            ("T3", 7, 2, _U16),
            ("RESET", 9, 2, _U16),
        ]
    if marker in (0xDD, 0xDC):
        return [("value", 0, 2, _U16)]
    return []


def _j2k_fields(buf: bytes | bytearray, seg: Segment) -> list[Field]:
    """The parameters of a JPEG 2000 marker segment worth changing."""
    marker = seg.marker
    if marker == 0xFF51:
        fields: list[Field] = [("Rsiz", 0, 2, (0, 1, 2, 0x4000, 0x8000, 0xFFFF))]
        fields += [
            (name, 2 + 4 * i, 4, _U32)
            for i, name in enumerate(
                ("Xsiz", "Ysiz", "XOsiz", "YOsiz", "XTsiz", "YTsiz", "XTOsiz", "YTOsiz")
            )
        ]
        fields.append(("Csiz", 34, 2, (0, 1, 2, 3, 4, 5, 255, 16384, 0xFFFF)))
        components = _get(buf, seg.payload + 34, 2, little=False)
        for c in range(min(components, 4)):
            fields += [
                (
                    f"Ssiz{c}",
                    36 + 3 * c,
                    1,
                    (0, 1, 7, 8, 11, 15, 16, 23, 31, 37, 38, 0x87, 0x8F, 0xFF),
                ),
                (f"XRsiz{c}", 37 + 3 * c, 1, (0, 1, 2, 3, 4, 255)),
                (f"YRsiz{c}", 38 + 3 * c, 1, (0, 1, 2, 3, 4, 255)),
            ]
        return fields
    if marker == 0xFF52:
        return [
            ("Scod", 0, 1, (0, 1, 2, 4, 7, 0xFF)),
            ("progression", 1, 1, (0, 1, 2, 3, 4, 5, 255)),
            ("layers", 2, 2, (0, 1, 2, 0xFFFF)),
            ("MCT", 4, 1, (0, 1, 2, 255)),
            ("levels", 5, 1, (0, 1, 5, 6, 15, 32, 33, 255)),
            ("xcb", 6, 1, (0, 1, 2, 4, 8, 9, 10, 15, 255)),
            ("ycb", 7, 1, (0, 1, 2, 4, 8, 9, 10, 15, 255)),
            ("cblk style", 8, 1, (0, 0x01, 0x08, 0x3F, 0x40, 0xFF)),
            ("transform", 9, 1, (0, 1, 2, 255)),
            ("precinct", 10, 1, (0x00, 0x11, 0xFF)),
        ]
    if marker == 0xFF53:
        return [
            ("Ccoc", 0, 1, (0, 1, 3, 255)),
            ("levels", 2, 1, (0, 1, 32, 33, 255)),
            ("xcb", 3, 1, (0, 8, 10, 255)),
            ("transform", 6, 1, (0, 1, 2, 255)),
        ]
    if marker in (0xFF5C, 0xFF5D):
        return [
            ("Sqcd", 0, 1, (0x00, 0x01, 0x02, 0x20, 0x22, 0x40, 0xE2, 0xFF)),
            ("SPqcd", 1, 1, _U8),
            ("SPqcd16", 1, 2, _U16),
        ]
    if marker == 0xFF90:
        return [
            ("Isot", 0, 2, (0, 1, 0xFFFF)),
            ("Psot", 2, 4, (0, 1, 12, 14, *_U32)),
            ("TPsot", 6, 1, (0, 1, 255)),
            ("TNsot", 7, 1, (0, 1, 2, 255)),
        ]
    if marker == 0xFF50:
        return [("Pcap", 0, 4, (0, 0x00020000, 0xFFFFFFFF)), ("Ccap", 4, 2, _U16)]
    if marker == 0xFF5F:
        return [
            ("RSpoc", 0, 1, _U8),
            ("LYEpoc", 2, 2, _U16),
            ("REpoc", 4, 1, _U8),
            ("Ppoc", 6, 1, (0, 4, 5, 255)),
        ]
    return []


CodestreamOp = Callable[[random.Random, bytearray, list[Segment]], "str | None"]


def _field_op(fields_of: Callable[[bytes | bytearray, Segment], list[Field]]) -> CodestreamOp:
    """An op that sets one parameter of one marker segment."""

    def op(rng: random.Random, buf: bytearray, segments: list[Segment]) -> str | None:
        choices = [
            (seg, f)
            for seg in segments
            for f in fields_of(buf, seg)
            if seg.payload + f[1] + f[2] <= min(seg.end, len(buf))
        ]
        if not choices:
            return None
        seg, (name, offset, size, values) = rng.choice(choices)
        at = seg.payload + offset
        old = _get(buf, at, size, little=False)
        new = rng.choice((*values, old + 1, old - 1)) & ((1 << (8 * size)) - 1)
        _put(buf, at, size, new, little=False)
        return f"{_name(seg.marker)} {name} {old} -> {new}"

    return op


def _with_length(segments: list[Segment]) -> list[Segment]:
    return [s for s in segments if s.marker and s.payload == s.start + 4]


def _segment_length(rng: random.Random, buf: bytearray, segments: list[Segment]) -> str | None:
    candidates = _with_length(segments)
    if not candidates:
        return None
    seg = rng.choice(candidates)
    old = _get(buf, seg.start + 2, 2, little=False)
    new = _interesting_length(rng, old, 2, len(buf) - seg.start - 2)
    _put(buf, seg.start + 2, 2, new, little=False)
    return f"{_name(seg.marker)} length {old} -> {new}"


def _drop_segment(rng: random.Random, buf: bytearray, segments: list[Segment]) -> str | None:
    candidates = [s for s in segments[1:] if s.marker]
    if not candidates:
        return None
    seg = rng.choice(candidates)
    del buf[seg.start : seg.end]
    return f"{_name(seg.marker)} dropped"


def _repeat_segment(rng: random.Random, buf: bytearray, segments: list[Segment]) -> str | None:
    candidates = [s for s in segments[1:] if s.marker]
    if not candidates:
        return None
    seg = rng.choice(candidates)
    buf[seg.end : seg.end] = buf[seg.start : seg.end]
    return f"{_name(seg.marker)} repeated"


_JPEG_INSERTS = _numbers(
    "0xFFE0 0xFFE1 0xFFEE 0xFFFE 0xFFC0 0xFFC3 0xFFC4 0xFFDB 0xFFDD 0xFFF7 0xFFF8 0xFFDA"
)
_J2K_INSERTS = (0xFF64, 0xFF50, 0xFF51, 0xFF52, 0xFF53, 0xFF5C, 0xFF55, 0xFF58, 0xFF5F, 0xFF90)
_STRAY = (b"\xff\x00", b"\xff\xd0", b"\xff\xd9", b"\xff\xff\xff", b"\xff\x4f", b"\xff\x93")


def _insert_op(markers: tuple[int, ...]) -> CodestreamOp:
    """An op that inserts a marker segment of random parameters, or a stray marker."""

    def op(rng: random.Random, buf: bytearray, segments: list[Segment]) -> str | None:
        if len(segments) < 2:
            return None
        at = rng.choice(segments[1:]).start
        if rng.random() < 0.2:
            stray = rng.choice(_STRAY)
            buf[at:at] = stray
            return f"stray {stray.hex()} inserted"
        marker = rng.choice(markers)
        payload = rng.randbytes(rng.choice((0, 1, 2, 5, 17, 64)))
        buf[at:at] = struct.pack(">HH", marker, len(payload) + 2) + payload
        return f"{_name(marker)} of {len(payload)} random bytes inserted"

    return op


def _data_op(rng: random.Random, buf: bytearray, segments: list[Segment]) -> str | None:
    """Entropy-coded or tile data damaged: flipped bytes, restart or end markers, a cut."""
    candidates = [s for s in segments if s.marker == 0 and s.end > s.start]
    if not candidates:
        return None
    seg = rng.choice(candidates)
    at = rng.randrange(seg.start, seg.end)
    what = rng.choice(("flip", "marker", "zeros", "cut"))
    if what == "flip":
        for _ in range(rng.choice((1, 2, 4, 16))):
            buf[rng.randrange(seg.start, seg.end)] ^= 1 << rng.randrange(8)
    elif what == "marker":
        buf[at:at] = rng.choice((b"\xff\xd0", b"\xff\xd7", b"\xff\x00", b"\xff\xd9", b"\xff\x91"))
    elif what == "zeros":
        buf[at : at + 64] = bytes(len(buf[at : at + 64]))
    else:
        del buf[at : min(seg.end, at + rng.choice((1, 16, 1024)))]
    return f"{what} in {seg.end - seg.start} bytes of data"


def _truncate_op(rng: random.Random, buf: bytearray, segments: list[Segment]) -> str | None:
    """Cut the codestream, at a segment or anywhere, keeping an end marker half the time."""
    points = [s.start for s in segments[1:]] + [rng.randrange(len(buf) + 1)]
    cut = rng.choice(points)
    del buf[cut:]
    end = rng.random() < 0.5
    if end:
        buf += b"\xff\xd9"  # so that a check for the end marker alone does not stop it
    return f"codestream cut at {cut}{' with an end marker' if end else ''}"


def _jp2_box(rng: random.Random, buf: bytearray, segments: list[Segment]) -> str | None:
    """A JP2 box length changed (JP2 files only)."""
    if not buf.startswith(_JP2_SIGNATURE):
        return None
    boxes: list[int] = []
    pos = 0
    while pos + 8 <= len(buf) and len(boxes) < 16:
        boxes.append(pos)
        length = _get(buf, pos, 4, little=False)
        if length < 8:
            break
        pos += length
    at = rng.choice(boxes)
    old = _get(buf, at, 4, little=False)
    new = rng.choice((*_U32, old + 1, old - 1)) & _UNDEFINED
    _put(buf, at, 4, new, little=False)
    return f"JP2 box {bytes(buf[at + 4 : at + 8])!r} length {old} -> {new}"


def _rle_count(rng: random.Random, buf: bytearray, _: list[Segment]) -> str | None:
    old = _get(buf, 0, 4, little=True)
    new = rng.choice((0, 1, 2, 3, 4, 8, 12, 15, 16, 255, 0xFFFFFFFF, old + 1, old - 1))
    _put(buf, 0, 4, new, little=True)
    return f"RLE segment count {old} -> {new & _UNDEFINED}"


def _rle_offset(rng: random.Random, buf: bytearray, _: list[Segment]) -> str | None:
    count = min(max(_get(buf, 0, 4, little=True), 1), 15)
    index = rng.randrange(count + 1 if count < 15 else 15)
    at = 4 + 4 * index
    old = _get(buf, at, 4, little=True)
    others = [_get(buf, 4 + 4 * i, 4, little=True) for i in range(15)]
    size = len(buf)
    choices = (*_numbers("0 1 4 63 64 65 0xFFFFFFFF"), size - 1, size, size + 1, old + 1, old - 1)
    new = rng.choice((*choices, old + 0x10000, rng.choice(others)))
    _put(buf, at, 4, new, little=True)
    return f"RLE offset {index} {old} -> {new & _UNDEFINED}"


def _rle_data(rng: random.Random, buf: bytearray, _: list[Segment]) -> str | None:
    if len(buf) <= 64:
        return None
    for _i in range(rng.choice((1, 2, 8))):
        buf[rng.randrange(64, len(buf))] = rng.choice((0x80, 0x81, 0x7F, 0x00, 0xFF, 0xFE, 0x01))
    return "RLE control bytes changed"


def _rle_cut(rng: random.Random, buf: bytearray, _: list[Segment]) -> str | None:
    cut = rng.choice((0, 4, 63, 64, 65, rng.randrange(len(buf) + 1)))
    del buf[cut:]
    return f"RLE frame cut at {cut}"


_CODESTREAM_OPS: dict[str, tuple[tuple[int, CodestreamOp], ...]] = {
    "jpeg": (
        (8, _field_op(_jpeg_fields)),
        (2, _segment_length),
        (1, _drop_segment),
        (1, _repeat_segment),
        (2, _insert_op(_JPEG_INSERTS)),
        (3, _data_op),
        (2, _truncate_op),
    ),
    "j2k": (
        (8, _field_op(_j2k_fields)),
        (2, _segment_length),
        (1, _drop_segment),
        (1, _repeat_segment),
        (1, _insert_op(_J2K_INSERTS)),
        (3, _data_op),
        (2, _truncate_op),
        (1, _jp2_box),
    ),
    "rle": ((3, _rle_count), (4, _rle_offset), (3, _rle_data), (1, _rle_cut)),
}


def _family(value: bytes | bytearray, syntax: str) -> str | None:
    if value.startswith(b"\xff\xd8"):
        return "jpeg"
    if value.find(b"\xff\x4f\xff\x51", 0, 4096) >= 0:
        return "j2k"
    if syntax == uid.RLELossless and len(value) >= 64:
        return "rle"
    return None


def _segments(family: str, value: bytearray) -> list[Segment]:
    if family == "jpeg":
        return jpeg_segments(value)
    return j2k_segments(value) if family == "j2k" else []


def mutate_codestream(rng: random.Random, doc: Doc) -> str | None:
    """A JPEG, JPEG-LS, JPEG 2000 or RLE frame mutated by its own structure."""
    frames = [(i, f) for group in _fragment_groups(doc.elements()) for i, f in enumerate(group)]
    frames = [(i, f) for i, f in frames if i > 0 and f.length > 0]
    if not frames:
        return None
    index, frag = rng.choice(frames)
    value = bytearray(doc.body[frag.value_at : frag.stop])
    family = _family(value, doc.syntax)
    if family is None:
        return None
    ops = _CODESTREAM_OPS[family]
    op = rng.choices([o for _, o in ops], weights=[w for w, _ in ops])[0]
    described = op(rng, value, _segments(family, value))
    if described is None:
        return None
    doc.body[frag.start : frag.stop] = _item_bytes(value)
    return f"{family} fragment {index - 1}: {described}"


# --- generic mutators ----------------------------------------------------------------------------


def _target(rng: random.Random, doc: Doc) -> tuple[bytearray, int, int, str]:
    """Where a byte-level mutation goes: mostly the pixel data, else anywhere."""
    if rng.random() < 0.1 or not doc.body:
        return doc.meta, 132, len(doc.meta), "meta"
    if rng.random() < 0.5:
        pixels = [e for e in doc.elements() if e.tag == _PIXEL_DATA and e.depth == 0]
        if pixels and pixels[0].stop > pixels[0].value_at:
            return doc.body, pixels[0].value_at, min(pixels[0].stop, len(doc.body)), "pixel data"
    return doc.body, 0, len(doc.body), "dataset"


def mutate_flip(rng: random.Random, doc: Doc) -> str | None:
    """Random bits flipped."""
    buf, start, end, where = _target(rng, doc)
    if end <= start:
        return None
    count = rng.choice((1, 1, 2, 4, 8, 32))
    for _ in range(count):
        buf[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
    return f"{count} bits flipped in the {where}"


def mutate_set_bytes(rng: random.Random, doc: Doc) -> str | None:
    """A few bytes set to boundary values."""
    buf, start, end, where = _target(rng, doc)
    if end <= start:
        return None
    at = rng.randrange(start, end)
    value = bytes([rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF))]) * rng.choice((1, 2, 4))
    buf[at : at + len(value)] = value
    return f"{value.hex()} written in the {where}"


def mutate_insert_bytes(rng: random.Random, doc: Doc) -> str | None:
    """Random or repeated bytes inserted."""
    buf, start, end, where = _target(rng, doc)
    at = rng.randrange(start, end + 1)
    size = rng.choice((1, 2, 3, 8, 64, 256))
    value = rng.randbytes(size) if rng.random() < 0.5 else bytes([rng.randrange(256)]) * size
    buf[at:at] = value
    return f"{size} bytes inserted in the {where}"


def mutate_delete_bytes(rng: random.Random, doc: Doc) -> str | None:
    """A range of bytes deleted."""
    buf, start, end, where = _target(rng, doc)
    if end <= start:
        return None
    at = rng.randrange(start, end)
    size = rng.choice((1, 2, 4, 16, 256))
    del buf[at : at + size]
    return f"{size} bytes deleted from the {where}"


def mutate_duplicate_bytes(rng: random.Random, doc: Doc) -> str | None:
    """A range of bytes repeated."""
    buf, start, end, where = _target(rng, doc)
    if end <= start:
        return None
    at = rng.randrange(start, end)
    size = rng.choice((2, 8, 64, 4096))
    buf[at:at] = buf[at : at + size]
    return f"{size} bytes repeated in the {where}"


def mutate_truncate(rng: random.Random, doc: Doc) -> str | None:
    """The dataset cut short, mostly at or next to an element boundary."""
    elements = doc.elements()
    points = [p + d for e in elements for p in (e.start, e.value_at, e.stop) for d in (-1, 0, 1)]
    points = [p for p in points if 0 <= p < len(doc.body)]
    cut = rng.choice(points) if points and rng.random() < 0.8 else rng.randrange(len(doc.body) + 1)
    del doc.body[cut:]
    return f"dataset cut at {cut}"


def mutate_append(rng: random.Random, doc: Doc) -> str | None:
    """Garbage or a lone element header appended."""
    value = rng.randbytes(rng.choice((1, 7, 8, 12, 100)))
    if rng.random() < 0.5:
        value = _header(
            rng.choice((_PIXEL_DATA, 0xFFFCFFFC, 0x7FE00020)), "OB", _UNDEFINED, doc.enc
        )
    doc.body += value
    return f"{len(value)} bytes appended"


_MUTATORS: tuple[tuple[int, Mutator], ...] = (
    (8, _length_mutator(lambda e: True, meta_too=True)),
    (4, _length_mutator(_is_sequence_part, meta_too=False)),
    (5, _length_mutator(_is_encapsulation_part, meta_too=False)),
    (8, mutate_us_attribute),
    (5, mutate_text_attribute),
    (3, mutate_syntax),
    (2, mutate_drop_element),
    (2, mutate_duplicate_element),
    (2, mutate_vr),
    (1, mutate_deep_nesting),
    (1, mutate_icon),
    (1, mutate_extended_offsets),
    (4, mutate_offset_table),
    (5, mutate_fragments),
    (25, mutate_codestream),
    (6, mutate_flip),
    (3, mutate_set_bytes),
    (2, mutate_insert_bytes),
    (2, mutate_delete_bytes),
    (1, mutate_duplicate_bytes),
    (3, mutate_truncate),
    (1, mutate_append),
)


def mutate(rng: random.Random, doc: Doc) -> str:
    """Apply one mutation that fits the document; return what it did."""
    functions = [m for _, m in _MUTATORS]
    weights = [w for w, _ in _MUTATORS]
    for _ in range(20):
        mutator = rng.choices(functions, weights=weights)[0]
        try:
            described = mutator(rng, doc)
        except (IndexError, ValueError, struct.error, OverflowError):
            described = None  # a mutator's reading of already-mangled bytes: try another
        if described is not None:
            return described
    return mutate_flip(rng, doc) or "nothing"


def _mutate_file(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Damage the encoded file itself (for a deflated one, its deflate stream)."""
    buf = bytearray(data)
    if rng.random() < 0.5:
        cut = rng.randrange(132, len(buf) + 1) if len(buf) > 132 else len(buf)
        return bytes(buf[:cut]), f"file cut at {cut}"
    for _ in range(rng.choice((1, 4))):
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    return bytes(buf), "bits flipped in the encoded file"


def make_case(corpus: Corpus, run_seed: int, index: int) -> Case:
    """Input `index` of the run seeded `run_seed`: the seeds as they are first, then mutants."""
    if index < len(corpus.seeds):
        seed = corpus.seeds[index]
        return Case(index, seed.name, seed.syntax, seed.data, ("none",))
    rng = random.Random(f"{run_seed}:{index}")
    seed = corpus.pick(rng)
    doc = Doc.of(seed)
    count = rng.choice((1, 1, 1, 1, 1, 2, 2, 2, 3, 4, 6))
    mutations = [mutate(rng, doc) for _ in range(count)]
    data = doc.encoded()
    if rng.random() < 0.05:
        data, described = _mutate_file(rng, data)
        mutations.append(described)
    return Case(index, seed.name, seed.syntax, data, tuple(mutations))


# --- the child -----------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return f"{name}: {exc}"[:4000]


def error_event(stage: str, exc: BaseException) -> Event:
    """How a child reports an exception of `stage` ("header" or "transcode")."""
    return {
        f"{stage}_error": _describe(exc),
        "bridge": isinstance(exc, BridgeError),
        "exception": isinstance(exc, Exception),
        "readable": not _UNREADABLE.search(str(exc)) and len(str(exc)) <= _LONGEST_REASON,
    }


def _header_size(data: bytes, limit: int) -> object:
    """decoded_size, told the limit when it takes one."""
    reader: Callable[..., object] = decoded_size
    if "limit" in inspect.signature(decoded_size).parameters:
        return reader(data, limit=limit)
    return reader(data)


def exercise(data: bytes, limits: Limits, report: Report) -> None:
    """What each child does with its input: the header reader, then the transcoder."""
    report({"stage": "header"})
    try:
        size = _header_size(data, limits.max_decoded_bytes)
    except BaseException as exc:  # every exception is a finding here
        report(error_event("header", exc))
    else:
        report({"header": size if size is None or type(size) is int else repr(size)})
    report({"stage": "transcode"})
    try:
        transcode(data, TranscodeOptions(max_decoded_bytes=limits.max_decoded_bytes))
    except BaseException as exc:  # classified by the parent
        report(error_event("transcode", exc))
    else:
        report({"transcode": "ok"})


def _reporter(fd: int) -> Report:
    def report(event: Event) -> None:
        line = json.dumps(event).encode() + b"\n"
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]

    return report


def _announce_decoders(report: Report) -> None:
    """Make the codecs say which decoder they call, so that a crash names it."""
    original = getattr(bridge.dicom.codecs, "_decode_one", None)
    if original is None:
        return

    def announced(name: str, *args: Any, **kwargs: Any) -> Any:
        syntax = str(args[1]) if len(args) > 1 else ""
        report({"decoder": _library(name, syntax)})
        return original(name, *args, **kwargs)

    vars(bridge.dicom.codecs)["_decode_one"] = announced


_J2K_SYNTAXES = {
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
}


def _library(name: str, syntax: str) -> str:
    """The decoder's name, with the package behind pydicom's "pylibjpeg" plugin."""
    if name != "pylibjpeg":
        return name
    if syntax in _J2K_SYNTAXES:
        return "pylibjpeg/openjpeg"
    return "pylibjpeg/rle" if syntax == uid.RLELossless else "pylibjpeg/libjpeg"


class _PluginErrors(logging.Handler):
    """Reports each exception a pydicom decoding plugin raised, with its type."""

    # pydicom logs them, then sums them up by their text alone: a bare MemoryError has none.

    def __init__(self, report: Report) -> None:
        super().__init__(logging.ERROR)
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        """Report the exception the record carries, if any."""
        if record.exc_info and record.exc_info[1] is not None:
            self.report({"plugin_error": _describe(record.exc_info[1])})


def _watch_plugins(report: Report) -> None:
    logger = logging.getLogger("pydicom")
    logger.handlers = [_PluginErrors(report)]
    logger.propagate = False


def _only_decoder(name: str) -> None:
    """Leave `name` alone in every decoder chain that has it (to tell which one crashes)."""
    chains = bridge.dicom.codecs.DECODER_CHAINS
    for syntax, chain in chains.items():
        if name in chain:
            chains[syntax] = (name,)


def _address_space() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _isolate(capture_fd: int, limits: Limits) -> None:
    """Quiet the child, send its stderr to the capture file, and limit it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which kills us
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(capture_fd, 2)
    faulthandler.enable(file=2)  # a Python traceback at a crash names the decoder's module
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)  # ERROR stays: pydicom logs each failing plugin's exception
    _, core_hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, core_hard))  # thousands of crashes, no cores
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space() + limits.memory_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _child_main(
    fd: int, capture_fd: int, data: bytes, limits: Limits, check: Check, decoder: str | None
) -> NoReturn:
    code = 0
    try:
        _isolate(capture_fd, limits)
        if decoder:
            _only_decoder(decoder)
        report = _reporter(fd)
        _announce_decoders(report)
        _watch_plugins(report)
        check(data, limits, report)
        report({"done": True})
    except BaseException:  # the harness itself failed: the parent sees a missing "done"
        code = 70
    finally:
        os._exit(code)


# --- the parent ----------------------------------------------------------------------------------


@dataclass
class _Child:
    pid: int
    fd: int
    capture: IO[bytes]
    started: float
    deadline: float
    case: Case | None = None
    received: bytearray = field(default_factory=bytearray)


def _spawn(data: bytes, limits: Limits, check: Check, decoder: str | None) -> _Child:
    capture = tempfile.TemporaryFile()  # noqa: SIM115  # closed by _reap, after the child
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child_main(write_fd, capture.fileno(), data, limits, check, decoder)
    os.close(write_fd)
    now = time.monotonic()
    return _Child(pid, read_fd, capture, now, now + limits.timeout)


def _reap(child: _Child, timed_out: bool) -> Outcome:
    """Wait for the child (killed first when late) and gather what it said."""
    if timed_out:
        _stop(child.pid)
    _, status = os.waitpid(child.pid, 0)
    seconds = time.monotonic() - child.started
    os.close(child.fd)
    child.capture.seek(0, os.SEEK_END)
    child.capture.seek(max(0, child.capture.tell() - 16384))
    stderr = child.capture.read().decode("utf-8", "replace")
    child.capture.close()
    events = []
    for line in bytes(child.received).splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    return Outcome(tuple(events), status, timed_out, stderr, seconds)


def _stop(pid: int) -> None:
    """Stop a late child, asking it first where it was (faulthandler answers SIGABRT)."""
    os.kill(pid, signal.SIGABRT)
    with contextlib.suppress(OSError):  # no pidfd (old kernel): kill at once
        pidfd = os.pidfd_open(pid)
        try:
            select.select([pidfd], [], [], 1.0)  # readable once the child has ended
        finally:
            os.close(pidfd)
    os.kill(pid, signal.SIGKILL)  # a zombie by now, or stuck beyond a traceback


def _wait(running: dict[int, _Child]) -> Iterator[tuple[_Child, Outcome]]:
    """Read what the children say; yield each one that ended or ran out of time."""
    now = time.monotonic()
    timeout = max(0.0, min(c.deadline for c in running.values()) - now)
    ready, _, _ = select.select(list(running), [], [], min(timeout, 1.0))
    for fd in ready:
        child = running[fd]
        chunk = os.read(fd, 65536)
        if chunk:
            child.received += chunk
            continue
        del running[fd]
        yield child, _reap(child, timed_out=False)
    now = time.monotonic()
    for fd, child in list(running.items()):
        if now > child.deadline:
            del running[fd]
            yield child, _reap(child, timed_out=True)


def run_one(
    data: bytes,
    limits: Limits = Limits(),
    check: Check = exercise,
    decoder: str | None = None,
) -> Outcome:
    """Run one input in a child and wait for its outcome."""
    child = _spawn(data, limits, check, decoder)
    running = {child.fd: child}
    while True:
        for _, outcome in _wait(running):
            return outcome


# --- classification ------------------------------------------------------------------------------

_MEMORY = re.compile(
    r"MemoryError|bad_alloc|[Uu]nable to allocate|[Cc]annot allocate|[Cc]ould not allocate|"
    r"[Ff]ailed to allocate|memory allocation|[Oo]ut of memory|[Nn]ot enough memory|"
    r"[Ii]nsufficient memory|needed more than .* may use|allocation of \d+ bytes failed"
)
_NOTABLE = re.compile(
    r"terminate called.*|what\(\):.*|memory allocation of .*|thread .* panicked at.*|"
    r"Fatal Python error:.*|.*[Aa]ssertion.*failed.*|.*double free.*|.*corrupted.*"
)
_FRAME = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+) in (?P<function>\S+)')
_HARNESS_FRAMES = ("tests/fuzz.py",)


def _signal_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:
            return f"killed by signal {number}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def _innermost_frame(stderr: str) -> str:
    """The most recent Python frame faulthandler printed, outside this harness."""
    for match in _FRAME.finditer(stderr):
        path = match["path"]
        if not path.endswith(_HARNESS_FRAMES):
            short = "/".join(Path(path).parts[-2:])
            return f"{short}:{match['line']} {match['function']}"
    return ""


def _normalized(text: str) -> str:
    line = text.splitlines()[0] if text else ""
    line = re.sub(r"\s*\[SOP Instance UID .*$", "", line)
    return re.sub(r"0x[0-9a-fA-F]+|\d+", "N", line)[:300]


def _last(events: Sequence[Event], key: str) -> str:
    values = [str(e[key]) for e in events if key in e]
    return values[-1] if values else ""


def classify(case: Case, outcome: Outcome, limits: Limits) -> list[Finding]:
    """The findings one input gave, if any."""
    events = outcome.events

    def finding(kind: str, detail: str, **extra: str) -> Finding:
        where = {"stage": _last(events, "stage"), "decoder": _last(events, "decoder"), **extra}
        return Finding(kind, detail, case.seed, case.syntax, case.mutations, **where)

    if outcome.timed_out:
        where = {"frame": _innermost_frame(outcome.stderr), "stderr": _excerpt(outcome)}
        return [finding("timeout", f"no answer within {limits.timeout:g} s", **where)]
    if not any("done" in e for e in events):
        return [_died(finding, outcome)]
    return _header_findings(finding, events, limits) + _transcode_findings(finding, events)


def _died(finding: Callable[..., Finding], outcome: Outcome) -> Finding:
    text = _signal_text(outcome.status)
    notable = _NOTABLE.search(outcome.stderr)
    detail = f"{text}: {notable.group(0).strip()}" if notable else text
    kind = "memory" if _MEMORY.search(outcome.stderr) else "crash"
    return finding(kind, detail, frame=_innermost_frame(outcome.stderr), stderr=_excerpt(outcome))


def _excerpt(outcome: Outcome) -> str:
    """The child's last words: from its first notable line on, without the harness's frames."""
    lines = outcome.stderr.splitlines()
    first = next(
        (i for i, line in enumerate(lines) if _NOTABLE.search(line)), max(0, len(lines) - 30)
    )
    kept = [
        line
        for line in lines[first:]
        if not any(h in line for h in (*_HARNESS_FRAMES, "<frozen runpy>", "Extension modules"))
    ]
    return "\n".join(kept[:30])


def _header_findings(
    finding: Callable[..., Finding], events: Sequence[Event], limits: Limits
) -> list[Finding]:
    for event in events:
        if "header_error" in event:
            text = str(event["header_error"])
            kind = "memory" if _MEMORY.search(text) else "header"
            return [finding(kind, f"decoded_size raised {text}", stage="header")]
        if "header" in event:
            size = event["header"]
            if size is not None and type(size) is not int:
                return [finding("header", f"decoded_size returned {size}", stage="header")]
            if size is not None and size < 0:
                return [
                    finding(
                        "header", f"decoded_size returned a negative size {size}", stage="header"
                    )
                ]
            if size is not None and size > limits.max_decoded_bytes:
                detail = f"decoded_size returned {size}, above the limit {limits.max_decoded_bytes}"
                return [finding("header", detail, stage="header")]
    return []


def _transcode_findings(finding: Callable[..., Finding], events: Sequence[Event]) -> list[Finding]:
    decoder = ""
    for event in events:
        decoder = str(event.get("decoder", decoder))
        text = str(event.get("plugin_error", ""))
        if _MEMORY.search(text):  # handled, but a decoder asked for more than the limit
            return [
                finding("memory", f"{decoder} raised {text}", stage="transcode", decoder=decoder)
            ]
        if "transcode_error" not in event:
            continue
        text = str(event["transcode_error"])
        if _MEMORY.search(text):
            return [finding("memory", text, stage="transcode")]
        if not event["bridge"] or not event["exception"]:
            return [finding("leak", text, stage="transcode")]
        if not event.get("readable", True):
            return [finding("reason", text[:_LONGEST_REASON], stage="transcode")]
    return []


# --- runs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One fuzzing run."""

    seconds: float = 60.0
    seed: int = 1
    out: Path | None = None
    jobs: int = 1
    limits: Limits = Limits()
    max_inputs: int | None = None
    decoder: str | None = None  # keep only this decoder in the chains
    progress: bool = False  # a line on stderr every 30 s


class FindingLog:
    """Findings deduplicated, each new one saved with its input."""

    def __init__(self, out: Path | None) -> None:
        self.out = out
        self.unique: list[Finding] = []
        self.counts: Counter[str] = Counter()
        self._keys: set[tuple[str, str, str, str]] = set()
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            self._keys |= _saved_keys(out / "findings.jsonl")

    def add(self, finding: Finding, case: Case, run_seed: int) -> bool:
        """Count the finding; keep and save it when it is new."""
        self.counts[finding.kind] += 1
        if finding.key() in self._keys:
            return False
        self._keys.add(finding.key())
        self.unique.append(finding)
        if self.out is not None:
            self._save(finding, case, run_seed)
        return True

    def _save(self, finding: Finding, case: Case, run_seed: int) -> None:
        assert self.out is not None
        digest = hashlib.sha1(case.data).hexdigest()
        name = f"{finding.kind}-{digest[:12]}.dcm"
        (self.out / name).write_bytes(case.data)
        record = {**_record(finding), "file": name, "run_seed": run_seed, "index": case.index}
        with (self.out / "findings.jsonl").open("a") as log:
            log.write(json.dumps(record) + "\n")


def _record(finding: Finding) -> dict[str, Any]:
    return {
        "kind": finding.kind,
        "seed": finding.seed,
        "syntax": finding.syntax,
        "mutations": list(finding.mutations),
        "detail": finding.detail,
        "stage": finding.stage,
        "decoder": finding.decoder,
        "frame": finding.frame,
        "stderr": finding.stderr,
    }


def _saved_keys(path: Path) -> set[tuple[str, str, str, str]]:
    """The keys of findings an earlier run saved in the same place."""
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
            keys.add((r["kind"], r["seed"], _normalized(r["detail"]), r["decoder"]))
        except (ValueError, KeyError):
            continue
    return keys


@dataclass
class RunReport:
    """What a run did and found."""

    inputs: int
    seconds: float
    seeds: int
    syntaxes: int
    log: FindingLog

    @property
    def rate(self) -> float:
        """Inputs per second."""
        return self.inputs / self.seconds if self.seconds else 0.0

    def findings(self, *kinds: str) -> list[Finding]:
        """The distinct findings, of `kinds` only when given."""
        return [f for f in self.log.unique if not kinds or f.kind in kinds]

    def summary(self) -> str:
        """A few lines for a person."""
        lines = [
            f"inputs: {self.inputs} in {self.seconds:.0f} s ({self.rate:.1f}/s), "
            f"{self.seeds} seeds over {self.syntaxes} transfer syntaxes",
            "findings (distinct/all): "
            + ", ".join(
                f"{kind} {sum(f.kind == kind for f in self.log.unique)}/{self.log.counts[kind]}"
                for kind in KINDS
            ),
        ]
        lines += [f"  {f.kind}: {f.seed}: {f.detail[:160]}" for f in self.log.unique]
        return "\n".join(lines)


def fuzz(config: Config, corpus: Corpus | None = None) -> RunReport:
    """Run inputs for `config.seconds` (or `config.max_inputs`) and collect the findings."""
    corpus = corpus or load_corpus()
    log = FindingLog(config.out)
    running: dict[int, _Child] = {}
    started = last_progress = time.monotonic()
    index = 0
    try:
        while True:
            while len(running) < config.jobs and _more(config, index, started):
                case = make_case(corpus, config.seed, index)
                index += 1
                child = _spawn(case.data, config.limits, exercise, config.decoder)
                child.case = case
                running[child.fd] = child
            if not running:
                break
            for child, outcome in _wait(running):
                assert child.case is not None
                for finding in classify(child.case, outcome, config.limits):
                    log.add(finding, child.case, config.seed)
            if config.progress and time.monotonic() - last_progress > 30:
                last_progress = time.monotonic()
                _progress(index, last_progress - started, log)
    finally:
        _kill(running)
    report = RunReport(
        index, time.monotonic() - started, len(corpus.seeds), len(corpus.groups), log
    )
    if config.out is not None:
        _write_summary(config, report)
    return report


def _more(config: Config, index: int, started: float) -> bool:
    if config.max_inputs is not None and index >= config.max_inputs:
        return False
    return time.monotonic() - started < config.seconds


def _kill(running: dict[int, _Child]) -> None:
    for child in running.values():
        _reap(child, timed_out=True)
    running.clear()


def _progress(inputs: int, seconds: float, log: FindingLog) -> None:
    counts = ", ".join(f"{kind} {log.counts[kind]}" for kind in KINDS)
    print(f"{seconds:.0f} s: {inputs} inputs ({inputs / seconds:.1f}/s); {counts}", file=sys.stderr)


def _write_summary(config: Config, report: RunReport) -> None:
    assert config.out is not None
    summary = {
        "seed": config.seed,
        "inputs": report.inputs,
        "seconds": round(report.seconds, 1),
        "rate": round(report.rate, 2),
        "distinct": Counter(f.kind for f in report.log.unique),
        "all": report.log.counts,
    }
    path = config.out / f"summary-seed{config.seed}.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")


def replay(path: Path, limits: Limits, decoder: str | None = None) -> tuple[Outcome, list[Finding]]:
    """Run one saved input again (optionally with a single decoder) and classify it."""
    data = path.read_bytes()
    case = Case(0, path.name, _syntax_of(data), data, ("replayed",))
    outcome = run_one(data, limits, exercise, decoder)
    return outcome, classify(case, outcome, limits)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="where findings are saved")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per input")
    parser.add_argument("--memory-mb", type=int, default=1536, help="address space per input")
    parser.add_argument("--max-decoded-mb", type=int, default=256)
    parser.add_argument("--max-inputs", type=int, default=None)
    parser.add_argument("--seeds-dir", type=Path, default=None)
    parser.add_argument("--max-seed-mb", type=float, default=2.0)
    parser.add_argument("--decoder", default=None, help="keep only this decoder in the chains")
    parser.add_argument(
        "--replay", type=Path, nargs="*", default=None, help="saved inputs to rerun"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line."""
    args = _arguments(argv)
    limits = Limits(args.timeout, args.memory_mb * MIB, args.max_decoded_mb * MIB)
    if args.replay is not None:
        for path in args.replay:
            outcome, findings = replay(path, limits, args.decoder)
            print(
                f"{path.name}: {_signal_text(outcome.status)}, {outcome.seconds:.2f} s, "
                f"events {list(outcome.events)}"
            )
            for finding in findings:
                print(f"  {finding.kind}: {finding.detail} [{finding.decoder} {finding.frame}]")
        return 0
    corpus = load_corpus(args.seeds_dir, int(args.max_seed_mb * MIB))
    config = Config(
        args.seconds,
        args.seed,
        args.out,
        args.jobs,
        limits,
        args.max_inputs,
        args.decoder,
        progress=True,
    )
    print(_coverage(corpus), file=sys.stderr)
    print(fuzz(config, corpus).summary())
    return 0


def _coverage(corpus: Corpus) -> str:
    parts = [f"{g[0].syntax or '?'} x{len(g)}" for g in corpus.groups]
    return f"{len(corpus.seeds)} seeds: " + ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
