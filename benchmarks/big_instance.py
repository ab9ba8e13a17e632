"""One large multi-frame instance: catch-up against one core of OpenJPEG decoding its frames.

    python benchmarks/big_instance.py [--frames 100] [--size 1024] [--rounds 3]

The instance: `frames` frames of size x size 12-bit noise, JPEG 2000 lossless (one codestream
repeated: encoding is the slow part). Measured in one run:

  serial   OpenJPEG (pylibjpeg-openjpeg) decoding the frames one after the other in this
           process, one core: the floor the issue compares with
  catch-up `python -m bridge catch-up` between two real Orthancs, from its start to its exit
           (start-up, download, decoding, upload and verification), with the peak memory of its
           process tree (the sum of each process's VmHWM)

and speed-up = serial / catch-up, peak / decoded size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from openjpeg.utils import decode, encode_array

from tests import bridgectl
from tests.orthanc import OrthancPair
from tests.transcode_support import j2k_monochrome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pixels = np.random.default_rng(0).integers(0, 4096, (args.size, args.size), dtype="<u2")
    frame = encode_array(pixels, bits_stored=12, photometric_interpretation=2)
    decoded_mib = args.frames * args.size * args.size * 2 / 2**20
    print(f"{args.frames} frames of {args.size}x{args.size}: {decoded_mib:.0f} MiB decoded")
    serial, catch_up, peaks = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            started = time.perf_counter()
            for _ in range(args.frames):
                decode(frame)
            serial.append(time.perf_counter() - started)
            work = Path(tmp) / f"round{round_}"
            work.mkdir()
            pair = OrthancPair.create(work)
            pair.start()
            try:
                pair.source.upload(
                    j2k_monochrome(
                        [frame] * args.frames,
                        args.size,
                        "1.2.840.10008.5.1.4.1.1.7",
                        NumberOfFrames=args.frames,
                    )
                )
                config = bridgectl.write_config(work, pair.source, pair.target, http_listen="")
                started = time.perf_counter()
                done, peak = bridgectl.run_measured(
                    "catch-up", config, pair.source, pair.target, timeout=600
                )
                catch_up.append(time.perf_counter() - started)
                peaks.append(peak)
                assert done.returncode == 0, done.stdout + done.stderr
                assert "1 converted" in done.stdout, done.stdout
            finally:
                pair.discard()
            print(
                f"round {round_ + 1}: serial {serial[-1]:.1f} s, catch-up {catch_up[-1]:.1f} s "
                f"(speed-up {serial[-1] / catch_up[-1]:.2f}), peak {peak / 2**20:.0f} MiB "
                f"({peak / 2**20 / decoded_mib:.2f} x decoded)"
            )
    ratios = [s / c for s, c in zip(serial, catch_up, strict=True)]
    rounds = ", ".join(f"{r:.2f}" for r in ratios)
    print(
        f"median speed-up {statistics.median(ratios):.2f} ({rounds}); "
        f"peak {statistics.median(peaks) / 2**20 / decoded_mib:.2f} x decoded"
    )


if __name__ == "__main__":
    main()
