"""One large multi-frame instance: catch-up against one core of OpenJPEG decoding its frames.

    python benchmarks/big_instance.py [--frames 100] [--size 1024] [--rounds 3]

The instance: `frames` frames of size x size 12-bit noise, JPEG 2000 lossless (one codestream
repeated: encoding is the slow part). Measured in one run:

  serial   OpenJPEG (pylibjpeg-openjpeg) decoding the frames one after the other in this
           process, one core: the floor the issue compares with; half of the frames just before
           the catch-up and half just after it, so that the drift of a shared machine's speed
           (10-20% from one minute to the next here) weighs on both alike
  catch-up `python -m bridge catch-up` between two real Orthancs, from its start to its exit
           (start-up, download, decoding, upload and verification), with the peak memory of its
           process tree

and speed-up = serial / catch-up, peak / decoded size.

The peak ("tree") is the high-water mark of a memory cgroup made for the catch-up alone
(tests/tree_memory.py): the kernel counts every page of the bridge, its decoders' parent and
the decoding processes once, whoever maps it, and also pages that no process maps (files in
memory: memfd, tmpfs), and keeps the maximum itself. It includes the page cache of files the
bridge writes (its ledger); it leaves out pages of files that were in the page cache before
(Python's modules and libraries, warmed by this process's own imports). Needs root (a cgroup is
made); elsewhere only the second figure is shown. "summed" is the older count, the sum of each
process's VmHWM: shared pages once per process, and nothing of a file in memory no process maps.
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
from tests.tree_memory import run_measured

MIB = 2**20


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
    # In the page cache before the bridge maps it: libraries count as they would in a
    # running service (tests/tree_memory.py).
    import imagecodecs  # noqa: F401

    serial, catch_up, trees, sums = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
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
                before = _serial(frame, args.frames // 2)
                started = time.perf_counter()
                measured = run_measured("catch-up", config, pair.source, pair.target, timeout=600)
                catch_up.append(time.perf_counter() - started)
                serial.append(before + _serial(frame, args.frames - args.frames // 2))
                done = measured.done
                trees.append(measured.tree or 0)
                sums.append(measured.summed)
                assert done.returncode == 0, done.stdout + done.stderr
                assert "1 converted" in done.stdout, done.stdout
            finally:
                pair.discard()
            print(
                f"round {round_ + 1}: serial {serial[-1]:.1f} s, catch-up {catch_up[-1]:.1f} s "
                f"(speed-up {serial[-1] / catch_up[-1]:.2f}), peak: "
                f"{_peak(trees[-1], decoded_mib)} tree, {_peak(sums[-1], decoded_mib)} summed"
            )
    ratios = [s / c for s, c in zip(serial, catch_up, strict=True)]
    rounds = ", ".join(f"{r:.2f}" for r in ratios)
    print(
        f"median speed-up {statistics.median(ratios):.2f} ({rounds}); peak: "
        f"{_peak(statistics.median(trees), decoded_mib)} tree, "
        f"{_peak(statistics.median(sums), decoded_mib)} summed"
    )


def _serial(frame: bytes, count: int) -> float:
    """Seconds for OpenJPEG to decode `frame` `count` times, one after the other."""
    started = time.perf_counter()
    for _ in range(count):
        decode(frame)
    return time.perf_counter() - started


def _peak(peak: float, decoded_mib: float) -> str:
    if not peak:
        return "(no cgroup)"
    return f"{peak / MIB:.0f} MiB ({peak / MIB / decoded_mib:.2f} x decoded)"


if __name__ == "__main__":
    main()
