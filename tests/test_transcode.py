"""Transcoder tests on real files: pixels against DCMTK/GDCM, elements one by one, error cases."""

from __future__ import annotations

import os
import pickle
import re
import struct
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.pixels.processing import convert_color_space

from bridge.dicom.dicomfile import read_meta
from bridge.dicom.transcode import transcode
from bridge.errors import BridgeError, DecodeError, TooLarge, UnsupportedSyntax
from bridge.jobs import TranscodeOptions
from bridge.uids import EXPLICIT_VR_LITTLE_ENDIAN
from tests.transcode_support import (
    assert_same_elements,
    bundled,
    dump_without_meta,
    encapsulated_uncompressed,
    native_array,
    read,
    reference_pixels,
    relabel,
    run,
    to_bytes,
    uid_text,
    with_curves_and_overlay,
    with_every_ambiguous_vr,
)

ENCAPSULATED_UNCOMPRESSED = "1.2.840.10008.1.2.1.98"


@dataclass(frozen=True)
class Case:
    """One source instance and how to check its decoded pixels."""

    name: str
    make: Callable[[Path], Path]
    reference: str  # a tool from reference_pixels(), or "file" for a native file's own pixels
    reference_source: Callable[[Path], Path] | None = None  # what the reference decodes
    tolerance: int = 0  # max abs difference allowed against the reference (0: bit-exact)
    lossy_method: str | None = None  # expected method when the source is lossy
    stored_only: bool = False  # compare only the BitsStored low bits


def _file(name: str) -> Callable[[Path], Path]:
    return lambda _tmp: bundled(name)


