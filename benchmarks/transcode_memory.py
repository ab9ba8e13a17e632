"""Peak memory of transcoding a 100-frame 512x512 16-bit lossless JPEG 2000 instance.

Run as `python benchmarks/transcode_memory.py`. The instance is generated (noisy CT-like data,
encoded with pylibjpeg-openjpeg), then transcoded in a fresh subprocess; the figure printed is
that process's peak RSS growth during `transcode()` divided by the decoded pixel size. The peak
is read from /proc/self/status (VmHWM after resetting it), because ru_maxrss of a freshly
exec'd child still carries its parent's high-water mark on Linux.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.transcode_support import j2k_monochrome  # noqa: E402

ROWS = COLUMNS = 512
FRAMES = 100


def make_instance(path: Path, frames: int) -> int:
    """Write a lossless JPEG 2000 multi-frame CT-like instance; return its decoded size."""
    from openjpeg.utils import encode_array

    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:ROWS, :COLUMNS]
    body = ((yy - ROWS / 2) ** 2 + (xx - COLUMNS / 2) ** 2 < (ROWS * 0.45) ** 2) * 1000
    encoded = []
    for index in range(frames):
        noise = rng.normal(0, 40, (ROWS, COLUMNS))
        frame = (body + 24 + noise + 5 * index).clip(0, 4095).astype("<u2")
        encoded.append(encode_array(frame, bits_stored=12, photometric_interpretation=2))
    enhanced_ct = "1.2.840.10008.5.1.4.1.1.2.1"
    data = j2k_monochrome(encoded, ROWS, enhanced_ct, Modality="CT", NumberOfFrames=frames)
    path.write_bytes(data)
    return ROWS * COLUMNS * 2 * frames


_CHILD = r"""
import json, resource, sys
from bridge.dicom.transcode import transcode

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

data = open(sys.argv[1], "rb").read()
warm = open(sys.argv[2], "rb").read()
transcode(warm)  # loads the codec libraries, so that only the instance's own memory is measured
del warm
base = status("VmRSS")
# ru_maxrss survives fork+exec on Linux (it reported the parent's peak here), so the peak is
# read from VmHWM, reset to the current RSS first ("5" > clear_refs).
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = transcode(data)
print(json.dumps({
    "base_kib": base,
    "peak_kib": status("VmHWM"),
    "maxrss_before_kib": maxrss_before,
    "maxrss_after_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "output": len(result.data),
}))
"""


def main() -> None:
    """Generate the instance, transcode it in a subprocess, print the peak memory ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=FRAMES)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "ct_j2k.dcm"
        warm = Path(tmp) / "warm.dcm"
        started = time.monotonic()
        decoded = make_instance(source, args.frames)
        make_instance(warm, 1)
        print(
            f"generated {source.stat().st_size / 1e6:.1f} MB J2K ({decoded / 1e6:.1f} MB decoded) "
            f"in {time.monotonic() - started:.0f} s"
        )
        root = Path(__file__).resolve().parent.parent
        started = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-c", _CHILD, str(source), str(warm)],
            cwd=root,
            check=True,
            capture_output=True,
            text=True,
        )
        elapsed = time.monotonic() - started
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    growth = (figures["peak_kib"] - figures["base_kib"]) * 1024
    print(
        f"transcoded in {elapsed:.1f} s; peak RSS growth {growth / 1e6:.1f} MB = "
        f"{growth / decoded:.2f} x decoded size (target <= 1.5 x plus a fixed overhead)"
    )
    print(
        f"(ru_maxrss before/after: {figures['maxrss_before_kib'] / 1024:.0f} / "
        f"{figures['maxrss_after_kib'] / 1024:.0f} MiB, inherited from the parent process)"
    )


if __name__ == "__main__":
    main()
