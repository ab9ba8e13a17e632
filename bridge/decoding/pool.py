"""The decoding processes: a pair of pipes each, started at once, replaced when one dies.

No JPEG 2000 decoder releases the GIL, so decoding runs in worker processes. This module is
also the boundary the instances cross: the types sent to and from the workers live here, so
that the main process never imports pydicom, numpy or the codecs (about 0.2 s of start-up and
a hundred MB it does not need); only the zygote (bridge.decoding.zygote) and its workers do.

Each worker owns a pair of pipes and decodes one instance at a time, with the next one already
waiting in its pipe. The files cross the pipes as raw bytes, never pickled (a decoded one is read
straight into its buffer after a small header that gives its length), and a transfer thread
talks to the worker it borrowed directly: no executor thread, no call queue. A big file that the
bridge holds in a memory file (bridge.memfile) does not cross the pipe: its descriptor goes to
the worker on a socket of its own, with an empty memory file into which the worker writes the
output, and the pipe carries an empty message in its place. A worker that dies
(a decoder crash, the kernel's OOM killer) costs only its own instance a second attempt in a new
process; the other workers and their instances carry on, where a broken process pool would have
failed them all.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from bridge import memfile, metrics
from bridge.decoding import zygote
from bridge.decoding.limits import address_space_limited, memory_allowance, time_allowance
from bridge.errors import PROCESS_EXITS, DecodeError, Interrupted, one_line
from bridge.jobs import DECODER_STEP, Output, Transcoded, TranscodeOptions

log = logging.getLogger(__name__)

# How often a waiting thread looks at the stop flag.
_POLL_SECONDS = 0.2
# Instances queued in each worker: the one it decodes and the next.
DEPTH = 2
_PIPE_BYTES = 1024 * 1024
# Workers lost while this instance waited in them, whoever's fault, before it is given up.
_MAX_LOSSES = 5
# Deaths that a decoder causes itself on an input, and will cause again: not worth a retry.
_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}
_STDERR_KEPT = 64 * 1024


class _TimedOut(Exception):
    """The decoding process spent longer than the instance's allowance on it.

    Never leaves this module: DecoderPool.decode replaces the process and fails the instance.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(f"decoding took longer than {seconds:.{0 if seconds >= 10 else 1}f} s")
        self.seconds = seconds


class _WorkerDied(Exception):
    """The decoding process ended (crash, out-of-memory kill) before answering.

    `culprit` is True for the instance it was decoding, False for those queued behind it.
    Never leaves this module: DecoderPool.decode turns it into a retry or a DecodeError.
    """

    def __init__(self, culprit: bool) -> None:
        super().__init__("the decoding process died")
        self.culprit = culprit


# --- inside a worker process -------------------------------------------------------------------


