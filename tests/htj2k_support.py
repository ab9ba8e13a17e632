"""HTJ2K test data made at test time: two independent encoders, DICOM around their codestreams.

Nothing here is shipped: Grok's tools come from Debian (grokj2k-tools) and OpenJPH from the
imagecodecs wheel, both installed by scripts/setup.sh. Grok and OpenJPH are separate code bases
from the bridge's decoder (OpenJPEG inside pylibjpeg-openjpeg) for everything that touches the
sign of a sample: reading the input, the DC level shift, and clipping.
"""

from __future__ import annotations

import re
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from tests.transcode_support import to_bytes

_SOC_SIZ = b"\xff\x4f\xff\x51"
_SIZ_CSIZ = 2 + 2 + 2 + 2 + 8 * 4  # SOC, SIZ marker, Lsiz, Rsiz, then eight 32-bit fields
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def sample_dtype(bits: int, signed: bool) -> np.dtype[Any]:
    """The little-endian numpy type that holds `bits`-bit samples (what DICOM allocates)."""
    return np.dtype(f"<{'i' if signed else 'u'}{1 if bits <= 8 else 2}")


def signed_values(bits: int, rows: int, columns: int, seed: int) -> np.ndarray[Any, Any]:
    """Signed `bits`-bit samples: both extremes, values near zero, a CT-like ramp and noise."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rng = np.random.default_rng(seed)
    out = rng.integers(low, high + 1, (rows, columns), dtype=np.int64)
    # The values of issue 19 (clipped to the depth), the extremes, and a smooth signed ramp.
    edge = [-2000, -1, 0, 1, 2000, 30000, -30000, 7, low, high, low + 1, high - 1]
    out[0, : len(edge)] = np.clip(edge, low, high)
    ramp = np.linspace(low, high, columns).round().astype(np.int64)
    out[1, :] = ramp
    out[2, :] = ramp[::-1]
    return out.astype(sample_dtype(bits, signed=True))


def smooth_signed(bits: int, rows: int, columns: int, phase: float) -> np.ndarray[Any, Any]:
    """A smooth signed image (lossy coding keeps it close), spanning most of the depth."""
    y, x = np.mgrid[0:rows, 0:columns]
    span = 2 ** (bits - 1) * 0.8
    wave = np.sin(x / 7.0 + phase) * 0.6 + np.cos(y / 5.0) * 0.4
    out: np.ndarray[Any, Any] = (wave * span).round().astype(sample_dtype(bits, signed=True))
    return out


def run_tool(*args: str) -> None:
    """Run an outside encoder or decoder and fail loudly with its output."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({done.returncode}): {done.stdout}{done.stderr}")


def grok_encode(
    pixels: np.ndarray[Any, Any],
    bits: int,
    tmp: Path,
    *,
    progression: str = "LRCP",
    irreversible: bool = False,
) -> bytes:
    """Encode one monochrome frame as HTJ2K with Grok's grk_compress (Debian grokj2k-tools).

    Raw input is little endian (.rawl): Grok 10's big-endian .raw reader corrupts some 16-bit
    samples, signed or not, before any coding happens.
    """
    signed = pixels.dtype.kind == "i"
    source = tmp / "grok-in.rawl"
    target = tmp / "grok-out.j2k"
    pixels.astype(sample_dtype(bits, signed)).tofile(source)
    rows, columns = pixels.shape
    fmt = f"{columns},{rows},1,{bits},{'s' if signed else 'u'}"
    args = ["grk_compress", "-i", str(source), "-o", str(target), "-F", fmt, "-M", "64"]
    args += ["-p", progression]
    if irreversible:
        args.append("-I")
    run_tool(*args)
    return target.read_bytes()


def grok_decode(codestream: bytes, bits: int, signed: bool, tmp: Path) -> np.ndarray[Any, Any]:
    """Decode a codestream with Grok's grk_decompress, samples as DICOM would hold them."""
    source = tmp / "grok-dec.j2k"
    target = tmp / "grok-dec.rawl"
    source.write_bytes(codestream)
    run_tool("grk_decompress", "-i", str(source), "-o", str(target))
    return np.fromfile(target, dtype=sample_dtype(bits, signed))


def openjph_encode(
    pixels: np.ndarray[Any, Any], *, progression: str = "LRCP", irreversible: bool = False
) -> bytes:
    """Encode one monochrome frame (8 or 16 bits) as HTJ2K with OpenJPH, through imagecodecs."""
    import imagecodecs

    data = bytes(imagecodecs.htj2k_encode(pixels, reversible=not irreversible))
    if progression_of(data) != progression:
        # imagecodecs has no progression setting (OpenJPH writes RPCL). With one layer, one
        # component and one precinct per resolution every order lists the packets alike.
        data = set_progression(data, progression)
    return data


