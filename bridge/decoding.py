"""The decoding processes: a pool that starts at once, survives crashes, and stops at once.

No JPEG 2000 decoder releases the GIL, so decoding runs in worker processes. This module is
also the boundary the instances cross: the types sent to and from the workers live here, so
that the main process never imports pydicom, numpy or the codecs (about 0.2 s of start-up and
a hundred MB it does not need); only the forkserver and its workers do.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from bridge.errors import DecodeError, Interrupted

log = logging.getLogger(__name__)

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


@dataclass(frozen=True)
class TranscodeOptions:
    """Limits and pass-through rules for one transcoding call."""

    max_decoded_bytes: int = 2 * 1024**3  # refuse bigger instances before allocating
    forward_unchanged: frozenset[str] = frozenset()  # undecodable syntaxes to pass through as-is


@dataclass(frozen=True)
class Transcoded:
    """The result of transcoding one instance."""

    data: bytes | bytearray  # a complete DICOM Part-10 file
    source_syntax: str  # transfer syntax UID of the input
    sop_instance_uid: str
    forwarded: bool  # True when `data` is the input unchanged (already EVRLE, or forward_unchanged)


def _transcode_in_worker(data: bytes, options: TranscodeOptions) -> Transcoded:
    # Imported here, not at the top: the forkserver preloads it for the workers, and the
    # main process, which only pickles a reference to this function, never loads it.
    from bridge.transcode import transcode

    return transcode(data, options)


def _ignore_interrupts() -> None:
    """Ctrl-C reaches the whole process group; only the parent decides how to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class DecoderPool:
    """`workers` processes running bridge.transcode; `decode` waits, honouring `stop`."""

    def __init__(self, workers: int, options: TranscodeOptions, stop: threading.Event) -> None:
        self.workers = workers
        self._options = options
        self._stop = stop
        self._lock = threading.Lock()
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        # forkserver: the workers must not inherit this process's threads and sockets. The
        # server imports the decoders once and every worker is forked ready to decode, rather
        # than each importing pydicom and the codecs itself (~0.35 s of CPU per process).
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["bridge.transcode"])
        pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_ignore_interrupts)
        # Start the processes now, while the feed's first page is being read, not on the
        # first instance: their start-up then overlaps the main process's.
        for _ in range(self.workers):
            pool.submit(int)
        return pool

    def decode(self, data: bytes) -> Transcoded:
        """Transcode in a worker process; survive a worker that crashed or was killed."""
        for _attempt in range(2):
            pool = self._pool
            try:
                return self._wait(pool.submit(_transcode_in_worker, data, self._options))
            except BrokenProcessPool:
                if self._stop.is_set():
                    raise Interrupted("shutting down") from None
                # Another instance may have been the culprit: replace the pool, try once more.
                with self._lock:
                    if self._pool is pool:
                        log.warning("a decoding process died; starting new ones")
                        self._pool = self._start()
                        _terminate(pool)
        raise DecodeError("the decoding process died twice on this instance (crash or memory)")

    def _wait(self, future: Future[Transcoded]) -> Transcoded:
        while True:
            try:
                return future.result(timeout=0.2)
            except FutureTimeout:
                if self._stop.is_set():
                    future.cancel()
                    raise Interrupted("shutting down") from None

    def close(self) -> None:
        """Stop at once, killing decodes still running (their instances are redone)."""
        _terminate(self._pool)


def _terminate(pool: ProcessPoolExecutor) -> None:
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