def _serve(
    inbox_fd: int, outbox_fd: int, stderr_fd: int, files_fd: int, options: TranscodeOptions
) -> None:
    """A worker's whole life: decode every file that arrives in `inbox` (or, for an empty
    message there, in the memory file that `files` brings) until it closes."""
    # Ctrl-C and a supervisor's SIGTERM may reach the whole process group; only the bridge
    # decides how to stop (see bridge.decoding.zygote, which ignores them already when it forks us).
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_IGN)
    # What decoders print (OpenJPEG's complaints, a Rust panic's backtrace, GDCM's last words
    # before abort) goes to a file the bridge reads if this process dies, not to its log.
    os.dup2(stderr_fd, 2)
    os.close(stderr_fd)
    # Imported here, not at the top: the zygote preloads it for the workers, and the main
    # process, which only names this function, never loads it.
    convert: Callable[[bytes | memoryview, TranscodeOptions, Output | None], Transcoded]
    try:
        from bridge.dicom import frames
        from bridge.dicom.codecs import note_decoder_calls
        from bridge.dicom.transcode import transcode as convert

        note_decoder_calls(2)
        frames.start()
    except Exception as exc:  # a broken installation: every instance fails and says why
        convert = _failing(f"the decoders cannot be loaded: {one_line(exc)}")

    inbox = Connection(inbox_fd, writable=False)
    outbox = Connection(outbox_fd, readable=False)
    files = socket.socket(fileno=files_fd)

    while True:
        data: bytes | memoryview
        try:
            data = inbox.recv_bytes()
            # The output's memory file, when the file came in one: it is written there.
            into = _receive_files(files) if not data and memfile.SUPPORTED else None
        except (EOFError, OSError):
            return  # the bridge closed the pipe or is gone
        output: bytes | bytearray | memoryview = b""
        _forget_stderr()  # only the current instance's is of interest
        try:
            if into is not None:
                data = memfile.view_of(into[0], os.fstat(into[0]).st_size, writable=False)
            place = None if into is None else functools.partial(memfile.output, into[1])
            with address_space_limited(memory_allowance(data, options.max_decoded_bytes)):
                result = convert(data, options, place)
            output = result.data
            header = pickle.dumps((True, (*_header(result), len(output))))
            del result
        except PROCESS_EXITS:
            raise
        except BaseException as exc:  # every error goes back to the caller, the worker stays
            header = _pickle_error(exc)
        finally:
            del data
            for fd in into or ():  # the views keep what they need
                os.close(fd)
        try:
            outbox.send_bytes(header)
            if into is None:
                _write_all(outbox.fileno(), output)
        except OSError:
            return  # the bridge died or gave this instance up while it was being decoded
        del output


def _receive_files(files: socket.socket) -> tuple[int, int]:
    """The descriptors of a file's memory file and of the empty one for its output."""
    _, fds, _, _ = socket.recv_fds(files, 16, 2)
    if len(fds) != 2:
        for fd in fds:
            os.close(fd)
        raise EOFError("the bridge sent no memory files")
    return fds[0], fds[1]


def _forget_stderr() -> None:
    sys.stderr.flush()
    with contextlib.suppress(OSError):
        os.ftruncate(2, 0)
        os.lseek(2, 0, os.SEEK_SET)


