"""The decoding processes' parent: it imports the decoders once, then forks each worker from there.

multiprocessing's forkserver does the same from a new interpreter, which reached its first import
0.10-0.15 s after the bridge started (an interpreter's start, multiprocessing's imports, and its
resource tracker, a third interpreter, on the same two cores). This parent is forked from the
bridge itself, before the bridge has imported anything of its own or started a thread, and
starts importing at once. When the caller already runs threads (tests, another program using
the pool) a fork is not safe, and it is a new interpreter instead.

The bridge talks to it over a socket: one message per worker, the worker's pipes attached. For
each worker the bridge keeps a socket of its own on which the parent writes the worker's process
ID, and its exit code once the worker has ended (multiprocessing's forkserver works the same
way). The parent ends when the bridge closes its socket or dies; a worker, when its pipes close.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bridge.errors import one_line

if TYPE_CHECKING:
    import subprocess

# What every worker needs imported: the transcoder (see bridge/decoding/preload.py).
PRELOAD = "bridge.decoding.preload"

_PID = struct.Struct("=q")
_CODE = struct.Struct("=i")
_MAX_MESSAGE = 64 * 1024
_MAX_FDS = 16
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


class Child:
    """A process the parent forked: its ID, and its exit code once it ended."""

    def __init__(self, status: socket.socket) -> None:
        self._status = status
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._pid_read = False
        self.exitcode: int | None = None

    @property
    def pid(self) -> int | None:
        """The process ID, None if the parent ended before forking it (waits for the fork)."""
        with self._lock:
            if not self._pid_read:
                data = self._status.recv(_PID.size, socket.MSG_WAITALL)
                self._pid_read = True
                if len(data) == _PID.size:
                    (self._pid,) = _PID.unpack(data)
            return self._pid

    def join(self, timeout: float | None = None) -> None:
        """Wait up to `timeout` seconds for the process to end; `exitcode` is then set."""
        pid = self.pid
        with self._lock:
            if self.exitcode is not None or pid is None:
                return
            ready, _, _ = select.select([self._status], [], [], timeout)
            if not ready:
                return
            data = self._status.recv(_CODE.size, socket.MSG_WAITALL)
            if len(data) == _CODE.size:
                (self.exitcode,) = _CODE.unpack(data)
            elif not _exists(pid):  # the parent died before it could tell: ended, code unknown
                self.exitcode = -signal.SIGKILL

    def is_alive(self) -> bool:
        """True until the process has ended."""
        self.join(0)
        return self.pid is not None and self.exitcode is None

    def kill(self) -> None:
        """Send SIGKILL, unless it has already ended."""
        pid = self.pid
        if pid is not None and self.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        """Forget the process: its exit code will no longer be read."""
        self._status.close()


class Zygote:
    """A parent process that has run `preload` and forks workers on request."""

    def __init__(self, preload: str) -> None:
        self._lock = threading.Lock()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if threading.active_count() == 1:
            pid = os.fork()
            if pid == 0:  # the parent-to-be keeps only its socket and the standard streams
                keep = theirs.fileno()
                os.closerange(3, keep)
                os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
                _exit_after(_serve, theirs, preload)
            self._popen: subprocess.Popen[bytes] | None = None
            self._pid = pid
        else:
            import subprocess  # only here: 5 ms of the bridge's start-up

            code = f"import bridge.decoding.zygote as z; z.main({theirs.fileno()}, {preload!r})"
            self._popen = subprocess.Popen(
                [sys.executable, "-c", code], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL
            )
            self._pid = self._popen.pid
        theirs.close()
        self._socket = ours

    @property
    def pid(self) -> int:
        """The parent's process ID."""
        return self._pid

    @property
    def forked(self) -> bool:
        """True when forked from the caller, False when started as a new interpreter."""
        return self._popen is None

    def alive(self) -> bool:
        """False once the parent process has ended."""
        if self._popen is not None:
            return self._popen.poll() is None
        try:
            pid, _ = os.waitpid(self._pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0

    def fork(self, target: Callable[..., None], fds: list[int], *args: Any) -> Child:
        """A new process that runs `target(*fds, *args)` with copies of `fds`; returns at once."""
        message = pickle.dumps((target, args))
        ours, theirs = socket.socketpair()
        try:
            with self._lock:
                socket.send_fds(self._socket, [message], [theirs.fileno(), *fds])
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        return Child(ours)

    def close(self) -> None:
        """Let the parent end (its workers end when their pipes close)."""
        self._socket.close()
        if self._popen is not None:
            self._popen.wait()
        else:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._pid, 0)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only whether the process is there
    except ProcessLookupError:
        return False
    except PermissionError:  # there, but not ours
        pass
    return True