def _written(name: str, build: Callable[[], bytes]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(build())
        return path

    return make


def _dcmcjpeg_process14(tmp: Path) -> Path:
    # DCMTK's lossless JPEG with selection value 6: Process 14 but not SV1.
    out = tmp / "process14.dcm"
    run("dcmcjpeg", "+el", "+sv", "6", str(bundled("MR_small.dcm")), str(out))
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == uid.JPEGLossless
    return out


CASES = [
    # Native sources: only the encoding changes; DCMTK's dcmconv +te is the reference.
    Case("implicit-MR", _file("MR_small_implicit.dcm"), "dcmconv"),
    Case("implicit-rtdose-32bit-15frames", _file("rtdose.dcm"), "dcmconv"),
    Case("implicit-rgb", _file("SC_rgb_jpeg_dcmd.dcm"), "dcmconv"),
    Case("bigendian-MR-16bit", _file("MR_small_bigendian.dcm"), "dcmconv"),
    Case("bigendian-rgb-8bit", _file("ExplVR_BigEnd.dcm"), "dcmconv"),
    Case("bigendian-rgb-8bit-OW-odd", _file("SC_rgb_small_odd_big_endian.dcm"), "dcmconv"),
    Case("bigendian-1bit", _file("liver_expb_1frame.dcm"), "dcmconv"),
    # DCMTK swaps 32-bit OW by 16-bit words; the same dose in Implicit VR LE is the reference.
    Case("bigendian-32bit", _file("rtdose_expb.dcm"), "file", _file("rtdose.dcm")),
    Case("deflated", _file("image_dfl.dcm"), "dcmconv"),
    # Encapsulated Uncompressed: built from native files; the native pixels are the reference.
    Case(
        "encaps-uncompressed-odd-rgb",
        _written("euc_rgb.dcm", lambda: encapsulated_uncompressed(bundled("SC_rgb_small_odd.dcm"))),
        "file",
        _file("SC_rgb_small_odd.dcm"),
    ),
    Case(
        "encaps-uncompressed-15frames",
        _written("euc_dose.dcm", lambda: encapsulated_uncompressed(bundled("rtdose.dcm"))),
        "file",
        _file("rtdose.dcm"),
    ),
    # JPEG lossy: DCMTK's IJG and libjpeg/GDCM round differently (IDCT, upsampling).
    Case("jpeg-baseline-ybr", _file("SC_rgb_jpeg_dcmtk.dcm"), "dcmdjpeg", None, 8, "ISO_10918_1"),
    Case(
        "jpeg-baseline-422", _file("SC_rgb_dcmtk_+eb+cy+np.dcm"), "dcmdjpeg", None, 8, "ISO_10918_1"
    ),
    Case(
        "jpeg-baseline-30frames",
        _file("examples_ybr_color.dcm"),
        "dcmdjpeg",
        None,
        8,
        "ISO_10918_1",
    ),
    Case(
        "jpeg-baseline-rgb",
        _file("SC_jpeg_no_color_transform.dcm"),
        "dcmdjpeg",
        None,
        8,
        "ISO_10918_1",
    ),
    Case(
        "jpeg-baseline-odd", _file("SC_rgb_small_odd_jpeg.dcm"), "dcmdjpeg", None, 8, "ISO_10918_1"
    ),
    Case("jpeg-extended-12bit", _file("JPEG-lossy.dcm"), "dcmdjpeg", None, 2, "ISO_10918_1"),
    Case("jpeg-extended-12bit-b", _file("JPGExtended.dcm"), "dcmdjpeg", None, 2, "ISO_10918_1"),
    Case("jpeg-lossless-p14", _dcmcjpeg_process14, "dcmdjpeg"),
    Case("jpeg-lossless-sv1", _file("SC_rgb_jpeg_gdcm.dcm"), "dcmdjpeg"),
    # JPEG-LS reconstruction is fully specified even when NEAR > 0: exact match expected.
    Case("jpegls-lossless", _file("MR_small_jpeg_ls_lossless.dcm"), "dcmdjpls"),
    Case("jpegls-near-8", _file("JPEGLSNearLossless_08.dcm"), "dcmdjpls", None, 0, "ISO_14495_1"),
    Case("jpegls-near-16", _file("JPEGLSNearLossless_16.dcm"), "dcmdjpls", None, 0, "ISO_14495_1"),
    Case(
        "jpegls-near-rgb-line",
        _file("SC_rgb_jls_lossy_line.dcm"),
        "dcmdjpls",
        None,
        0,
        "ISO_14495_1",
    ),
    Case(
        "jpegls-near-rgb-sample",
        _file("SC_rgb_jls_lossy_sample.dcm"),
        "dcmdjpls",
        None,
        0,
        "ISO_14495_1",
    ),
    # JPEG 2000: DCMTK has none, GDCM (gdcmconv --raw) is the reference.
    Case("j2k-lossless", _file("MR_small_jp2klossless.dcm"), "gdcmconv"),
    Case("j2k-lossless-rct", _file("GDCMJ2K_TextGBR.dcm"), "gdcmconv"),
    Case("j2k-lossless-rct-2", _file("examples_jpeg2k.dcm"), "gdcmconv"),
    # Unsigned codestream in a signed dataset: pydicom sign-extends above BitsStored, GDCM
    # leaves zeros there; the values agree within BitsStored.
    Case("j2k-pixelrep-mismatch", _file("J2K_pixelrep_mismatch.dcm"), "gdcmconv", stored_only=True),
    Case("j2k-lossy", _file("JPEG2000.dcm"), "gdcmconv", None, 1, "ISO_15444_1"),
    # These two say "01" but their codestreams use the reversible 5-3 wavelet (rate-truncated).
    Case("j2k-5-3-marked-lossy", _file("693_J2KI.dcm"), "gdcmconv"),
    Case("j2k-5-3-marked-lossy-rgb", _file("SC_rgb_gdcm_KY.dcm"), "gdcmconv"),
    # A Part-1 codestream under the HTJ2K labels exercises the syntax path (openjpeg reads both)
    # against GDCM; real HTJ2K streams, signed, are in test_htj2k.py.
    Case(
        "htj2k-lossless",
        _written(
            "htj2k.dcm",
            lambda: relabel(bundled("MR_small_jp2klossless.dcm"), uid.HTJ2KLossless),
        ),
        "gdcmconv",
        _file("MR_small_jp2klossless.dcm"),
    ),
    Case(
        "htj2k-rpcl",
        _written(
            "htj2k_rpcl.dcm",
            lambda: relabel(bundled("MR_small_jp2klossless.dcm"), uid.HTJ2KLosslessRPCL),
        ),
        "gdcmconv",
        _file("MR_small_jp2klossless.dcm"),
    ),
    Case(
        "htj2k-lossy",
        _written("htj2k_lossy.dcm", lambda: relabel(bundled("JPEG2000.dcm"), uid.HTJ2K)),
        "gdcmconv",
        _file("JPEG2000.dcm"),
        1,
        "ISO_15444_15",
    ),
    Case("rle-16bit", _file("MR_small_RLE.dcm"), "dcmdrle"),
    Case("rle-rgb", _file("SC_rgb_rle.dcm"), "dcmdrle"),
    Case("rle-rgb-16bit", _file("SC_rgb_rle_16bit.dcm"), "dcmdrle"),
    Case("rle-rgb-16bit-2frames", _file("SC_rgb_rle_16bit_2frame.dcm"), "dcmdrle"),
    Case("rle-rgb-32bit-2frames", _file("SC_rgb_rle_32bit_2frame.dcm"), "dcmdrle"),
    Case("rle-32bit-15frames", _file("rtdose_rle.dcm"), "dcmdrle"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for the built sources and every output of this module."""
    return tmp_path_factory.mktemp("transcode")


def _pixels(ds: pydicom.Dataset) -> np.ndarray:
    arr = native_array(ds)
    if ds.get("PhotometricInterpretation") in ("YBR_FULL", "YBR_FULL_422"):
        arr = convert_color_space(arr, "YBR_FULL", "RGB")
    return arr


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_converts_like_reference(case: Case, workdir: Path) -> None:
    """Pixels match DCMTK/GDCM, elements are unchanged, the file is valid native EVRLE."""
    tmp = workdir / case.name
    tmp.mkdir()
    source_path = case.make(tmp)
    source_bytes = source_path.read_bytes()
    result = transcode(source_bytes)
    source = pydicom.dcmread(source_path)
    output = read(result.data)

    assert not result.forwarded
    assert result.source_syntax == source.file_meta.TransferSyntaxUID
    # As read here: an element its sender wrote as UN stays raw bytes (bridge.dicom.dicomfile).
    sop_instance, sop_class = (uid_text(source, k) for k in ("SOPInstanceUID", "SOPClassUID"))
    assert result.sop_instance_uid == sop_instance
    assert output.file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN
    assert output.file_meta.MediaStorageSOPInstanceUID == sop_instance
    assert output.file_meta.MediaStorageSOPClassUID == sop_class
    assert_same_elements(
        source, output, big_endian=source.file_meta.TransferSyntaxUID == uid.ExplicitVRBigEndian
    )
    for tag in ("BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "Rows"):
        assert output[tag].value == source[tag].value
    expected_vr = "OB" if source.BitsAllocated <= 8 else "OW"
    assert output["PixelData"].VR in {expected_vr}
    assert len(output.PixelData) % 2 == 0
    assert "ExtendedOffsetTable" not in output
    if output.SamplesPerPixel == 3 and source.file_meta.TransferSyntaxUID.is_compressed:
        assert output.PlanarConfiguration == 0
    assert output.PhotometricInterpretation != "YBR_FULL_422" or not (
        source.file_meta.TransferSyntaxUID.is_compressed
    )

    # Lossy history: "01" plus a method, existing values kept.
    if case.lossy_method or source.get("LossyImageCompression") == "01":
        assert output.LossyImageCompression == "01"
        # A source already marked "01" whose codestream is reversible gets no invented method.
        expected = source.get("LossyImageCompressionMethod", case.lossy_method)
        assert output.get("LossyImageCompressionMethod") == expected
        if "LossyImageCompressionRatio" in source:
            assert output.LossyImageCompressionRatio == source.LossyImageCompressionRatio
    else:
        assert output.get("LossyImageCompression") == source.get("LossyImageCompression")

    out_path = tmp / "output.dcm"
    out_path.write_bytes(result.data)
    run("dcmdump", "-q", "+E", str(out_path))  # +E: parse errors are fatal

    reference_path = case.reference_source(tmp) if case.reference_source else source_path
    reference: Dataset
    if case.reference == "file":
        reference = pydicom.dcmread(reference_path)
    else:
        reference = reference_pixels(case.reference, reference_path, tmp)
    ours, theirs = _pixels(output), _pixels(reference)
    assert ours.shape == theirs.shape
    if case.stored_only:
        mask = (1 << int(source.BitsStored)) - 1
        ours, theirs = ours.astype(np.int64) & mask, theirs.astype(np.int64) & mask
    if case.tolerance == 0:
        assert output.PixelData[: len(reference.PixelData)] == reference.PixelData or (
            np.array_equal(ours, theirs)
        )
        assert np.array_equal(ours, theirs)
    else:
        diff = np.abs(ours.astype(np.int64) - theirs.astype(np.int64))
        assert diff.max() <= case.tolerance, f"max abs difference {diff.max()}"


def test_outputs_read_without_any_codec(tmp_path: Path) -> None:
    """Every converted file decodes with pydicom alone (all codec packages blocked)."""
    paths = []
    for case in CASES:
        folder = tmp_path / case.name
        folder.mkdir()
        output = folder / "output.dcm"
        output.write_bytes(transcode(case.make(folder).read_bytes()).data)
        paths.append(str(output))
    script = (
        "import sys\n"
        "for m in ('pylibjpeg', 'openjpeg', 'libjpeg', 'rle', 'jpeg_ls', 'gdcm', 'PIL'):\n"
        "    sys.modules[m] = None\n"
        "import pydicom\n"
        "for p in sys.argv[1:]:\n"
        "    ds = pydicom.dcmread(p)\n"
        "    assert ds.file_meta.TransferSyntaxUID == '1.2.840.10008.1.2.1', p\n"
        "    ds.pixel_array\n"
        "print('ok', len(sys.argv) - 1)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ok {len(paths)}"


def test_explicit_little_endian_is_forwarded_unchanged() -> None:
    """Input already in Explicit VR Little Endian comes back as the very same bytes."""
    data = bundled("CT_small.dcm").read_bytes()
    result = transcode(data)
    assert result.forwarded
    assert result.data is data
    assert result.sop_instance_uid == read(data).SOPInstanceUID


def test_an_unchanged_dataset_is_copied_byte_for_byte() -> None:
    """Lossless grayscale: every element before Pixel Data keeps its source bytes."""
    source = bundled("MR_small_jp2klossless.dcm").read_bytes()
    out = bytes(transcode(source, TranscodeOptions()).data)

    def before_pixels(data: bytes) -> bytes:
        _, start = read_meta(memoryview(data))
        return data[start : data.index(struct.pack("<HH", 0x7FE0, 0x0010), start)]

    assert before_pixels(out) == before_pixels(source)
    assert read(out).file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN


def test_bits_above_bits_stored_are_kept() -> None:
    """Overlay bits stored above BitsStored survive (pydicom's default would zero them)."""
    ds = pydicom.dcmread(bundled("MR_small_RLE.dcm"))
    arr = native_array(pydicom.dcmread(bundled("MR_small.dcm"))).astype(np.uint16)
    arr = arr | np.uint16(0xC000)  # bits 14-15 set, as an overlay would be
    ds.PixelRepresentation = 0
    ds.compress(uid.RLELossless, arr, generate_instance_uid=False)
    ds.BitsStored, ds.HighBit = 12, 11
    result = transcode(to_bytes(ds))
    out = np.frombuffer(read(result.data).PixelData, dtype="<u2").reshape(arr.shape)
    assert np.array_equal(out, arr)


def test_extended_offset_table_is_used_then_removed() -> None:
    """Frames are located through the Extended Offset Table, which the output drops."""
    ds = pydicom.dcmread(bundled("SC_rgb_rle_2frame.dcm"))
    reference = native_array(pydicom.dcmread(bundled("SC_rgb_rle_2frame.dcm")))
    frames = [f for f in pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=2)]
    ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(
        frames
    )
    ds["PixelData"].VR = "OB"
    output = read(transcode(to_bytes(ds)).data)
    assert "ExtendedOffsetTable" not in output
    assert "ExtendedOffsetTableLengths" not in output
    assert np.array_equal(native_array(output), reference)


def test_compressed_icon_is_decompressed() -> None:
    """An RLE icon in IconImageSequence becomes native too (DCMTK rejects it otherwise)."""
    ds = pydicom.dcmread(bundled("MR_small_RLE.dcm"))
    icon = Dataset()
    for keyword in (
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
    ):
        setattr(icon, keyword, ds[keyword].value)
    icon.PixelData = ds.PixelData
    icon["PixelData"].VR = "OB"
    icon["PixelData"].is_undefined_length = True
    ds.IconImageSequence = [icon]
    result = transcode(to_bytes(ds))
    output = read(result.data)
    out_icon = output.IconImageSequence[0]
    assert not out_icon["PixelData"].is_undefined_length
    assert out_icon["PixelData"].VR == "OW"
    assert out_icon.PixelData == output.PixelData
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"icon-{os.getpid()}.dcm"
    try:
        path.write_bytes(result.data)
        run("dcmdump", "-q", "+E", str(path))
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("name", "label", "lossy"),
    [
        # 4.91 and near-lossless labels do not make a reversible codestream lossy.
        ("MR_small_jp2klossless.dcm", uid.JPEG2000, False),
        ("MR_small_jpeg_ls_lossless.dcm", uid.JPEGLSNearLossless, False),
        ("JPEG2000.dcm", uid.JPEG2000, True),
    ],
)
def test_lossy_history_is_read_from_the_codestream(name: str, label: str, lossy: bool) -> None:
    """LossyImageCompression follows the codestream (COD wavelet, JPEG-LS NEAR), not the label."""
    ds = pydicom.dcmread(bundled(name))
    for keyword in ("LossyImageCompression", "LossyImageCompressionMethod"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.file_meta.TransferSyntaxUID = uid.UID(label)
    output = read(transcode(to_bytes(ds)).data)
    assert (output.get("LossyImageCompression") == "01") is lossy


def test_lossy_flag_is_never_reset() -> None:
    """A lossless source already marked "01" stays "01" with its method and ratio."""
    ds = pydicom.dcmread(bundled("MR_small_RLE.dcm"))
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = 10
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    output = read(transcode(to_bytes(ds)).data)
    assert output.LossyImageCompression == "01"
    assert output.LossyImageCompressionRatio == 10
    assert output.LossyImageCompressionMethod == "ISO_10918_1"


def _truncated_codestream(name: str) -> bytes:
    ds = pydicom.dcmread(bundled(name))
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    return to_bytes(ds)


@pytest.mark.parametrize(
    "name",
    ["MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm"],
)
def test_truncated_codestream_is_a_decode_error(name: str) -> None:
    """A codestream cut short raises DecodeError naming the instance and the syntax."""
    data = _truncated_codestream(name)
    sop = read(data).SOPInstanceUID
    with pytest.raises(DecodeError) as info:
        transcode(data)
    assert sop in str(info.value)


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("MR_small_jp2klossless.dcm", uid.JPEGLSLossless),  # J2K codestream labelled JPEG-LS
        ("MR_small_RLE.dcm", uid.JPEGBaseline8Bit),  # RLE segments labelled JPEG
        ("MR_small_RLE.dcm", uid.ExplicitVRLittleEndian),  # encapsulated labelled native
        ("MR_small.dcm", uid.JPEG2000Lossless),  # native labelled encapsulated
        ("MR_small.dcm", uid.ExplicitVRBigEndian),  # little endian labelled big endian
    ],
)
def test_wrong_transfer_syntax_is_a_decode_error(name: str, label: str) -> None:
    """A header that lies about the encoding gives DecodeError, with the syntax in the message."""
    with pytest.raises(DecodeError) as info:
        transcode(relabel(bundled(name), label))
    assert label in str(info.value)


def _gigantic() -> bytes:
    ds = pydicom.dcmread(bundled("MR_small_RLE.dcm"))
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 100000
    return to_bytes(ds)


def test_gigantic_dimensions_are_refused_before_allocating() -> None:
    """Declared size over the limit raises TooLarge with no large allocation on the way."""
    data = _gigantic()
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge, match="exceeds the limit"):
            transcode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 1024**2
    small = pydicom.dcmread(bundled("MR_small_RLE.dcm"))
    with pytest.raises(TooLarge):
        transcode(to_bytes(small), TranscodeOptions(max_decoded_bytes=64 * 64 * 2 - 1))