def _failing(
    reason: str,
) -> Callable[[bytes | memoryview, TranscodeOptions, Output | None], Transcoded]:
    def convert(
        data: bytes | memoryview, options: TranscodeOptions, output: Output | None
    ) -> Transcoded:
        raise DecodeError(reason)

    return convert


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write the output file as raw bytes after its header, which gives its length."""
    # Not send_bytes: its reader collects the bytes in a BytesIO, an extra copy of every
    # output, page-faulted in afresh each time (half the main process's time on the pipes).
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _header(result: Transcoded) -> tuple[str, str, bool]:
    return result.source_syntax, result.sop_instance_uid, result.forwarded


def _pickle_error(exc: BaseException) -> bytes:
    try:
        return pickle.dumps((False, exc))
    except Exception:  # an exception that cannot cross the pipe: keep its text
        return pickle.dumps((False, DecodeError(one_line(exc))))


# --- in the bridge -----------------------------------------------------------------------------


def _widen(fd: int) -> None:
    """Give a pipe room for a whole CT slice, so neither side waits for the other to read."""
    # Linux pipes hold 64 KiB: a worker would wait, idle, until its 0.5 MB answer was read.
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is not None:
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default
            fcntl.fcntl(fd, set_size, _PIPE_BYTES)


class _Worker:
    """One decoding process, fed through its own pipes, with up to DEPTH instances queued.

    Instances are answered in the order they were sent: each caller takes a ticket when it
    sends and reads the answer when its ticket comes up.
    """

    def __init__(self, options: TranscodeOptions) -> None:
        # Each pipe has the worker's end (given to it, then closed here) and ours.
        worker_in, to_worker = os.pipe()
        from_worker, worker_out = os.pipe()
        for fd in (worker_in, worker_out):
            _widen(fd)
        self._inbox = Connection(to_worker, readable=False)
        self._outbox = Connection(from_worker, writable=False)
        # Memory files' descriptors go on a socket of their own, in the pipe's order.
        self._files, files = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._stderr = _memory_file()  # the worker's stderr, which it empties per instance
        self.last_words = ""  # what it had written when it ended
        try:
            # Returns at once: instances can queue in the pipes while the worker is forked.
            self.process = zygote.fork(
                _serve, [worker_in, worker_out, self._stderr, files.fileno()], options
            )
        finally:
            os.close(worker_in)
            os.close(worker_out)
            files.close()
        self._send_lock = threading.Lock()
        self._turn = threading.Condition()
        self._sent = self._answered = 0
        self._answered_at = 0.0  # when the latest answer was read: the next decode began then
        self.broken = False  # died, or its answers are out of step: never used again
        self.replacing = False  # a caller is killing it and forking its successor
        self.successor: _Worker | None = None
        self._killed = False
        self._kill_lock = threading.Lock()

    def transcode(
        self, data: bytes | memoryview, stop: threading.Event, seconds: float
    ) -> Transcoded:
        """Decode `data`; _TimedOut once the worker has spent `seconds` on it."""
        # A memory file's view crosses as its descriptor, with an empty memory file for the
        # output; so does an empty file, whose empty message on the pipe would say the same.
        files = memfile.SUPPORTED and (not data or memfile.descriptor(data) is not None)
        output = memfile.create("output") if files else None
        try:
            return self._transcode(data, output, stop, seconds)
        finally:
            if output is not None:
                os.close(output)  # the result's view, if any, keeps its own

    def _transcode(
        self, data: bytes | memoryview, output: int | None, stop: threading.Event, seconds: float
    ) -> Transcoded:
        try:
            with self._send_lock:
                if self.broken:
                    raise _WorkerDied(culprit=False)
                ticket = self._sent
                self._sent += 1
                if output is None:
                    self._inbox.send_bytes(data)
                else:
                    self._send_files(data, output)
                    self._inbox.send_bytes(b"")
                sent = time.monotonic()
        except OSError:
            self._break()
            raise _WorkerDied(culprit=False) from None
        try:
            with self._turn:
                while True:
                    if self.broken:  # it died on an instance ahead of this one
                        raise _WorkerDied(culprit=False)
                    if self._answered == ticket:
                        break
                    if stop.is_set():
                        raise Interrupted("shutting down")
                    self._turn.wait(_POLL_SECONDS)
                # The worker took this instance up when it had answered the one before.
                deadline = max(sent, self._answered_at) + seconds
            return self._answer(stop, deadline, seconds, data, output)
        except (_WorkerDied, Interrupted, _TimedOut) as exc:
            # An answer left unread would go to the next caller: this worker is done for.
            self._break()
            if isinstance(exc, Interrupted):
                # Ended now, not when the pool closes: it would finish its instance and wait
                # for ever to write an answer nobody reads (more than a pipe holds), while a
                # caller behind this one waits for ever to send it the next instance.
                self.process.kill()
            raise
        finally:
            with self._turn:
                self._answered += 1
                self._answered_at = time.monotonic()
                self._turn.notify_all()

    def _send_files(self, data: bytes | memoryview, output: int) -> None:
        """The descriptors of `data`'s memory file (a new one when it is empty) and `output`."""
        source = memfile.descriptor(data)
        empty = source is None
        if source is None:
            source = memfile.create("empty")
        try:
            socket.send_fds(self._files, [b"f"], [source, output])
        finally:
            if empty:
                os.close(source)  # the message carries its own

    def _answer(
        self,
        stop: threading.Event,
        deadline: float,
        seconds: float,
        sent: bytes | memoryview,
        output: int | None,
    ) -> Transcoded:
        try:
            while not self._outbox.poll(_POLL_SECONDS):
                if stop.is_set():
                    raise Interrupted("shutting down")
                if time.monotonic() > deadline:
                    raise _TimedOut(seconds)
            ok, payload = pickle.loads(self._outbox.recv_bytes())
            if not ok:
                raise payload
            source_syntax, sop_instance_uid, forwarded, length = payload
            data: bytes | bytearray | memoryview
            if output is None:
                data = _read_exactly(self._outbox.fileno(), length)
            else:  # in the output's memory file, or the file itself when passed on unchanged
                data = (
                    sent
                    if forwarded
                    else memfile.view_of(output, length, writable=False, owned=True)
                )
        except (EOFError, OSError):
            # OSError also when close() shut the pipe under us at shutdown.
            if stop.is_set():
                raise Interrupted("shutting down") from None
            raise _WorkerDied(culprit=True) from None
        return Transcoded(data, source_syntax, sop_instance_uid, forwarded)

    def _break(self) -> None:
        with self._turn:
            self.broken = True
            self._turn.notify_all()

    def kill(self) -> None:
        """End the process and close its pipes and stderr; once, however often it is called
        (closing a descriptor twice could close a file that took its number meanwhile)."""
        self._break()
        with self._kill_lock:
            if self._killed:
                return
            self._killed = True
            for conn in (self._inbox, self._outbox):
                conn.close()
            self._files.close()
            self.process.kill()
            self.process.join(timeout=5)
            self.process.close()
            with contextlib.suppress(OSError):
                end = os.fstat(self._stderr).st_size
                tail = os.pread(self._stderr, _STDERR_KEPT, max(0, end - _STDERR_KEPT))
                self.last_words = tail.decode("utf-8", "replace")
            os.close(self._stderr)

    def crash(self) -> str | None:
        """Once killed: how a decoder crashed this process, if one did (None otherwise)."""
        code = self.process.exitcode
        if code is None or code >= 0 or -code not in _CRASH_SIGNALS:
            return None
        steps = [line for line in self.last_words.splitlines() if line.startswith(DECODER_STEP)]
        if not steps:
            return None  # it died elsewhere: an instance queued behind may not be to blame
        said = [
            line.strip()
            for line in self.last_words.split(steps[-1], 1)[1].splitlines()
            if line.strip() and not line.startswith(DECODER_STEP)
        ]
        where = steps[-1][len(DECODER_STEP) :].strip()
        return f"the decoder {where} crashed its process ({signal.Signals(-code).name})" + (
            f": {said[0]}" if said else ""
        )

    def death(self) -> str:
        """Once killed: its exit code and, for a crash, where it happened."""
        crash = self.crash()
        return f"exit code {self.process.exitcode}" + (f"; {crash}" if crash else "")


