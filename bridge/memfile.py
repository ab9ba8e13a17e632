"""Files in memory (Linux memfd) in which big instances cross to a decoding process and back.

A CT slice crosses the decoding process's pipe as bytes, both ways. A multi-frame instance of
hundreds of MB would then exist twice on each side: the downloaded file in the bridge and in the
decoding process, and the decoded copy in the decoding process and in the bridge again. From
`BIG` bytes on, the bridge downloads the file straight into a memory file instead, hands the
decoding process that file's descriptor (SCM_RIGHTS) with an empty one for the output, and
uploads from the output as the decoding process wrote it: each byte exists once, in pages that
both processes map, and nothing of it is copied through a pipe.

A file here is seen as a memoryview of its mapping (`view_of`), so that what reads bytes (the
header readers, the HTTP client's upload, a forwarded copy) takes it as it is; `descriptor`
finds the file behind such a view. The mapping, and the file with it, go when the last view
does: the bridge's own files (a download, an output once answered) are then emptied by a
thread of its own, as freeing 200 MB of a memory file's pages takes 35-60 ms that a transfer
would otherwise wait for, before its upload or its outcome.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import queue
import threading
import weakref
from typing import Protocol

MIB = 1024 * 1024
# From this size on a downloaded file goes into a memory file. Measured, one round trip
# through a decoding process of an uncompressed file (its output as large as itself), pipe
# against memory file: 0.5 MiB 2.5 / 3.0 ms, 8 MiB 18-21 / 22-27 ms, 12 MiB 68 / 40 ms,
# 32 MiB 128-201 / 83-86 ms (a memory file's pages are new each time; the pipe's buffers are
# reused until they outgrow what a process keeps). A compressed file's output is larger than
# itself, so the memory file wins sooner: 8 MiB of file.
BIG = 8 * MIB
# What is read from the socket at once while downloading.
CHUNK = MIB
SUPPORTED = hasattr(os, "memfd_create")


class _Readable(Protocol):
    def read(self, amt: int) -> bytes: ...


class Mapped(mmap.mmap):
    """A mapping of a memory file that keeps the file's descriptor, to hand it on."""

    descriptor: int


def create(name: str) -> int:
    """A new, empty memory file (closed on exec; its descriptor crosses only by SCM_RIGHTS)."""
    return os.memfd_create(f"orthanc-bridge-{name}", os.MFD_CLOEXEC)


def receive(body: _Readable, length: int) -> memoryview:
    """The `length` bytes of an HTTP body, read into a new memory file; a view of it."""
    fd = create("download")
    try:
        # Written with write(), not through the mapping: a page the kernel cannot give is
        # then an error here, never a SIGBUS.
        done = 0
        while done < length:
            chunk = body.read(min(CHUNK, length - done))
            if not chunk:  # an OSError, as the HTTP client's own for a dropped connection
                raise ConnectionError(f"the answer ended after {done} of {length} bytes")
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            done += len(chunk)
        return view_of(fd, length, writable=False, owned=True)
    finally:
        os.close(fd)


def view_of(fd: int, length: int, *, writable: bool, owned: bool = False) -> memoryview:
    """A view of the first `length` bytes of the memory file `fd` (which may be closed after:
    the view keeps its own descriptor of the file).

    `owned`: nobody needs the file once this view has gone (never so in a decoding process,
    whose files the bridge still reads): it is then emptied in the background.
    """
    if length == 0:
        return memoryview(b"") if not writable else memoryview(bytearray())
    access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
    try:
        mapping = Mapped(fd, length, access=access)
    except OSError as exc:
        if exc.errno == errno.ENOMEM:
            # Over the decoding process's address-space limit (bridge.decoding.limits): what any
            # other allocation there raises, and is reported as.
            raise MemoryError(str(exc)) from None
        raise
    mapping.descriptor = os.dup(fd)
    done = weakref.finalize(mapping, _give_back if owned else _close, mapping.descriptor)
    done.atexit = False  # at exit the kernel frees it all
    return memoryview(mapping)


def output(fd: int, length: int) -> memoryview:
    """The empty memory file `fd` made `length` bytes long, as a writable view.

    Its pages are taken as they are written, as a new bytearray's are: a file that declares
    more than it holds costs what it holds.
    """
    os.ftruncate(fd, length)
    return view_of(fd, length, writable=True)


def descriptor(data: object) -> int | None:
    """The memory file behind a view that `receive` or `view_of` made, else None."""
    if isinstance(data, memoryview) and isinstance(data.obj, Mapped):
        return data.obj.descriptor
    return None


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


_given_back: queue.SimpleQueue[int] | None = None
_given_back_lock = threading.Lock()


def _give_back(fd: int) -> None:
    """Empty and close a file nobody needs any more, in the background (see above)."""
    global _given_back
    with _given_back_lock:
        if _given_back is None:
            given: queue.SimpleQueue[int] = queue.SimpleQueue()
            try:
                threading.Thread(
                    target=_empty_all, args=(given,), name="memfile", daemon=True
                ).start()
            except RuntimeError:  # no thread can start: freed here, as any file is
                _empty(fd)
                return
            _given_back = given
    _given_back.put(fd)


def _empty_all(given: queue.SimpleQueue[int]) -> None:
    while True:
        _empty(given.get())


def _empty(fd: int) -> None:
    # Truncated first: the pages are freed here, whether or not the mapping's own teardown,
    # in the thread that dropped the view, has finished yet.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    _close(fd)