def test_absurd_header_values_are_a_decode_error() -> None:
    """BitsAllocated and NumberOfFrames that no image can have are refused."""
    ds = pydicom.dcmread(bundled("MR_small_RLE.dcm"))
    ds.BitsAllocated = 12
    with pytest.raises(DecodeError, match="BitsAllocated"):
        transcode(to_bytes(ds))
    ds = pydicom.dcmread(bundled("MR_small_RLE.dcm"))
    ds.NumberOfFrames = -3
    with pytest.raises(DecodeError, match="NumberOfFrames"):
        transcode(to_bytes(ds))


def test_video_is_unsupported_unless_forwarded() -> None:
    """MPEG/HEVC cannot become native pixels; listed in forward_unchanged, they pass as-is."""
    data = relabel(bundled("SC_rgb_jpeg_gdcm.dcm"), uid.MPEG2MPML)
    with pytest.raises(UnsupportedSyntax, match=r"MPEG2.*1\.2\.840\.10008\.1\.2\.4\.100"):
        transcode(data)
    result = transcode(data, TranscodeOptions(forward_unchanged=frozenset({uid.MPEG2MPML})))
    assert result.forwarded
    assert result.data is data
    assert result.source_syntax == uid.MPEG2MPML
    with pytest.raises(UnsupportedSyntax):
        transcode(relabel(bundled("SC_rgb_jpeg_gdcm.dcm"), "1.2.3.4.5"))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        os.urandom(4096),
        b"\0" * 128 + b"DICM" + os.urandom(2048),
        bundled("rtstruct.dcm").read_bytes(),  # no file meta at all
        bundled("meta_missing_tsyntax.dcm").read_bytes(),
        bundled("JPEG2000-embedded-sequence-delimiter.dcm").read_bytes(),  # broken codestream
        bundled("MR_truncated.dcm").read_bytes(),
    ],
    ids=["empty", "random", "random-after-DICM", "no-meta", "no-syntax", "bad-j2k", "truncated"],
)
def test_garbage_is_a_decode_error(data: bytes) -> None:
    """Anything unparseable gives DecodeError, never a bare library exception."""
    with pytest.raises(DecodeError):
        transcode(data)


