"""Broken and hostile DICOM files that Orthanc 1.10 stores but nobody can (or should) decode.

Each is built from a real pydicom test file with a fresh SOP Instance UID, so that it is a new
instance, and each is accepted by Orthanc (tests/test_resilience.py checks every upload): the
point is what the bridge does with it after the PACS delivered it.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, generate_uid

from tests.orthanc import pydicom_test_files

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
MPEG4_AVC = "1.2.840.10008.1.2.4.102"

J2K_SOURCE = "693_J2KI.dcm"  # JPEG 2000, 512x512, 16-bit, one frame


def _load(filename: str) -> Dataset:
    ds = pydicom.dcmread(pydicom_test_files() / filename)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _save(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _first_frame(ds: Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def truncated_codestream() -> bytes:
    """A JPEG 2000 file whose codestream was cut to a third."""
    ds = _load(J2K_SOURCE)
    frame = _first_frame(ds)
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    return _save(ds)


def mislabelled(syntax: str) -> Callable[[], bytes]:
    """A factory: a valid JPEG 2000 codestream in a file whose meta claims `syntax`."""

    def build() -> bytes:
        ds = _load(J2K_SOURCE)
        ds.file_meta.TransferSyntaxUID = UID(syntax)
        return _save(ds)

    build.__name__ = f"j2k_labelled_{syntax}"
    return build


def gigantic_header() -> bytes:
    """Declares 65535 x 65535 x 16 bits x 1000 frames (8 TB decoded) with a few bytes of data."""
    ds = _load(J2K_SOURCE)
    frame = _first_frame(ds)
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 1000
    ds.PixelData = encapsulate([frame[:64]])
    return _save(ds)


def lying_dimensions() -> bytes:
    """A valid 512 x 512 codestream in a header claiming 30000 x 30000 (1.7 GB decoded)."""
    # Under the default size limit: only a bridge that checks the first frame before
    # allocating the whole output stays small.
    ds = _load(J2K_SOURCE)
    ds.Rows = ds.Columns = 30000
    return _save(ds)


def video() -> bytes:
    """An MPEG-4 AVC/H.264 instance: a few bytes of "video" in encapsulated pixel data."""
    ds = _load(J2K_SOURCE)
    ds.file_meta.TransferSyntaxUID = UID(MPEG4_AVC)
    # Start code and an SPS-like NAL header: not a playable stream, nobody here decodes video.
    ds.PixelData = encapsulate([b"\x00\x00\x00\x01\x67\x42\x00\x1e" + bytes(range(256)) * 4])
    ds.NumberOfFrames = 1
    return _save(ds)


# name -> builder; each call makes a new instance.
BAD_FILES: dict[str, Callable[[], bytes]] = {
    "truncated": truncated_codestream,
    "j2k_as_jpeg_ls": mislabelled(JPEG_LS_LOSSLESS),
    "j2k_as_rle": mislabelled(RLE_LOSSLESS),
    "gigantic": gigantic_header,
    "lying_dimensions": lying_dimensions,
    "video": video,
}


# --- Inputs that reach the decoders -------------------------------------------------------------
# Each changes one field, byte or marker segment of a real file, unless its comment says
# otherwise; its docstring names the defect and what it did to the decoders (pydicom 3.0.2 with
# pylibjpeg 2.1, python-gdcm 3.2.6, pyjpegls 1.5.1, pylibjpeg-rle 2.2). The quirk_ files are
# decoded by DCMTK and GDCM to the unchanged file's pixels.

HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"

JPEG_BASELINE_SOURCE = "SC_rgb_jpeg_dcmtk.dcm"  # 100 x 100 RGB, JFIF APP0, odd codestream
JPEG_EXTENDED_SOURCE = "JPGExtended.dcm"  # 1024 x 256, 12-bit
JPEG_LOSSLESS_SOURCE = "SC_rgb_jpeg_gdcm.dcm"  # process 14 SV1, 100 x 100 RGB, Adobe APP14
JPEG_LS_SOURCE = "MR_small_jpeg_ls_lossless.dcm"  # 64 x 64, 16-bit
JPEG_LS_RGB_SOURCE = "SC_rgb_jls_lossy_line.dcm"  # 100 x 100 RGB, near-lossless
J2K_RGB_SOURCE = "SC_rgb_gdcm_KY.dcm"  # 100 x 100 RGB, three components
RLE_SOURCE = "MR_small_RLE.dcm"  # 64 x 64, 16-bit
DEFLATED_SOURCE = "image_dfl.dcm"  # 512 x 512, 8-bit
RLE_MULTIFRAME_SOURCE = "SC_rgb_rle_2frame.dcm"  # 2 frames of 100 x 100 RGB
JPEG_MULTIFRAME_SOURCE = "examples_ybr_color.dcm"  # 30 frames of 240 x 320 YBR_FULL_422

# JPEG marker codes (the byte after 0xFF) and offsets into a segment that starts at its 0xFF.
_APP0, _APP14, _DQT = 0xE0, 0xEE, 0xDB
_SOF0, _SOF1, _SOF3, _SOF55, _LSE = 0xC0, 0xC1, 0xC3, 0xF7, 0xF8
_SOS = 0xDA
_LENGTH, _PRECISION, _HEIGHT, _WIDTH = 2, 4, 5, 7
# JPEG-LS preset parameters (LSE id 1): MAXVAL, T1, T2, T3, RESET after the id byte.
_MAXVAL, _RESET = 5, 13
# JPEG 2000 SIZ fields as offsets from the start of the codestream (SOC, then SIZ).
_RSIZ, _XSIZ, _YSIZ, _CSIZ, _SSIZ = 6, 8, 12, 40, 42
_SIZ_LARGER = 20000  # 20000 x 20000: 1.6 GB as OpenJPEG's 32-bit samples, 0.8 GB as output

# A private element to hold the zeros of a deflate bomb.
_BOMB_CREATOR = "ORTHANC-BRIDGE HOSTILE"
_BOMB_TAG = 0x00091010
_BOMB_CHUNK = 1 << 24  # 16 MiB of zeros, deflated once and repeated


def _with_frame(ds: Dataset, frame: bytes | bytearray) -> bytes:
    """The instance with `frame` as its only fragment."""
    ds.PixelData = encapsulate([bytes(frame)])
    return _save(ds)


def _padded_after_end(filename: str, padding: bytes) -> bytes:
    """`filename` with `padding` after its codestream's end marker, instead of its own."""
    ds = _load(filename)
    frame = _first_frame(ds)
    end = frame.rindex(b"\xff\xd9") + 2
    if (end + len(padding)) % 2:
        raise ValueError(f"{filename}: {end} + {len(padding)} bytes would make an odd fragment")
    return _with_frame(ds, frame[:end] + padding)