def openjph_decode(codestream: bytes) -> np.ndarray[Any, Any]:
    """Decode a codestream with OpenJPH (imagecodecs.htj2k_decode)."""
    import imagecodecs

    return np.asarray(imagecodecs.htj2k_decode(codestream))


_PROGRESSIONS = {"LRCP": 0, "RLCP": 1, "RPCL": 2, "PCRL": 3, "CPRL": 4}


def _marker(codestream: bytes | bytearray, code: int) -> int:
    """Offset of a main-header marker segment (FFxx), walking the segments from SIZ."""
    pos = 2
    while pos + 4 <= len(codestream):
        marker, length = struct.unpack_from(">HH", codestream, pos)
        if marker == code:
            return pos
        if marker in (0xFF90, 0xFF93, 0xFFD9):  # SOT, SOD, EOC: the main header is over
            break
        pos += 2 + length
    raise AssertionError(f"marker {code:04X} not found in the main header")


def progression_of(codestream: bytes | bytearray) -> str:
    """The progression order that the COD marker declares."""
    order = codestream[_marker(codestream, 0xFF52) + 5]
    return {v: k for k, v in _PROGRESSIONS.items()}[order]


def set_progression(codestream: bytes | bytearray, progression: str) -> bytes:
    """A copy with COD's progression order changed (valid for one tile and one layer, or
    when the order of one resolution's single packet per component is all that differs)."""
    out = bytearray(codestream)
    cod = _marker(out, 0xFF52)
    layers = struct.unpack_from(">H", out, cod + 6)[0]
    components = struct.unpack_from(">H", out, _SIZ_CSIZ)[0]
    if layers != 1 or components != 1:
        raise AssertionError("only a one-layer, one-component stream's order can be relabelled")
    out[cod + 5] = _PROGRESSIONS[progression]
    return bytes(out)


def siz_components(codestream: bytes | bytearray) -> list[tuple[int, bool]]:
    """(bits, signed) of each component, from the SIZ marker."""
    if not bytes(codestream[:4]) == _SOC_SIZ:
        raise AssertionError("not a J2K codestream")
    (count,) = struct.unpack_from(">H", codestream, _SIZ_CSIZ)
    out = []
    for index in range(count):
        ssiz = codestream[_SIZ_CSIZ + 2 + 3 * index]
        out.append(((ssiz & 0x7F) + 1, bool(ssiz & 0x80)))
    return out


def with_sign(codestream: bytes | bytearray, signed: bool, bits: int | None = None) -> bytes:
    """A copy whose SIZ declares every component signed or unsigned (and of `bits` bits).

    Sign and depth only decide the decoder's DC level shift and clipping: the coded wavelet
    data, the quantization and the HT magnitude bounds are the same. An unsigned B-bit
    lossless stream of x so relabelled signed is a conforming signed stream of x - 2**(B-1).
    """
    out = bytearray(codestream)
    for index, (depth, _) in enumerate(siz_components(out)):
        out[_SIZ_CSIZ + 2 + 3 * index] = ((bits or depth) - 1) | (0x80 if signed else 0)
    return bytes(out)


def htj2k_dicom(
    frames: Sequence[bytes],
    rows: int,
    columns: int,
    bits_stored: int,
    signed: bool,
    transfer_syntax: str,
    **elements: Any,
) -> bytes:
    """A monochrome CT Part-10 file around HTJ2K `frames`; new UIDs each call."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.PatientID = "HTJ2K"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = encapsulate(list(frames))
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


def pgx(path: Path) -> np.ndarray[Any, Any]:
    """Read a PGX image (the JPEG 2000 conformance reference format), one component."""
    data = path.read_bytes()
    end = data.index(b"\n")
    match = re.match(rb"PG\s*(ML|LM)\s*([+-]?)\s*(\d+)\s+(\d+)\s+(\d+)", data[:end])
    if match is None:
        raise ValueError(f"{path}: not a PGX header")
    order, sign, depth, width, height = match.groups()
    size = 1 if int(depth) <= 8 else 2 if int(depth) <= 16 else 4
    dtype = np.dtype(f"{'>' if order == b'ML' else '<'}{'i' if sign == b'-' else 'u'}{size}")
    count = int(width) * int(height)
    return np.frombuffer(data, dtype=dtype, count=count, offset=end + 1).reshape(
        int(height), int(width)
    )