def test_results_and_errors_survive_pickling() -> None:
    """Workers return results and raise errors across process boundaries."""
    result = transcode(bundled("MR_small_RLE.dcm").read_bytes())
    assert pickle.loads(pickle.dumps(result)) == result
    try:
        transcode(b"garbage")
    except DecodeError as exc:
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is DecodeError
        assert str(again) == str(exc)


_BLOCKED = """
import importlib.metadata as md
import sys
blocked = sys.argv[2].split(",")
for name in blocked:
    sys.modules[name] = None
original = md.entry_points

def entry_points(**kwargs):
    # As if the package were not installed: pylibjpeg finds its plugins through entry points.
    found = original(**kwargs)
    if not kwargs:
        return found
    return md.EntryPoints(e for e in found if e.value.split(".")[0].split(":")[0] not in blocked)

md.entry_points = entry_points
if sys.argv[3:] == ["preload"]:
    import bridge.decoding.preload  # as in the workers: GDCM deferred until a chain needs it
    assert sys.modules.get("gdcm") is None
import hashlib
from bridge.errors import UnsupportedSyntax
from bridge.dicom.transcode import transcode
try:
    result = transcode(open(sys.argv[1], "rb").read())
except UnsupportedSyntax as exc:
    print("unsupported", exc)
else:
    print("decoded", len(result.data), hashlib.sha256(result.data).hexdigest())
"""


