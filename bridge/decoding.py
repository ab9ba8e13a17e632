"""The decoding processes: one pipe each, started at once, replaced when one dies.

No JPEG 2000 decoder releases the GIL, so decoding runs in worker processes. This module is
also the boundary the instances cross: the types sent to and from the workers live here, so
that the main process never imports pydicom, numpy or the codecs (about 0.2 s of start-up and
a hundred MB it does not need); only the forkserver and its workers do.

Each worker owns a pipe and decodes one instance at a time. The files cross it as raw bytes
(`send_bytes`), never pickled, and a transfer thread talks to the worker it borrowed directly:
no executor thread, no call queue. A worker that dies (a decoder crash, the kernel's OOM
killer) costs only its own instance a second attempt in a new process; the other workers and
their instances carry on, where a broken process pool would have failed them all.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.forkserver
import os
import pickle
import queue
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from bridge.errors import DecodeError, Interrupted

log = logging.getLogger(__name__)

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
# How often a waiting thread looks at the stop flag.
_POLL_SECONDS = 0.2


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


class _WorkerDied(Exception):
    """The decoding process ended (crash, out-of-memory kill) before answering.

    Never leaves this module: DecoderPool.decode turns it into a retry or a DecodeError.
    """


# --- inside a worker process -------------------------------------------------------------------


def _serve(conn: Connection, options: TranscodeOptions) -> None:
    """A worker's whole life: decode every file that arrives on `conn` until it closes."""
    # Ctrl-C reaches the whole process group; only the parent decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Imported here, not at the top: the forkserver preloads it for the workers, and the
    # main process, which only names this function, never loads it.
    from bridge.transcode import transcode

    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the bridge closed the pipe or is gone
        try:
            result = transcode(data, options)
        except Exception as exc:  # every error goes back to the caller, the worker stays
            conn.send_bytes(_pickle_error(exc))
            continue
        finally:
            del data
        header = (result.source_syntax, result.sop_instance_uid, result.forwarded)
        conn.send_bytes(pickle.dumps((True, header)))
        conn.send_bytes(result.data)
        del result


def _pickle_error(exc: Exception) -> bytes:
    try:
        return pickle.dumps((False, exc))
    except Exception:  # an exception that cannot cross the pipe: keep its text
        return pickle.dumps((False, DecodeError(f"{type(exc).__name__}: {exc}")))


# --- in the bridge -----------------------------------------------------------------------------


def start_server() -> None:
    """Start the forkserver, which imports the decoders once for every worker; returns at once.

    Called as early as possible (see bridge.__main__): its ~0.3 s of imports then overlap the
    main process's own start-up instead of delaying the first instance. Idempotent.
    """
    # numpy's OpenBLAS starts a spinning thread per core at import, and again in every forked
    # worker: CPU taken from decoding for nothing, since no BLAS routine is ever called and
    # the parallelism is the processes'. (0.15 s of CPU per import measured; the user's
    # setting, if any, wins.)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # forkserver: the workers must not inherit this process's threads and sockets, and each
    # is forked ready to decode rather than importing pydicom and the codecs itself.
    multiprocessing.get_context("forkserver").set_forkserver_preload(["bridge.transcode"])
    multiprocessing.forkserver.ensure_running()


class _Worker:
    """One decoding process and the parent's end of its pipe."""

    def __init__(self, context: Any, options: TranscodeOptions) -> None:
        self.conn, child = multiprocessing.Pipe()
        self.process: BaseProcess = context.Process(
            target=_serve, args=(child, options), name="bridge-decoder", daemon=True
        )
        self.process.start()
        child.close()

    def transcode(self, data: bytes, stop: threading.Event) -> Transcoded:
        try:
            self.conn.send_bytes(data)
            while not self.conn.poll(_POLL_SECONDS):
                if stop.is_set():
                    raise Interrupted("shutting down")
            ok, payload = pickle.loads(self.conn.recv_bytes())
            if not ok:
                raise payload
            source_syntax, sop_instance_uid, forwarded = payload
            return Transcoded(self.conn.recv_bytes(), source_syntax, sop_instance_uid, forwarded)
        except (EOFError, OSError) as exc:
            # OSError also when the pipe was closed under us by close() at shutdown.
            if stop.is_set():
                raise Interrupted("shutting down") from None
            raise _WorkerDied(str(exc)) from None

    def kill(self) -> None:
        self.conn.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)


class DecoderPool:
    """`workers` decoding processes; `decode` borrows one, waits, and honours `stop`."""

    def __init__(self, workers: int, options: TranscodeOptions, stop: threading.Event) -> None:
        self.workers = workers
        self._options = options
        self._stop = stop
        start_server()
        self._context = multiprocessing.get_context("forkserver")
        self._all: list[_Worker] = []
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        # Started now, while the feed's first page is being read, not on the first instance.
        for _ in range(workers):
            self._idle.put(self._spawn())

    def _spawn(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise Interrupted("shutting down")
            worker = _Worker(self._context, self._options)
            self._all.append(worker)
            return worker

    def decode(self, data: bytes) -> Transcoded:
        """Transcode in a worker process; a worker that dies is replaced and tried once more."""
        worker = self._borrow()
        deaths = 0
        while True:
            try:
                result = worker.transcode(data, self._stop)
            except _WorkerDied:
                deaths += 1
                worker = self._replace(worker)
                if deaths < 2:
                    continue
                self._idle.put(worker)
                raise DecodeError(
                    "the decoding process died twice on this instance (crash or memory)"
                ) from None
            except Interrupted:
                self._retire(worker)  # it may still be decoding: it cannot be lent again
                raise
            except BaseException:
                self._idle.put(worker)  # the instance was bad, not the worker
                raise
            self._idle.put(worker)
            return result

    def _replace(self, dead: _Worker) -> _Worker:
        code = dead.process.exitcode
        self._retire(dead)
        if self._stop.is_set():
            raise Interrupted("shutting down")
        log.warning("a decoding process died (exit code %s); starting a new one", code)
        return self._spawn()

    def _borrow(self) -> _Worker:
        while True:
            try:
                return self._idle.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if self._stop.is_set():
                    raise Interrupted("shutting down") from None

    def _retire(self, worker: _Worker) -> None:
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)
        worker.kill()

    def pids(self) -> list[int]:
        """The process IDs of the live workers."""
        with self._lock:
            return [w.process.pid for w in self._all if w.process.pid is not None]

    def close(self) -> None:
        """Stop at once, killing decodes still running (their instances are redone)."""
        with self._lock:
            self._closed = True
            workers, self._all = self._all, []
        for worker in workers:
            worker.kill()