def _memory_file() -> int:
    """A file descriptor of a new, empty file that lives in memory."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("orthanc-bridge-decoder-stderr")
    import tempfile  # not Linux

    with tempfile.TemporaryFile() as file:
        return os.dup(file.fileno())


def _latest(worker: _Worker) -> _Worker:
    """The worker that took over from `worker`, through any number of replacements."""
    while worker.successor is not None:
        worker = worker.successor
    return worker


def _read_exactly(fd: int, length: int) -> bytearray:
    """The `length` raw bytes that follow an answer's header, read straight into place."""
    data = bytearray(length)
    view = memoryview(data)
    while view:
        count = os.readv(fd, [view])
        if not count:
            raise EOFError("the decoding process closed its pipe mid-answer")
        view = view[count:]
    return data


class DecoderPool:
    """`workers` decoding processes; `decode` queues in the least busy one, honouring `stop`.

    Each worker takes up to DEPTH instances: the next waits in its pipe while it decodes the
    current one and is read the moment it is done, instead of after a round trip through the
    bridge's threads (measured: each worker idle 6% of the time with one place, 1% with two).
    """

    def __init__(self, workers: int, options: TranscodeOptions, stop: threading.Event) -> None:
        self._options = options
        self._stop = stop
        self._changed = threading.Condition()
        self._closed = False
        self.restarts = 0  # processes replaced after dying or taking too long
        # Instances sent to each live worker and not yet answered. Started now, while the
        # feed's first page is being read, not on the first instance.
        self._load = {_Worker(options): 0 for _ in range(workers)}

    def decode(self, data: bytes | memoryview) -> Transcoded:
        """Transcode in a worker process; if it dies while on this instance, try once more.

        A worker that spends longer than the instance's time allowance on it is replaced, and
        the instance fails.
        """
        options = self._options
        seconds = time_allowance(data, options.decode_timeout, options.max_decoded_bytes)
        worker = self._borrow()
        deaths = losses = 0
        try:
            while True:
                try:
                    return worker.transcode(data, self._stop, seconds)
                except _TimedOut as late:
                    worker = self._current(worker, f"{late} on one instance")
                    raise DecodeError(
                        f"{late}; its decoding process was stopped and replaced"
                    ) from None
                except _WorkerDied as died:
                    dead, worker = worker, self._current(worker)
                    crash = died.culprit and dead.crash()
                    if crash:
                        # A decoder crashed on this input, and would again: fail it now.
                        raise DecodeError(crash) from None
                    deaths += died.culprit
                    losses += 1
                    if deaths == 2:
                        raise DecodeError(
                            "the decoding process died twice on this instance (crash or memory)"
                        ) from None
                    if losses == _MAX_LOSSES:
                        # Workers that die before answering anything (no process can be
                        # started, a broken zygote): give up rather than loop.
                        raise DecodeError(
                            f"{losses} decoding processes in a row ended before answering"
                        ) from None
        finally:
            with self._changed:
                worker = _latest(worker)  # it may have been taken over while this call left
                if worker in self._load:
                    self._load[worker] -= 1
                self._changed.notify()

    def _borrow(self) -> _Worker:
        with self._changed:
            while True:
                if self._stop.is_set() or self._closed:
                    raise Interrupted("shutting down")
                worker = min(self._load, key=self._load.__getitem__)
                if self._load[worker] < DEPTH:
                    self._load[worker] += 1
                    return worker
                self._changed.wait(_POLL_SECONDS)

    def _current(self, worker: _Worker, why: str | None = None) -> _Worker:
        """The live worker that took over from `worker`: itself, or a new one if it broke
        (stopped `why`, or found dead).

        The old process is killed and the new one forked outside the pool's lock (a kill
        waits up to 5 s for the process to end): the other callers borrow, decode and return
        workers meanwhile, and those of the same worker wait for its successor. A fork that
        fails leaves the broken worker to the next caller, who tries again.
        """
        with self._changed:
            while True:
                worker = _latest(worker)
                if not worker.broken:
                    return worker
                if self._closed or self._stop.is_set():
                    raise Interrupted("shutting down")
                if not worker.replacing:
                    break
                self._changed.wait(_POLL_SECONDS)  # another caller is replacing it
            worker.replacing = True
        try:
            worker.kill()
            if why:
                log.warning("a decoding process was stopped: %s; starting a new one", why)
            else:
                log.warning("a decoding process died (%s); starting a new one", worker.death())
            successor = _Worker(self._options)
        except OSError as exc:
            log.error("cannot start a decoding process: %s", exc)
            with self._changed:
                worker.replacing = False
                self._changed.notify_all()
            return worker  # still broken: its caller counts a loss and tries again
        except BaseException:
            with self._changed:
                worker.replacing = False
                self._changed.notify_all()
            raise
        with self._changed:
            self.restarts += 1
            metrics.DECODER_RESTARTS.inc()
            worker.successor = successor
            # Its callers move to the successor with their instances.
            self._load[successor] = self._load.pop(worker)
            self._changed.notify_all()
            closed = self._closed
        if closed:  # closed while it was forked: close() did not see it
            successor.kill()
            raise Interrupted("shutting down")
        return successor

    def alive(self) -> int:
        """How many decoding processes are in service (a death is noticed at its next use)."""
        with self._changed:
            return 0 if self._closed else sum(not w.broken for w in self._load)

    def pids(self) -> list[int]:
        """The process IDs of the live workers."""
        with self._changed:
            return [w.process.pid for w in self._load if w.process.pid is not None]

    def close(self) -> None:
        """Stop at once, killing decodes still running (their instances are redone)."""
        with self._changed:
            self._closed = True
            workers = list(self._load)
            self._changed.notify_all()
        for worker in workers:
            worker.kill()