@pytest.mark.parametrize(
    ("name", "blocked", "expected"),
    [
        # Without the GPL libjpeg, GDCM (called directly for 12-bit) takes over.
        ("JPGExtended.dcm", "libjpeg", "decoded"),
        ("SC_rgb_jpeg_dcmtk.dcm", "libjpeg", "decoded"),
        ("SC_rgb_jpeg_gdcm.dcm", "libjpeg", "decoded"),
        ("JPGExtended.dcm", "libjpeg,gdcm", "unsupported"),
    ],
)
def test_works_without_gpl_libjpeg(name: str, blocked: str, expected: str) -> None:
    """The transcoder needs no GPL code; a missing decoder is named in the error."""
    done = _transcode_blocked(name, blocked)
    assert done.startswith(expected), done
    if expected == "unsupported":
        assert "pylibjpeg-libjpeg" in done
        assert "JPEG Extended" in done
    # The same in a worker, where GDCM is loaded only when a chain first reaches it.
    assert _transcode_blocked(name, blocked, "preload") == done


def _transcode_blocked(name: str, blocked: str, *flags: str) -> str:
    """What transcoding a bundled file prints with the `blocked` modules made unimportable."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", _BLOCKED, str(bundled(name)), blocked, *flags],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_meta_is_consistent_with_dataset() -> None:
    """File meta names the dataset's SOP Class/Instance and the new syntax."""
    ds = pydicom.dcmread(bundled("MR_small_RLE.dcm"))
    ds.file_meta = FileMetaDataset(ds.file_meta)
    output = read(transcode(to_bytes(ds)).data)
    assert output.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert output.file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN
    assert output.file_meta.ImplementationClassUID == pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    assert BytesIO(transcode(to_bytes(ds)).data).read(132)[128:] == b"DICM"