def _exit_after(body: Callable[..., None], *args: Any) -> None:
    """Run `body(*args)` in a forked process, then leave without the forking program's clean-up."""
    code = 0
    try:
        body(*args)
    except BaseException as exc:
        # Its stderr is the bridge's: one line there, as every error the bridge reports.
        print(f"orthanc-bridge: process {os.getpid()} failed: {one_line(exc)}", file=sys.stderr)
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(fd: int, preload: str) -> None:
    """The parent as a new interpreter, given its end of the socket."""
    _serve(socket.socket(fileno=fd), preload)


def _keep_freed_memory() -> None:
    """Keep freed memory for the next instance instead of giving it back to the kernel.

    glibc returns memory freed at the top of the heap above 128 KiB and maps big blocks afresh:
    every instance then page-faults its decoder's buffers in again. Keeping up to 32 MiB (one
    instance's buffers, many times over for a CT slice) made each decode 4% cheaper. Set here
    rather than through MALLOC_* variables, which glibc reads once, when the bridge started;
    a variable the user set still wins.
    """
    import ctypes  # here, not in the bridge, which never needs it

    keep = 32 * 1024 * 1024
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    for parameter, variable in (
        (_M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"),
        (_M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_"),
    ):
        if variable not in os.environ:
            mallopt(parameter, keep)


def _serve(requests: socket.socket, preload: str) -> None:
    """The parent's life: import, then fork a worker per request until the bridge goes."""
    # Ctrl-C reaches the whole process group, and a supervisor's SIGTERM may reach every
    # process of the bridge (systemd's KillMode=control-group, `kill -TERM -PGID`): only the
    # bridge decides how to stop. A decoding process that died of it first would look like a
    # crash, and be replaced while the bridge stops. Ignored here, so in every worker too;
    # they end when the bridge closes their pipes, or by its SIGKILL.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_IGN)
    # A fault handler the bridge's caller enabled (pytest does, on a copy of its stderr)
    # writes to a descriptor closed when this parent was forked, whose number a worker's pipe
    # may take: a crash would write its traceback there, into the answer the bridge reads.
    # Pointed at stderr, which is the worker's own (bridge.decoding reads it after a crash).
    if faulthandler.is_enabled():
        faulthandler.enable(sys.stderr)
    # numpy's OpenBLAS starts a spinning thread per core at import, and again in every forked
    # worker: CPU taken from decoding for nothing, since no BLAS routine is ever called and
    # the parallelism is the processes'. (0.15 s of CPU per import; the user's setting wins.)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    _keep_freed_memory()
    # A broken installation fails here: each worker then reports it for its instances.
    with contextlib.suppress(Exception):
        __import__(preload)
    # A signal interrupts select() through this pipe, so ended workers are reaped at once.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    statuses: dict[int, socket.socket] = {}
    while True:
        ready, _, _ = select.select([requests.fileno(), wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
            _reap(statuses)
        if requests.fileno() in ready:
            message, fds, _, _ = socket.recv_fds(requests, _MAX_MESSAGE, _MAX_FDS)
            if not message:
                return  # the bridge closed its end, or died
            status, *passed = fds
            try:
                pid = os.fork()
            except OSError:  # out of memory or processes: the bridge sees no worker, and no pid
                pid = -1
            if pid == 0:
                requests.close()
                for sock in statuses.values():
                    sock.close()
                for fd in (wake_r, wake_w, status):
                    os.close(fd)
                _exit_after(_run, message, passed)
            for fd in passed:
                os.close(fd)
            if pid < 0:
                os.close(status)
                continue
            statuses[pid] = socket.socket(fileno=status)
            with contextlib.suppress(OSError):  # the bridge gave the worker up already
                statuses[pid].sendall(_PID.pack(pid))


def _run(message: bytes, fds: list[int]) -> None:
    """A new worker: the parent's signal handling undone, then its target."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    target, args = pickle.loads(message)
    target(*fds, *args)


def _reap(statuses: dict[int, socket.socket]) -> None:
    """Tell the bridge the exit code of every worker that has ended."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock = statuses.pop(pid, None)
        if sock is not None:
            with contextlib.suppress(OSError):  # the bridge no longer listens
                sock.sendall(_CODE.pack(os.waitstatus_to_exitcode(status)))
            sock.close()


_shared: Zygote | None = None
_shared_lock = threading.Lock()


def start() -> Zygote:
    """The shared parent, started now unless it is running."""
    return _shared_zygote(restart=False)


def fork(target: Callable[..., None], fds: list[int], *args: Any) -> Child:
    """`Zygote.fork` in the shared parent, started again if it has died."""
    try:
        return _shared_zygote(restart=False).fork(target, fds, *args)
    except OSError:  # it died since it was last seen alive
        return _shared_zygote(restart=True).fork(target, fds, *args)


def _shared_zygote(restart: bool) -> Zygote:
    global _shared
    with _shared_lock:
        if _shared is None or restart or not _shared.alive():
            if _shared is not None:
                _shared.close()
            _shared = Zygote(PRELOAD)
        return _shared