def _offsets_changed(filename: str, change: Callable[[int], int]) -> bytes:
    """The multi-frame `filename`, one fragment per frame, with each BOT offset changed."""
    ds = _load(filename)
    count = int(ds.NumberOfFrames)
    value = bytearray(encapsulate(list(generate_frames(ds.PixelData, number_of_frames=count))))
    for index in range(count):  # the offsets follow the BOT item's 8-byte tag and length
        (offset,) = struct.unpack_from("<I", value, 8 + 4 * index)
        struct.pack_into("<I", value, 8 + 4 * index, change(offset))
    ds.PixelData = bytes(value)
    return _save(ds)


def _jpeg_segment(frame: bytes | bytearray, marker: int) -> int:
    """The offset of the first `marker` segment before the scan (walked, not searched for)."""
    pos = 2  # after SOI
    while pos + 4 <= len(frame) and frame[pos] == 0xFF and frame[pos + 1] != _SOS:
        if frame[pos + 1] == marker:
            return pos
        pos += 2 + int.from_bytes(frame[pos + 2 : pos + 4], "big")
    raise ValueError(f"no 0xFF{marker:02X} segment before the scan")


def _patched_jpeg(filename: str, marker: int, offset: int, value: bytes) -> bytes:
    """`filename` with `value` written `offset` bytes into its first `marker` segment."""
    ds = _load(filename)
    frame = bytearray(_first_frame(ds))
    start = _jpeg_segment(frame, marker) + offset
    frame[start : start + len(value)] = value
    return _with_frame(ds, frame)