@pytest.mark.parametrize(
    "build", [with_curves_and_overlay, with_every_ambiguous_vr], ids=["curves", "every"]
)
def test_ambiguous_vrs_are_written_as_dcmtk_writes_them(
    build: Callable[[], bytes], tmp_path: Path
) -> None:
    """Implicit VR leaves "OB or OW", "US or SS"... open: each is decided as dcmconv +te does."""
    source = tmp_path / "source.dcm"
    source.write_bytes(build())
    ours = tmp_path / "ours.dcm"
    ours.write_bytes(transcode(source.read_bytes()).data)
    theirs = tmp_path / "dcmconv.dcm"
    run("dcmconv", "+te", str(source), str(theirs))
    # dcmdump prints each element's VR and its values read by that VR: all must be the same.
    assert dump_without_meta(ours) == dump_without_meta(theirs)


def _big_endian_with_un_patient_id() -> bytes:
    """A big-endian file whose PatientID its sender wrote with VR UN."""
    ds = pydicom.dcmread(bundled("MR_small_bigendian.dcm"))
    ds.PatientID = "UN-ID"
    fp = BytesIO()
    ds.save_as(fp, implicit_vr=False, little_endian=False, enforce_file_format=True)
    lo = struct.pack(">HH", 0x0010, 0x0020) + b"LO" + struct.pack(">H", 6)
    assert fp.getvalue().count(lo) == 1
    return fp.getvalue().replace(lo, lo[:4] + b"UN\0\0" + struct.pack(">I", 6))


