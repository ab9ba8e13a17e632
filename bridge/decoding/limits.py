"""How much memory and time one instance may cost its decoding process.

Both follow from what the instance's header declares (bridge.dicom.header), so that a small file
whose codestream lies about its size costs what a small file costs:

- Memory: before each instance a decoding process lowers its own address-space limit
  (RLIMIT_AS) to what it uses already plus the instance's allowance. A decoder that allocates
  beyond it fails that instance ("decoding needed more memory than ..."), instead of taking
  gigabytes from the host. This is the second line of defence; the first is bridge.dicom.codestream.
- Time: the bridge stops a decoding process that spends longer than the instance's allowance
  on it, replaces it, and records the instance as failed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from bridge.dicom.header import image_size

MIB = 1024 * 1024
# Room for the decoder's own structures and Python's, whatever the image. Measured (VmPeak
# above the size before the instance): every file pydicom ships, at most 1 MiB; a 4000 x 4000
# RGB JPEG 2000 frame, 369 MiB against 434 MiB allowed before this headroom.
HEADROOM = 256 * MIB
# One frame's working copies: OpenJPEG holds 32 bits per sample (4 times an 8-bit frame),
# then the decoded frame and a copy of it.
FRAME_COPIES = 6
# Seconds a decoding process may spend on an instance: `decode_timeout` per TIMEOUT_UNIT of
# work, the declared decoded size plus the file's size (entropy decoding goes through every
# compressed byte, and the output is written once), but never less than for TIME_FLOOR_WORK, so
# that a small file's allowance is a few seconds, not minutes. Calibrated with
# benchmarks/decode_rates.py: the slowest legitimate decode was JPEG 2000 lossless of 8-bit RGB
# noise, 7.6 MiB of work per second of one core (README, "Decoding time"); the default of 80 s
# per 100 MiB is six times its 13 s.
TIMEOUT_UNIT = 100 * MIB
TIME_FLOOR_WORK = 8 * MIB


def memory_allowance(data: bytes | bytearray | memoryview, max_decoded_bytes: int) -> int:
    """Bytes of address space an instance may add to its decoding process."""
    size = image_size(data)
    if size is None:  # unreadable header: as much as the largest instance allowed
        total = frame = max_decoded_bytes
    else:
        total = min(size.total_bytes, max_decoded_bytes)
        frame = min(size.frame_bytes, max_decoded_bytes)
    # The file and its parsed or inflated copy, the output and an inflated dataset, and the
    # frames being decoded: one, or one more than the threads of a multi-frame instance
    # (bridge.dicom.frames).
    at_once = min(total // frame, _CPUS + 1) if frame else 1
    return HEADROOM + 2 * len(data) + 2 * total + FRAME_COPIES * frame * max(1, at_once)


def time_allowance(
    data: bytes | bytearray | memoryview, decode_timeout: float, max_decoded_bytes: int
) -> float:
    """Seconds a decoding process may spend on an instance: `decode_timeout` per 100 MiB of
    declared decoded pixels plus file, counted as at least 8 MiB."""
    size = image_size(data)
    decoded = min(size.total_bytes, max_decoded_bytes) if size else 0
    work = max(TIME_FLOOR_WORK, decoded + len(data))
    return decode_timeout * work / TIMEOUT_UNIT


_PAGE = os.sysconf("SC_PAGE_SIZE")
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def _address_space() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[0]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None  # not Linux: no limit is set


@contextlib.contextmanager
def address_space_limited(allowance: int) -> Iterator[None]:
    """Within the block, this process may map at most `allowance` bytes more than now."""
    import resource  # the decoding processes only

    used = _address_space()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if used is None:
        yield
        return
    limit = used + allowance
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft)  # a limit the administrator set stays in force
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
