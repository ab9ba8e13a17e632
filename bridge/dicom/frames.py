"""The frames of one multi-frame JPEG 2000 instance, decoded by several threads of one decoding
process.

pylibjpeg-openjpeg holds the GIL while it decodes, so one process decodes one frame at a time:
a 100-frame instance kept one core busy while the others idled. imagecodecs' build of the same
OpenJPEG releases it, and two threads decoding a frame each did 1.90 times the frames per second
of one (1024 x 1024 12-bit lossless frames, 2 cores). Only frames whose result cannot differ
from the chain's take this path: lossless (reversible 5-3) Part 1 codestreams of one component
whose precision and sign are those of the DICOM header, decoded to exactly the frame's size.
Any other frame, and any frame imagecodecs refuses, goes to the decoder chain as before.
"""

from __future__ import annotations

import collections
import functools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from pydicom import uid

from bridge.dicom.lossy import lossy_method

# The syntaxes whose frames may take this path (HTJ2K decodes 17-24 times faster already).
SYNTAXES = frozenset({uid.JPEG2000Lossless, uid.JPEG2000})
# Frames: below this, threads cost more than they give.
MIN_FRAMES = 4
_SOC_SIZ = b"\xff\x4f\xff\x51"
_SSIZ = 42  # SOC, SIZ marker, Lsiz, Rsiz, eight 32-bit sizes, Csiz: the first component's Ssiz


@functools.cache
def _decoder() -> Callable[..., Any] | None:
    try:
        from imagecodecs import jpeg2k_decode
    except ImportError:  # optional: every frame then goes to the chain
        return None
    return jpeg2k_decode


@functools.cache
def threads() -> int:
    """Threads for one instance's frames: the cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def wanted(frame_count: int, transfer_syntax: str, samples: int, bits_allocated: int) -> bool:
    """Whether an instance's frames are worth decoding in threads here: monochrome JPEG 2000
    in 8 or 16 bits, several frames."""
    return (
        transfer_syntax in SYNTAXES
        and samples == 1
        and bits_allocated in (8, 16)
        and frame_count >= MIN_FRAMES
        and threads() > 1
        and _decoder() is not None
    )


def decode(
    encoded: bytes,
    transfer_syntax: str,
    shape: tuple[int, int],
    dtype: np.dtype[Any],
    bits: int,
    into: memoryview | None = None,
) -> np.ndarray[Any, Any] | None:
    """One frame decoded, or None when this path may not give the chain's exact result.

    `bits` is BitsStored, `dtype` the frame's sample type (its sign is PixelRepresentation).
    With `into` (the frame's place in the output) the frame is decoded there, and that place
    returned. Runs in a worker thread; releases the GIL while OpenJPEG decodes.
    """
    if not _fits(encoded, transfer_syntax, bits, dtype):
        return None
    decoder = _decoder()
    if decoder is None:
        return None
    out = None if into is None else np.frombuffer(into, dtype).reshape(shape)
    try:
        pixels = decoder(encoded, numthreads=1, out=out)
    except Exception:  # the chain decides, and words the reason, as for any other frame
        return None
    if pixels.shape != shape or pixels.dtype != dtype:
        return None
    return pixels if out is not None else np.ascontiguousarray(pixels)


def _fits(encoded: bytes, transfer_syntax: str, bits: int, dtype: np.dtype[Any]) -> bool:
    """A lossless one-component codestream of the header's precision and sign."""
    if len(encoded) <= _SSIZ or not encoded.startswith(_SOC_SIZ):
        return False
    components = int.from_bytes(encoded[_SSIZ - 2 : _SSIZ], "big")
    ssiz = encoded[_SSIZ]
    signed, precision = bool(ssiz & 0x80), (ssiz & 0x7F) + 1
    return (
        components == 1
        and precision == bits
        and signed == (dtype.kind == "i")
        # The type OpenJPEG's precision decodes to: decoded into a place of another type,
        # the samples would be cast where the chain decides.
        and dtype.itemsize == (1 if precision <= 8 else 2)
        and lossy_method(transfer_syntax, encoded) is None
    )


_pool: ThreadPoolExecutor | None = None


def _threads_pool() -> ThreadPoolExecutor:
    """The decoding process's threads, one per core, for its whole life."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(threads(), thread_name_prefix="frames")
    return _pool


def start() -> None:
    """Start the threads now, before any instance's address-space limit (bridge.decoding.limits): a
    thread's stack is mapped when it starts, and under a tight limit none could."""
    if threads() > 1:
        gate = threading.Barrier(threads())
        for done in [_threads_pool().submit(gate.wait, 5) for _ in range(threads())]:
            done.result()


def ordered(
    jobs: Iterator[tuple[int, bytes]], run: Callable[[int, bytes], np.ndarray[Any, Any] | None]
) -> Iterator[tuple[int, bytes, np.ndarray[Any, Any] | None]]:
    """(index, encoded, run(index, encoded)) for each job, in order, with `threads() + 1` in
    flight: memory holds that many frames, not the instance.

    Left early (a frame failed, the instance with it), it waits for the frames still being
    decoded: they may be writing into the output, which must outlive them.
    """
    pending: collections.deque[tuple[int, bytes, Future[np.ndarray[Any, Any] | None]]] = (
        collections.deque()
    )
    try:
        for index, encoded in jobs:
            try:
                future = _threads_pool().submit(run, index, encoded)
            except RuntimeError:  # no thread can start (an address-space limit): the chain decides
                future = Future()
                future.set_result(None)
            pending.append((index, encoded, future))
            if len(pending) > threads():
                done_index, done_encoded, done = pending.popleft()
                yield done_index, done_encoded, done.result()
        while pending:
            done_index, done_encoded, done = pending.popleft()
            yield done_index, done_encoded, done.result()
    finally:
        for _, _, left in pending:
            if not left.cancel():
                left.exception()  # waits; its frame is not needed any more
