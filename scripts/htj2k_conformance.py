"""Run the HTJ2K conformance codestreams (ITU-T T.803 | ISO/IEC 15444-4) through the bridge.

    PYTHONPATH=. .venv/bin/python scripts/htj2k_conformance.py DIRECTORY

DIRECTORY holds the codestreams ds0_ht_*.j2k, ds0_hm_*.j2k, ds1_ht_*.j2k and, under
references/, the reference images c1p0_NN-C.pgx and c1p1_NN-C.pgx (component C): the layout of
OpenHTJ2K's conformance_data folder. No codestream is shipped with this project: bring your own.

Each codestream goes into a DICOM file (PixelRepresentation from its SIZ marker) and through
bridge.dicom.transcode.transcode; the result is compared with the reference, component by component
(peak absolute error and mean squared error; the standard's tolerances are per codestream).
A codestream the bridge cannot decode must be refused with DecodeError, never decoded wrongly.
Each single-component unsigned codestream that decodes exactly is also relabelled signed
(tests/htj2k_support.with_sign): the only correct result is the reference minus 2**(bits-1).
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import uid

from bridge.dicom.transcode import transcode
from bridge.errors import DecodeError
from tests.htj2k_support import htj2k_dicom, pgx, siz_components, with_sign
from tests.transcode_support import native_array, read


def _dimensions(codestream: bytes) -> tuple[int, int]:
    """(rows, columns) of the image area that SIZ declares."""
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", codestream, 8)
    return ysiz - yosiz, xsiz - xosiz


def _references(directory: Path, name: str) -> list[np.ndarray[Any, Any]]:
    profile = "c1p0" if name.startswith("ds0") else "c1p1"
    number = name.split("_")[2]
    paths = sorted((directory / "references").glob(f"{profile}_{number}-*.pgx"))
    return [pgx(path).astype(np.int64) for path in paths]


def _colour(codestream: bytes) -> str:
    """The Photometric Interpretation of a 3-component codestream: from COD's MCT and wavelet."""
    cod = codestream.index(b"\xff\x52")
    if codestream[cod + 8] == 0:
        return "RGB"
    return "YBR_RCT" if codestream[cod + 13] == 1 else "YBR_ICT"


def _bridge(codestream: bytes, signed: bool) -> np.ndarray[Any, Any]:
    """Decode a codestream through the bridge; int64 (components, rows, columns)."""
    rows, columns = _dimensions(codestream)
    components = siz_components(codestream)
    bits = components[0][0]
    colour: dict[str, Any] = {}
    if len(components) == 3:
        colour = {
            "SamplesPerPixel": 3,
            "PhotometricInterpretation": _colour(codestream),
            "PlanarConfiguration": 0,
        }
    source = htj2k_dicom([codestream], rows, columns, bits, signed, uid.HTJ2KLossless, **colour)
    pixels = native_array(read(transcode(source).data))
    if not signed and bits < 8 * pixels.itemsize:
        pixels = pixels & ((1 << bits) - 1)
    return np.moveaxis(pixels.reshape(rows, columns, -1), -1, 0).astype(np.int64)


def _compare(decoded: np.ndarray[Any, Any], reference: np.ndarray[Any, Any]) -> str:
    if decoded.shape != reference.shape:
        return f"size {decoded.shape} != reference {reference.shape} (reference is reduced)"
    diff = decoded - reference
    return f"peak {int(np.abs(diff).max())}, mse {float((diff * diff).mean()):.4g}"


def check(path: Path) -> list[str]:
    """One codestream: what the bridge made of it, as report lines."""
    codestream = path.read_bytes()
    components = siz_components(codestream)
    signs = "signed" if components[0][1] else "unsigned"
    head = f"{path.name}: {len(components)} x {components[0][0]}-bit {signs}"
    if len(components) not in (1, 3) or len(set(components)) != 1:
        return [f"{head}: skipped (DICOM has no such image: components differ or are not 1 or 3)"]
    references = _references(path.parent, path.name)
    try:
        decoded = _bridge(codestream, components[0][1])
    except DecodeError as exc:
        reason = " ".join(str(exc).split("[SOP Instance UID")[0].split())
        return [f"{head}: refused, DecodeError: {reason[:160]}"]
    lines = [
        f"{head}: decoded, component {index}: {_compare(plane, reference)}"
        for index, (plane, reference) in enumerate(zip(decoded, references, strict=False))
    ]
    bits, signed = components[0]
    exact = all(
        plane.shape == reference.shape and np.array_equal(plane, reference)
        for plane, reference in zip(decoded, references, strict=False)
    )
    if not signed and exact and len(components) == 1:
        flipped = _bridge(with_sign(codestream, signed=True), signed=True)
        expected = references[0] - 2 ** (bits - 1)
        lines.append(f"{head} relabelled signed: {_compare(flipped[0], expected)}")
    return lines


def main(argv: list[str]) -> int:
    """Check every HTJ2K codestream of the directory; exit 1 if any is decoded wrongly."""
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    directory = Path(argv[1])
    paths = sorted(p for p in directory.glob("ds*_h*_*.j2k"))
    if not paths:
        print(f"no ds*_h*_*.j2k codestream in {directory}", file=sys.stderr)
        return 2
    for path in paths:
        for line in check(path):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