def _j2k_main_header(frame: bytes | bytearray) -> dict[int, int]:
    """Marker code -> offset of each main-header segment of a codestream, up to the first SOT."""
    if bytes(frame[:4]) != b"\xff\x4f\xff\x51":
        raise ValueError("not a JPEG 2000 codestream starting with SOC, SIZ")
    found: dict[int, int] = {}
    pos = 2
    while pos + 4 <= len(frame) and frame[pos] == 0xFF and frame[pos + 1] != 0x90:
        found.setdefault(0xFF00 | frame[pos + 1], pos)
        pos += 2 + int.from_bytes(frame[pos + 2 : pos + 4], "big")
    found[0xFF90] = pos
    return found


def _enlarged_siz(frame: bytes | bytearray, size: int) -> bytearray:
    """The codestream with SIZ declaring a `size` x `size` image (tiles left as they are)."""
    frame = bytearray(frame)
    _j2k_main_header(frame)  # checks that SIZ is where it must be
    struct.pack_into(">I", frame, _XSIZ, size)
    struct.pack_into(">I", frame, _YSIZ, size)
    return frame


def _as_htj2k(frame: bytes | bytearray) -> bytes:
    """A blank HTJ2K codestream with the main header of the JPEG 2000 `frame`.

    Rsiz says Part 15, a CAP segment follows SIZ, COD asks for HT code-blocks, and the one tile
    holds only empty packets, which need no code-block coder to encode: a valid codestream.
    """
    markers = _j2k_main_header(frame)
    cod, sot = markers[0xFF52], markers[0xFF90]
    scod, layers, levels = frame[cod + 4], frame[cod + 6] << 8 | frame[cod + 7], frame[cod + 9]
    components = int.from_bytes(frame[_CSIZ : _CSIZ + 2], "big")
    if scod & 1:  # user-defined precincts would need one empty packet per precinct
        raise ValueError("codestreams with precinct sizes are not supported here")
    header = bytearray(frame[:sot])
    struct.pack_into(">H", header, _RSIZ, 0x4000)  # HTJ2K: capabilities in CAP
    header[cod + 12] |= 0x40  # SPcod code-block style: HT
    siz_end = 4 + int.from_bytes(frame[4:6], "big")
    header[siz_end:siz_end] = struct.pack(">HHIH", 0xFF50, 8, 1 << 17, 0)  # CAP: Part 15
    packets = bytes(layers * (levels + 1) * components)  # each empty packet is one 0 byte
    tile = struct.pack(">HHHIBB", 0xFF90, 10, 0, 14 + len(packets), 0, 1) + b"\xff\x93"
    return bytes(header) + tile + packets + b"\xff\xd9"