def test_un_elements_stay_un_when_threads_convert_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom's replace_un_with_known_vr is one global: a thread that ends must not change
    it under one still converting (as a save, set and restore around each call did)."""
    data = _big_endian_with_un_patient_id()
    un_patient_id = struct.pack("<HH", 0x0010, 0x0020) + b"UN"
    first_paused, second_paused, first_done = (threading.Event() for _ in range(3))

    def pause(raw: Any, **_: Any) -> Any:
        # Called as pydicom reads each element: holds each thread at its first one, so that
        # the first ends while the second has begun and not yet read its PatientID.
        if threading.current_thread().name == "first" and not first_paused.is_set():
            first_paused.set()
            second_paused.wait(10)
        elif threading.current_thread().name == "second" and not second_paused.is_set():
            second_paused.set()
            first_done.wait(10)
        return raw

    kept: dict[str, bool] = {}

    def convert() -> None:
        name = threading.current_thread().name
        kept[name] = un_patient_id in bytes(transcode(data).data)
        if name == "first":
            first_done.set()

    monkeypatch.setattr(pydicom.config, "data_element_callback", pause)
    first = threading.Thread(target=convert, name="first")
    first.start()
    assert first_paused.wait(10)
    second = threading.Thread(target=convert, name="second")
    second.start()
    first.join(30)
    second.join(30)
    assert kept == {"first": True, "second": True}


def test_pydicoms_un_setting_is_set_once_where_the_bridge_reads_with_pydicom() -> None:
    """Set in bridge.dicom.dicomfile only; set in every process after the bridge's first read."""
    root = Path(__file__).resolve().parent.parent / "bridge"
    setters = sorted(
        path.name
        for path in root.rglob("*.py")
        for line in path.read_text().splitlines()
        if re.search(r"replace_un_with_known_vr\s*=[^=]|replace_un_with_known_vr,", line)
    )
    assert setters == ["dicomfile.py"]
    explicit = str(bundled("CT_small.dcm"))
    script = (
        "import sys, pydicom\n"
        "import bridge.decoding.preload\n"  # what the decoding processes' parent imports
        "assert pydicom.config.replace_un_with_known_vr is False\n"
        "pydicom.config.replace_un_with_known_vr = True\n"
        "import bridge.dicom.implicit\n"
        "del sys.modules['bridge.dicom.dicomfile']\n"  # as in a process that has not imported it
        "bridge.dicom.implicit.to_implicit(open(sys.argv[1], 'rb').read())\n"
        "assert pydicom.config.replace_un_with_known_vr is False\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, explicit], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


# --- issue 19: reasons a person can read, whatever the file holds ------------------------------


def _with_length(name: str, tag: tuple[int, int], vr: bytes, length: int) -> bytes:
    """A pydicom test file with one element's length changed, as the fuzzer changes it."""
    data = bytearray(bundled(name).read_bytes())
    big = "big_endian" in name
    at = data.index(struct.pack(">HH" if big else "<HH", *tag) + vr, 132)
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        struct.pack_into(">I" if big else "<I", data, at + 8, length)
    else:
        struct.pack_into(">H" if big else "<H", data, at + 6, length)
    return bytes(data)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ufffd]")


@pytest.mark.parametrize(
    ("name", "tag", "vr", "length", "expected"),
    [
        # A UID whose length swallows the elements after it: it was quoted whole, NULs and all.
        ("rtdose_rle.dcm", (0x0008, 0x0018), b"UN", 0xFFFFFFFE, "not a UID"),
        # A value read with replacement characters cannot be written back: pydicom's own
        # re-raise failed and left "TypeError: function takes exactly 5 arguments (1 given)".
        ("SC_rgb_small_odd_big_endian.dcm", (0x0028, 0x0030), b"DS", 65535, "UnicodeEncodeError"),
    ],
)
def test_a_reason_is_one_short_readable_line_whatever_the_file_holds(
    name: str, tag: tuple[int, int], vr: bytes, length: int, expected: str
) -> None:
    with pytest.raises(BridgeError) as refused:
        transcode(_with_length(name, tag, vr, length))
    reason = str(refused.value)
    assert expected in reason, reason
    assert "takes exactly 5 arguments" not in reason
    assert not _CONTROL.search(reason), reason
    assert len(reason) < 800, f"{len(reason)} characters"
