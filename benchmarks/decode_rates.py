"""How fast each decoder of each syntax's chain decodes, per MiB: the calibration of
bridge.decoding.limits.time_allowance.

Run as `python benchmarks/decode_rates.py [--sizes 512,2048] [--pydicom] [--json out.json]`.

Every decoder in bridge.dicom.codecs.DECODER_CHAINS is timed on one frame (the best of three
calls, in a subprocess of its own per file, so that a decoder that aborts costs only its row):

- generated images, in each syntax an encoder here can write: 16-bit noise over the full range
  (incompressible, the slowest per decoded byte) and a CT-like slice (smooth anatomy plus noise,
  12 bits used), 8-bit RGB noise for the 8-bit syntaxes; JPEG 2000, JPEG-LS and RLE encoded by
  pydicom's encoders, JPEG lossless, extended and baseline by DCMTK's dcmcjpeg;
- with --pydicom, every compressed file pydicom ships (small: their time is mostly fixed cost).

Printed: syntax, decoder, image, decoded MiB, compressed MiB, seconds, decoded MiB/s and
(decoded + compressed) MiB/s, which is what the allowance is proportional to.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MIB = 2**20

# Run in a subprocess per file: every decoder of the file's chain on its first frame.
_CHILD = r"""
import json, sys, time
import pydicom
from pydicom.encaps import generate_frames
from bridge.dicom.codecs import DECODER_CHAINS, PixelSpec, _available_chain, _decode_one
from bridge.dicom.codestream import check_frame

path, only = sys.argv[1], sys.argv[2]
ds = pydicom.dcmread(path)
syntax = str(ds.file_meta.TransferSyntaxUID)
frames = int(ds.get("NumberOfFrames", 1) or 1)
spec = PixelSpec(ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored,
                 ds.PixelRepresentation, str(ds.PhotometricInterpretation),
                 int(ds.get("PlanarConfiguration", 0) or 0), 1)
frame = next(generate_frames(ds.PixelData, number_of_frames=frames))
start, end = check_frame(syntax, frame, spec)
frame = frame[start:end]
name = only
try:
    _decode_one(name, frame, syntax, spec)  # imports and first-call costs, not timed
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        _decode_one(name, frame, syntax, spec)
        best = min(best, time.perf_counter() - began)
    print(json.dumps({"seconds": best, "decoded": spec.frame_bytes, "compressed": len(frame)}))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}))
"""


def _native(pixels: np.ndarray[Any, Any], bits_stored: int) -> Any:
    """An Explicit VR Little Endian secondary-capture dataset holding `pixels`."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = "RGB" if pixels.ndim == 3 else "MONOCHROME2"
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds


def _images(size: int) -> dict[str, Any]:
    rng = np.random.default_rng(20261206)
    y, x = np.mgrid[0:size, 0:size] / size
    body = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.16) * (1000 + 300 * np.sin(12 * x) * np.cos(9 * y))
    ct = np.clip(body + rng.normal(0, 20, (size, size)) + 24, 0, 4095).astype(np.uint16)
    return {
        f"noise16 {size}": (rng.integers(0, 65536, (size, size), dtype=np.uint16), 16),
        f"ct12 {size}": (ct, 12),
        f"rgb8 noise {size}": (rng.integers(0, 256, (size, size, 3), dtype=np.uint8), 8),
        f"mono8 noise {size}": (rng.integers(0, 256, (size, size), dtype=np.uint8), 8),
        f"ct12 as 12-bit {size}": (ct, 12),
    }


def _encoded(folder: Path, label: str, pixels: np.ndarray[Any, Any], bits: int) -> list[Path]:
    """`pixels` in every syntax an encoder here writes; files in `folder`."""
    from pydicom import uid

    out: list[Path] = []
    slug = label.replace(" ", "_")
    eight = pixels.dtype == np.uint8
    plans: list[tuple[str, str, dict[str, Any]]] = []
    if not eight or pixels.ndim == 3:
        plans += [
            ("j2k-lossless", uid.JPEG2000Lossless, {}),
            ("j2k-lossy", uid.JPEG2000, {"j2k_cr": [20]}),
            ("jls-lossless", uid.JPEGLSLossless, {}),
            ("jls-near3", uid.JPEGLSNearLossless, {"jls_error": 3}),
            ("rle", uid.RLELossless, {}),
        ]
    for name, syntax, kwargs in plans:
        ds = _native(pixels, bits)
        try:
            ds.compress(syntax, generate_instance_uid=False, **kwargs)
        except Exception as exc:  # an encoder that lacks the case: no row
            print(f"# {label} {name}: not encoded ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        path = folder / f"{slug}-{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    native = folder / f"{slug}-native.dcm"
    _native(pixels, bits).save_as(native, enforce_file_format=True)
    jpeg: list[tuple[str, list[str]]] = []
    if not eight or label.startswith("ct12 as"):
        jpeg += [("jpeg-lossless-sv1", ["+e1"]), ("jpeg-lossless-p14", ["+el"])]
    if label.startswith("ct12 as"):
        jpeg += [("jpeg-extended12", ["+ee"])]
    if eight:
        jpeg += [("jpeg-lossless-sv1", ["+e1"]), ("jpeg-baseline", ["+eb"])]
    for name, options in jpeg:
        path = folder / f"{slug}-{name}.dcm"
        done = subprocess.run(
            ["dcmcjpeg", *options, str(native), str(path)], capture_output=True, text=True
        )
        if done.returncode == 0:
            out.append(path)
        else:
            print(f"# {label} {name}: dcmcjpeg failed: {done.stderr.strip()}", file=sys.stderr)
    return out


def _pydicom_files() -> list[Path]:
    import pydicom

    from bridge.dicom.codecs import DECODER_CHAINS
    from tests.orthanc import pydicom_test_files

    files = []
    for path in sorted(pydicom_test_files().glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            syntax = str(ds.file_meta.TransferSyntaxUID)
        except Exception:
            continue
        if syntax in DECODER_CHAINS and "Rows" in ds:
            files.append(path)
    return files


def _measure(path: Path) -> list[dict[str, Any]]:
    import pydicom

    from bridge.dicom.codecs import DECODER_CHAINS

    syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    rows = []
    for decoder in DECODER_CHAINS[syntax]:
        env = {"PYTHONPATH": str(REPO)}
        try:
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, str(path), decoder],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )
            lines = done.stdout.strip().splitlines()
            result = json.loads(lines[-1]) if lines else {"error": f"exit {done.returncode}"}
        except subprocess.TimeoutExpired:
            result = {"error": "over 120 s"}
        rows.append({"file": path.name, "syntax": syntax, "decoder": decoder, **result})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,2048")
    parser.add_argument("--pydicom", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths: list[Path] = []
        for size in (int(s) for s in args.sizes.split(",") if s):
            for label, (pixels, bits) in _images(size).items():
                paths += _encoded(Path(tmp), label, pixels, bits)
        if args.pydicom:
            paths += _pydicom_files()
        for path in paths:
            for row in _measure(path):
                rows.append(row)
                if "error" in row:
                    print(f"{row['syntax']:24} {row['decoder']:12} {row['file']:40} {row['error']}")
                    continue
                dec, comp, sec = row["decoded"] / MIB, row["compressed"] / MIB, row["seconds"]
                print(
                    f"{row['syntax']:24} {row['decoder']:12} {row['file']:40} "
                    f"{dec:8.3f} {comp:8.3f} {sec:8.4f} {dec / sec:8.1f} {(dec + comp) / sec:8.1f}",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