def _explicit_le(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def _raw_deflate(data: bytes, final: bool) -> bytes:
    """`data` as raw deflate blocks that refer to nothing before them.

    A full flush ends byte-aligned and resets the window, so such pieces concatenate into one
    valid stream; only the last may be final.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(
        zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH
    )


def _deflate_bomb(zeros: int) -> bytes:
    """image_dfl.dcm with a private OB element of `zeros` zero bytes, never held in memory."""
    if zeros % _BOMB_CHUNK or not 0 < zeros < 0xFFFFFFFF:
        raise ValueError(f"{zeros} is not a multiple of {_BOMB_CHUNK} below 4 GiB")
    ds = _load(DEFLATED_SOURCE)
    ds.private_block(_BOMB_TAG >> 16, _BOMB_CREATOR, create=True)
    before, after = Dataset(), Dataset()
    for elem in ds:
        (before if elem.tag < _BOMB_TAG else after).add(elem)
    element = struct.pack("<HH2sHI", _BOMB_TAG >> 16, _BOMB_TAG & 0xFFFF, b"OB", 0, zeros)
    zero_chunk = _raw_deflate(bytes(_BOMB_CHUNK), final=False)
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, ds.file_meta, enforce_standard=True)
    return b"".join(
        [
            head.getvalue(),
            _raw_deflate(_explicit_le(before) + element, final=False),
            zero_chunk * (zeros // _BOMB_CHUNK),
            _raw_deflate(_explicit_le(after), final=True),
        ]
    )


def j2k_siz_larger() -> bytes:
    """JPEG 2000 whose SIZ says 20000 x 20000 under a 512 x 512 header: decoders take 1.6-2.3 GB."""
    ds = _load(J2K_SOURCE)
    return _with_frame(ds, _enlarged_siz(_first_frame(ds), _SIZ_LARGER))


def htj2k_siz_larger() -> bytes:
    """HTJ2K whose SIZ says 20000 x 20000 under a 512 x 512 header: OpenJPEG takes 2.3 GB."""
    # pydicom ships no HTJ2K file and nothing installed encodes one (OpenJPEG only decodes it):
    # 693_J2KI's header over a blank HTJ2K tile (see _as_htj2k), then the same SIZ change.
    ds = _load(J2K_SOURCE)
    ds.file_meta.TransferSyntaxUID = UID(HTJ2K_LOSSLESS)
    return _with_frame(ds, _enlarged_siz(_as_htj2k(_first_frame(ds)), _SIZ_LARGER))


def jpeg_baseline_app0_length() -> bytes:
    """JPEG baseline whose APP0 (JFIF) segment length is 0: GDCM aborts the process."""
    return _patched_jpeg(JPEG_BASELINE_SOURCE, _APP0, _LENGTH, b"\0\0")


def jpeg_lossless_app14_length() -> bytes:
    """JPEG lossless whose APP14 (Adobe) segment length is 0: GDCM aborts the process."""
    return _patched_jpeg(JPEG_LOSSLESS_SOURCE, _APP14, _LENGTH, b"\0\0")


def jpeg_baseline_dqt_length() -> bytes:
    """JPEG baseline whose first DQT segment length is 2 (no table): GDCM aborts the process."""
    return _patched_jpeg(JPEG_BASELINE_SOURCE, _DQT, _LENGTH, b"\0\2")


def jpeg_extended_dqt_length() -> bytes:
    """12-bit JPEG whose DQT segment length is 2 (no table): direct GDCM aborts the process."""
    return _patched_jpeg(JPEG_EXTENDED_SOURCE, _DQT, _LENGTH, b"\0\2")


def jpeg_baseline_sof_precision_17() -> bytes:
    """JPEG baseline whose SOF0 says 17-bit samples: GDCM segfaults."""
    return _patched_jpeg(JPEG_BASELINE_SOURCE, _SOF0, _PRECISION, b"\x11")


def jpeg_extended_sof_precision_17() -> bytes:
    """12-bit JPEG whose SOF1 says 17-bit samples: direct GDCM segfaults."""
    return _patched_jpeg(JPEG_EXTENDED_SOURCE, _SOF1, _PRECISION, b"\x11")


def jpeg_lossless_sof_precision_17() -> bytes:
    """JPEG lossless whose SOF3 says 17-bit samples: GDCM segfaults."""
    return _patched_jpeg(JPEG_LOSSLESS_SOURCE, _SOF3, _PRECISION, b"\x11")


def jpeg_lossless_sof_precision_0() -> bytes:
    """JPEG lossless whose SOF3 says 0-bit samples: GDCM returns wrong pixels, DCMTK refuses."""
    return _patched_jpeg(JPEG_LOSSLESS_SOURCE, _SOF3, _PRECISION, b"\0")


def jpeg_ls_sof_precision_17() -> bytes:
    """JPEG-LS whose SOF55 says 17-bit samples: GDCM aborts the process."""
    return _patched_jpeg(JPEG_LS_SOURCE, _SOF55, _PRECISION, b"\x11")


def jpeg_ls_width_0() -> bytes:
    """JPEG-LS whose SOF55 says 0 samples per line: GDCM segfaults."""
    return _patched_jpeg(JPEG_LS_SOURCE, _SOF55, _WIDTH, b"\0\0")


def jpeg_ls_preset_maxval_3() -> bytes:
    """JPEG-LS whose preset parameters say MAXVAL 3 (under T1 18) and RESET 32768, not 65535 and
    64: GDCM's decoder loops for ever, CharLS refuses it (the fuzzer's input 34115)."""
    ds = _load(JPEG_LS_SOURCE)
    frame = bytearray(_first_frame(ds))
    start = _jpeg_segment(frame, _LSE)
    if frame[start + 4] != 1:
        raise ValueError(f"{JPEG_LS_SOURCE}: its LSE segment is not preset parameters")
    struct.pack_into(">H", frame, start + _MAXVAL, 3)
    struct.pack_into(">H", frame, start + _RESET, 32768)
    return _with_frame(ds, frame)


def jpeg_baseline_height_0() -> bytes:
    """JPEG baseline whose SOF0 says 0 lines (a DNL marker's job): pylibjpeg allocates unbounded."""
    return _patched_jpeg(JPEG_BASELINE_SOURCE, _SOF0, _HEIGHT, b"\0\0")


def jpeg_extended_height_0() -> bytes:
    """12-bit JPEG whose SOF1 says 0 lines (a DNL marker's job): pylibjpeg allocates unbounded."""
    return _patched_jpeg(JPEG_EXTENDED_SOURCE, _SOF1, _HEIGHT, b"\0\0")


def jpeg_ls_height_0() -> bytes:
    """JPEG-LS whose SOF55 says 0 lines: CharLS, GDCM refuse; then pylibjpeg allocates unbounded."""
    return _patched_jpeg(JPEG_LS_SOURCE, _SOF55, _HEIGHT, b"\0\0")


def jpeg_ls_columns_larger() -> bytes:
    """JPEG-LS under a header with one column more than the codestream: GDCM aborts."""
    ds = _load(JPEG_LS_SOURCE)
    ds.Columns += 1
    return _save(ds)


def j2k_rgb_as_one_sample() -> bytes:
    """A three-component JPEG 2000 codestream under SamplesPerPixel 1: GDCM aborts."""
    ds = _load(J2K_RGB_SOURCE)
    ds.SamplesPerPixel = 1
    return _save(ds)


def jpeg_lossless_rgb_as_one_sample() -> bytes:
    """A three-component JPEG lossless codestream under SamplesPerPixel 1: GDCM returns a third."""
    ds = _load(JPEG_LOSSLESS_SOURCE)
    ds.SamplesPerPixel = 1
    return _save(ds)


def jpeg_ls_rgb_as_one_sample() -> bytes:
    """A three-component JPEG-LS codestream under SamplesPerPixel 1: GDCM returns a third."""
    ds = _load(JPEG_LS_RGB_SOURCE)
    ds.SamplesPerPixel = 1
    return _save(ds)


def j2k_siz_precision_39() -> bytes:
    """JPEG 2000 whose SIZ says 39-bit samples (38 is the most): GDCM aborts the process."""
    ds = _load(J2K_SOURCE)
    frame = bytearray(_first_frame(ds))
    _j2k_main_header(frame)
    frame[_SSIZ] = 38  # Ssiz is the precision minus one, unsigned
    return _with_frame(ds, frame)


def rle_rows_smaller() -> bytes:
    """RLE under a header with one row fewer than encoded: pylibjpeg-rle panics (BaseException)."""
    # DCMTK and GDCM decode it: they keep the rows the header declares.
    ds = _load(RLE_SOURCE)
    ds.Rows -= 1
    return _save(ds)


def deflate_bomb() -> bytes:
    """A 1.6 MB Deflated Explicit VR file whose dataset inflates to 1.5 GiB (zeros, private OB)."""
    return _deflate_bomb(3 * 2**29)


def deflate_bomb_3g() -> bytes:
    """A 3.1 MB Deflated Explicit VR file whose dataset inflates to 3 GiB (zeros, private OB)."""
    return _deflate_bomb(3 * 2**30)


def frames_minus_one() -> bytes:
    """NumberOfFrames "-1": the header's decoded size comes out negative."""
    ds = _load(J2K_SOURCE)
    ds.NumberOfFrames = "-1"
    return _save(ds)


def frames_huge() -> bytes:
    """NumberOfFrames 10**25 (26 digits, IS allows 12): the header's decoded size is 5e30 bytes."""
    ds = _load(J2K_SOURCE)
    ds.NumberOfFrames = 10**25
    return _save(ds)


def jpeg_lossless_eoi_pad() -> bytes:
    """JPEG lossless whose odd-length codestream is padded with a space, not a zero, after EOI."""
    # DCMTK and GDCM decode it to the unpadded file's pixels, as they do every quirk_ below.
    return _padded_after_end(JPEG_LOSSLESS_SOURCE, b" ")


def quirk_j2k_eoc_pad() -> bytes:
    """JPEG 2000 whose odd-length codestream is padded with a space, not a zero, after EOC."""
    return _padded_after_end(J2K_SOURCE, b" ")


def quirk_jpeg_ls_eoi_pad() -> bytes:
    """JPEG-LS whose codestream is followed by two spaces after EOI."""
    return _padded_after_end(JPEG_LS_SOURCE, b"  ")


def quirk_jpeg_baseline_trailing_bytes() -> bytes:
    """JPEG baseline whose odd-length codestream is followed by three bytes of garbage."""
    return _padded_after_end(JPEG_BASELINE_SOURCE, b"\x12\x34\x56")


def quirk_bot_off_fragments() -> bytes:
    """Two-frame RLE whose Basic Offset Table points 2 bytes past each fragment's item tag."""
    return _offsets_changed(RLE_MULTIFRAME_SOURCE, lambda offset: offset + 2)


def quirk_bot_zeros() -> bytes:
    """30-frame JPEG baseline whose Basic Offset Table holds 30 zeros."""
    return _offsets_changed(JPEG_MULTIFRAME_SOURCE, lambda offset: 0)


# name -> builder; each call makes a new instance.
HOSTILE_FILES: dict[str, Callable[[], bytes]] = {
    builder.__name__: builder
    for builder in (
        j2k_siz_larger,
        htj2k_siz_larger,
        jpeg_baseline_app0_length,
        jpeg_lossless_app14_length,
        jpeg_baseline_dqt_length,
        jpeg_extended_dqt_length,
        jpeg_baseline_sof_precision_17,
        jpeg_extended_sof_precision_17,
        jpeg_lossless_sof_precision_17,
        jpeg_lossless_sof_precision_0,
        jpeg_ls_sof_precision_17,
        jpeg_ls_width_0,
        jpeg_ls_preset_maxval_3,
        jpeg_baseline_height_0,
        jpeg_extended_height_0,
        jpeg_ls_height_0,
        jpeg_ls_columns_larger,
        j2k_rgb_as_one_sample,
        jpeg_lossless_rgb_as_one_sample,
        jpeg_ls_rgb_as_one_sample,
        j2k_siz_precision_39,
        rle_rows_smaller,
        deflate_bomb,
        deflate_bomb_3g,
        frames_minus_one,
        frames_huge,
        jpeg_lossless_eoi_pad,
        quirk_j2k_eoc_pad,
        quirk_jpeg_ls_eoi_pad,
        quirk_jpeg_baseline_trailing_bytes,
        quirk_bot_off_fragments,
        quirk_bot_zeros,
    )
}
