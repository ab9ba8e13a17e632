"""A DICOM node as a target: C-STORE on kept-open associations, verified by status or storage
commitment, and C-ECHO to tell that it is up.

Only what configures a `dicom` target imports this module (and with it pydicom and pynetdicom),
lazily: the main process of an Orthanc-only bridge never loads them.

Associations are pooled per node and reused, one thread at a time each, the most recently used
first so that a trickle of instances keeps one open and the rest age out: pynetdicom polls
every millisecond in two threads per association, 7% of a core for each one kept open doing
nothing. Each association proposes one presentation context per (SOP class, transfer syntax)
the node was asked for so far, at most 128; an instance of a SOP class that the free
associations did not propose opens a new one that does. What the node answered there is final
for that association: Explicit VR Little Endian refused but Implicit accepted means the
instance is rewritten (bridge.implicit) and sent Implicit; a forwarded original is sent in its
own syntax or not at all.

The bytes sent are the file's own, not a re-encoding: pynetdicom streams a dataset from a file
path as it is, and the path is that of an in-memory file (memfd), so nothing touches the disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import build_context
from pynetdicom.status import (
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

from bridge import commitment
from bridge.config import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN
from bridge.errors import (
    AssociationRejected,
    BridgeError,
    ConfigError,
    DicomUnavailable,
    Interrupted,
    NotCommitted,
    StoreFailed,
    VerificationFailed,
    one_line,
)
from bridge.header import MetaUIDs, meta_uids
from bridge.implicit import to_implicit

log = logging.getLogger(__name__)

# Given a file path, send_c_store streams the encoded dataset after the file meta in PDU-sized
# chunks instead of decoding it with pydicom and encoding it again. Process-wide; only this
# module sends C-STOREs.
_config.STORE_SEND_CHUNKED_DATASET = True
# At INFO pynetdicom logs every association, and its ERROR lines repeat what the errors raised
# here say, some with a traceback. Left alone if someone set a level on purpose.
if logging.getLogger("pynetdicom").level == logging.NOTSET:
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)

DEFAULT_CALLING_AE_TITLE = "ORTHANC-BRIDGE"
VERIFICATION = "1.2.840.10008.1.1"
MAX_CONTEXTS = 128  # per association: odd context IDs 1 to 255 (PS3.8 9.3.2.2)
STATUS, COMMITMENT = "status", "commitment"
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only

Pair = tuple[str, str]  # (abstract syntax, transfer syntax): one proposed presentation context
_T = TypeVar("_T")


@dataclass(frozen=True)
class Stored:
    """What a node answered for one instance."""

    sop_class: str
    sop_instance: str
    syntax: str  # the transfer syntax sent (Implicit VR when the node takes nothing else)
    status: int  # the C-STORE status: 0, or a warning (still stored)
    warning: str | None = None  # e.g. "0xB000 (Coercion of Data Elements)"
    committed: bool = False  # confirmed by a storage commitment report


@dataclass(eq=False)
class _Link:
    """One association, and what its presentation contexts came to."""

    assoc: Association
    accepted: dict[Pair, int]  # context ID of each accepted pair
    refused: dict[Pair, str]  # why each other proposed pair was refused
    idle_since: float = field(default_factory=time.monotonic)
    uses: int = 0
    msg_id: int = 0

    def covers(self, needs: Sequence[Pair]) -> bool:
        return all(pair in self.accepted or pair in self.refused for pair in needs)

    def next_id(self) -> int:
        self.msg_id = self.msg_id % 0xFFFF + 1
        return self.msg_id


class _Busy(DicomUnavailable):
    """The node left an association request unanswered, or rejected it for a local limit."""


class _Broken(Exception):
    """The association failed during an exchange; it is dropped."""

    def __init__(self, reason: str, timed_out: bool) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class DicomNode:
    """A DICOM C-STORE target; thread-safe: transfer threads share one."""

    def __init__(
        self,
        host: str,
        port: int,
        ae_title: str,
        *,
        calling_ae_title: str = DEFAULT_CALLING_AE_TITLE,
        timeout: float = 30.0,
        idle_timeout: float = 10.0,
        associations: int = 4,
        verify: str = STATUS,
        commitment_port: int | None = None,
        commitment_host: str = "",
        commitment_timeout: float = 30.0,
        stop: threading.Event | None = None,
    ) -> None:
        if verify not in (STATUS, COMMITMENT):
            raise ConfigError(f"verify: {verify!r} is neither {STATUS!r} nor {COMMITMENT!r}")
        self.host, self.port, self.ae_title = host, port, ae_title
        self.peer = f"{ae_title}@{host}:{port}"
        self.verify = verify
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.commitment_timeout = commitment_timeout
        self.problem: str | None = None  # why the last echo failed
        self._stop = stop or threading.Event()
        self._ae = AE(ae_title=calling_ae_title)
        self._ae.acse_timeout = self._ae.dimse_timeout = timeout
        self._ae.connection_timeout = timeout
        self._ae.network_timeout = None  # idle associations are released here, see _reap
        self._limit = max(1, associations)
        self._cond = threading.Condition()
        self._idle: list[_Link] = []  # most recently used last
        self._open = 0  # associations open or being opened, idle or not
        self._opening = 0  # of which being opened
        self._closed = False
        self._closing = threading.Event()  # wakes the reaper
        self._told_implicit = False
        # Proposed on every association: C-ECHO, and the commitment requests.
        self._always: list[Pair] = [(VERIFICATION, IMPLICIT_VR_LITTLE_ENDIAN)]
        if verify == COMMITMENT:
            self._always.append((commitment.PUSH_MODEL, IMPLICIT_VR_LITTLE_ENDIAN))
        self._wanted: dict[Pair, None] = {}  # by last use, oldest first
        self._listening = commitment_port is not None and verify == COMMITMENT
        self._commitment_address = (commitment_host, commitment_port or 0)
        if self._listening:
            commitment.listen(*self._commitment_address, calling_ae_title)
        self._reaper = threading.Thread(target=self._reap_while_open, daemon=True)
        self._reaper.name = f"dimse-reaper-{self.peer}"
        self._reaper.start()

    def __repr__(self) -> str:
        return f"DicomNode({self.peer})"

    def __enter__(self) -> DicomNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The operations ---------------------------------------------------------------------------

    def store(self, data: bytes | bytearray, *, forward: bool = False) -> Stored:
        """C-STORE one Part-10 file (and commit it when `verify` is commitment).

        Explicit VR Little Endian goes Implicit when that is all the node takes for the SOP
        class, unless `forward`: a forwarded file is sent as it is or fails (StoreFailed).
        """
        meta = meta_uids(data)
        if meta is None:
            raise StoreFailed("not a DICOM file whose meta names its SOP class and instance")
        needs = [(meta.sop_class, meta.transfer_syntax)]
        if meta.transfer_syntax == EXPLICIT_VR_LITTLE_ENDIAN and not forward:
            needs.append((meta.sop_class, IMPLICIT_VR_LITTLE_ENDIAN))
        stored = self._exchange(needs, lambda link: self._c_store(link, meta, data, forward))
        if self.verify == COMMITMENT:
            reason = self.commit([stored])[stored.sop_instance]
            if reason is not None:
                raise VerificationFailed(f"{self.peer}: {reason}")
            stored = replace(stored, committed=True)
        return stored

    def commit(self, stored: Sequence[Stored]) -> dict[str, str | None]:
        """Storage commitment for stored instances: by SOP Instance UID, None when committed,
        else why not. NotCommitted when the report does not come by the deadline."""
        if self.verify != COMMITMENT:
            raise ConfigError(f"{self.peer}: commit() needs verify: {COMMITMENT}")
        transaction = commitment.begin([(s.sop_class, s.sop_instance) for s in stored])
        try:
            pair = (commitment.PUSH_MODEL, IMPLICIT_VR_LITTLE_ENDIAN)
            self._exchange([pair], lambda link: self._ask(link, pair, transaction))
            return commitment.outcome(transaction)
        finally:
            commitment.end(transaction)

    def echo(self) -> bool:
        """Whether the node answers a C-ECHO; `problem` says why not when it does not."""
        pair = (VERIFICATION, IMPLICIT_VR_LITTLE_ENDIAN)
        try:
            status = self._exchange([pair], self._c_echo, touch=False)
        except BridgeError as exc:
            self.problem = one_line(exc)
            return False
        self.problem = None if status == 0 else f"C-ECHO status 0x{status:04X}"
        return self.problem is None

    def close(self) -> None:
        """Release every association (those in use once they are done) and stop listening."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._closing.set()
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for link in idle:
            _release(link)
        if self._listening:
            commitment.unlisten(*self._commitment_address)

    # One exchange on a pooled association -----------------------------------------------------

    def _exchange(self, needs: list[Pair], action: Callable[[_Link], _T], touch: bool = True) -> _T:
        """Run `action` on an association covering `needs`; once more on a fresh one when a
        reused association turns out broken (the node may have closed it meanwhile)."""
        for attempt in (1, 2):
            link = self._checkout(needs)
            reused = link.uses > 0
            try:
                result = action(link)
            except _Broken as exc:
                self._checkin(link, broken=True)
                if attempt == 1 and reused and not exc.timed_out:
                    log.debug("%s: kept-open association failed (%s), opening another", self, exc)
                    continue
                raise DicomUnavailable(f"{self.peer}: {exc}") from None
            except BaseException:
                self._checkin(link, broken=not link.assoc.is_established)
                raise
            if touch:  # C-ECHO does not: the status checks would keep an idle one open
                link.uses += 1
                link.idle_since = time.monotonic()
            self._checkin(link, keep=touch or reused)
            return result
        raise AssertionError("unreachable")

    def _c_store(
        self, link: _Link, meta: MetaUIDs, data: bytes | bytearray, forward: bool
    ) -> Stored:
        syntax = self._syntax_for(link, meta, forward)
        payload = data if syntax == meta.transfer_syntax else to_implicit(data)
        fd = os.memfd_create("c-store", os.MFD_CLOEXEC)
        try:
            with open(fd, "wb", closefd=False) as file:
                file.write(payload)
            started = time.monotonic()
            try:
                status = link.assoc.send_c_store(f"/proc/self/fd/{fd}", msg_id=link.next_id())
            except RuntimeError as exc:  # no longer established: released by the node
                raise _Broken(str(exc), timed_out=False) from None
        finally:
            os.close(fd)
        code = self._status_of(link, status, "C-STORE", started)
        category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, (code_to_category(code), ""))
        said = f"0x{code:04X} ({meaning or category})" + _comment(status)
        if category == STATUS_SUCCESS:
            return Stored(meta.sop_class, meta.sop_instance, syntax, code)
        if category == STATUS_WARNING:
            log.warning("%s stored %s with warning %s", self.peer, meta.sop_instance, said)
            return Stored(meta.sop_class, meta.sop_instance, syntax, code, warning=said)
        if 0xA700 <= code <= 0xA7FF:
            raise DicomUnavailable(f"{self.peer} answered C-STORE with status {said}")
        raise StoreFailed(f"{self.peer} answered C-STORE with status {said}")

    def _syntax_for(self, link: _Link, meta: MetaUIDs, forward: bool) -> str:
        """The transfer syntax to send in: the file's own if accepted, else Implicit VR."""
        own = (meta.sop_class, meta.transfer_syntax)
        if own in link.accepted:
            return meta.transfer_syntax
        implicit = (meta.sop_class, IMPLICIT_VR_LITTLE_ENDIAN)
        if meta.transfer_syntax == EXPLICIT_VR_LITTLE_ENDIAN and not forward:
            if implicit in link.accepted:
                with self._cond:
                    told, self._told_implicit = self._told_implicit, True
                if not told:
                    log.info(
                        "%s takes %s in Implicit VR Little Endian only: sending it that way",
                        self.peer,
                        _name(meta.sop_class),
                    )
                return IMPLICIT_VR_LITTLE_ENDIAN
            raise StoreFailed(
                f"{self.peer} accepts {_name(meta.sop_class)} neither in Explicit nor in "
                f"Implicit VR Little Endian ({link.refused.get(own)})"
            )
        note = "; a forwarded instance is sent only as it is" if forward else ""
        raise StoreFailed(
            f"{self.peer} does not accept {_name(meta.sop_class)} in "
            f"{_name(meta.transfer_syntax)} ({link.refused.get(own)}){note}"
        )

    def _ask(self, link: _Link, pair: Pair, transaction: commitment.Transaction) -> None:
        """Send the N-ACTION and wait for its report (NotCommitted at the deadline).

        The association stays checked out meanwhile: a report on it must not arrive while
        another thread waits there for a C-STORE response.
        """
        if pair not in link.accepted:
            raise VerificationFailed(
                f"{self.peer} takes no storage commitment requests ({link.refused.get(pair)})"
            )
        started = time.monotonic()
        status = commitment.send(link.assoc, transaction, link.next_id())
        code = self._status_of(link, status, "N-ACTION", started)
        if code != 0:
            meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))[1]
            raise NotCommitted(
                f"{self.peer} answered the storage commitment request with status "
                f"0x{code:04X} ({meaning})"
            )
        deadline = time.monotonic() + self.commitment_timeout
        while not transaction.arrived.wait(min(0.25, max(0.0, deadline - time.monotonic()))):
            if self._stop.is_set():
                raise Interrupted("shutting down")
            if time.monotonic() >= deadline:
                raise NotCommitted(
                    f"{self.peer} sent no storage commitment report within "
                    f"{self.commitment_timeout:g} s (transaction {transaction.uid})"
                )

    def _c_echo(self, link: _Link) -> int:
        started = time.monotonic()
        status = link.assoc.send_c_echo(msg_id=link.next_id())
        return self._status_of(link, status, "C-ECHO", started)

    def _status_of(self, link: _Link, status: Dataset, what: str, started: float) -> int:
        """The Status of a response; _Broken when none came (pynetdicom then aborted)."""
        if "Status" in status:
            return int(status.Status)
        if time.monotonic() - started >= self.timeout * 0.9:
            raise _Broken(f"no answer to {what} within {self.timeout:g} s", timed_out=True)
        raise _Broken(f"the association was aborted or closed during {what}", timed_out=False)

    # The pool ---------------------------------------------------------------------------------

    def _checkout(self, needs: Sequence[Pair]) -> _Link:
        """An association of this thread's own that proposed every pair of `needs`."""
        deadline = time.monotonic() + self.timeout
        while True:
            stale: list[_Link] = []
            with self._cond:
                link, pairs = self._claim(needs, stale, deadline)
            for old in stale:
                _release(old)
            if link is not None:
                return link
            try:
                link = self._associate(pairs)
            except BaseException as exc:
                with self._cond:
                    self._open -= 1
                    self._opening -= 1
                    self._cond.notify()
                    established = self._open - self._opening
                    if not (isinstance(exc, _Busy) and established > 0):
                        raise
                    # A node that serves one association at a time (storescp without --fork)
                    # leaves the next request unanswered while another is open: wait for that
                    # one instead, from now on.
                    if established < self._limit:
                        log.warning(
                            "%s answered no new association while %d were open: using at most %d",
                            self.peer,
                            established,
                            established,
                        )
                        self._limit = established
                deadline = time.monotonic() + self.timeout
                continue
            with self._cond:
                self._opening -= 1
            return link

    def _claim(
        self, needs: Sequence[Pair], stale: list[_Link], deadline: float
    ) -> tuple[_Link | None, list[Pair]]:
        """Under the lock: an idle association that covers `needs`, or the pairs a new one
        must propose (counted as open already), after waiting for a free slot."""
        if self._closed:
            raise Interrupted(f"{self.peer}: closed")
        for pair in needs:
            self._wanted.pop(pair, None)
            self._wanted[pair] = None
        room = MAX_CONTEXTS - len(self._always)
        while len(self._wanted) > room:
            del self._wanted[next(iter(self._wanted))]
        while True:
            for link in reversed(self._idle):
                if link.covers(needs):
                    self._idle.remove(link)
                    if link.assoc.is_established:
                        return link, []
                    self._open -= 1  # released by the node while idle
                    stale.append(link)
                    break
            else:
                # None proposed a pair of `needs`: a new association proposes all they did,
                # and a node that takes one association at a time needs the idle ones gone.
                stale.extend(self._idle)
                self._open -= len(self._idle)
                self._idle.clear()
                if self._open < self._limit:
                    self._open += 1
                    self._opening += 1
                    return None, [*self._always, *self._wanted]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DicomUnavailable(
                        f"{self.peer}: all {self._limit} associations stayed busy for "
                        f"{self.timeout:g} s"
                    )
                self._cond.wait(left)
                if self._closed:
                    raise Interrupted(f"{self.peer}: closed")

    def _checkin(self, link: _Link, broken: bool = False, keep: bool = True) -> None:
        """Give an association back: kept for the next use, or closed."""
        with self._cond:
            keep = keep and not broken and not self._closed and link.assoc.is_established
            if keep:
                self._idle.append(link)
            else:
                self._open -= 1
            self._cond.notify()
        if not keep:
            _release(link, abort=broken)

    def _associate(self, pairs: list[Pair]) -> _Link:
        """Open an association proposing `pairs` (one context each, in that order)."""
        connected = threading.Event()

        def on_connect(event: Event) -> None:
            connected.set()

        started = time.monotonic()
        assoc = self._ae.associate(
            self.host,
            self.port,
            contexts=[build_context(abstract, syntax) for abstract, syntax in pairs],
            ae_title=self.ae_title,
            evt_handlers=[
                *commitment.HANDLERS,
                (evt.EVT_CONN_OPEN, on_connect),
                (evt.EVT_DATA_SENT, _ack_at_once),
            ],
        )
        if assoc.is_established:
            return self._link(assoc, pairs)
        if assoc.is_rejected:
            answer = assoc.acceptor.primitive
            assert answer is not None
            said = f"{answer.result_str}, {answer.source_str}: {answer.reason_str}"
            if answer.result == 2:  # rejected-transient: congestion, a limit reached
                raise _Busy(f"{self.peer} rejected the association for now ({said})")
            raise AssociationRejected(
                f"{self.peer} rejected the association ({said}); check its ae_title and that "
                f"it accepts the calling AE title {self._ae.ae_title}"
            )
        if not connected.is_set():
            raise DicomUnavailable(f"cannot connect to {self.peer}: {self._why_unreachable()}")
        if time.monotonic() - started >= self.timeout * 0.9:
            raise _Busy(
                f"{self.peer} accepted the connection but did not answer the association "
                f"request within {self.timeout:g} s"
            )
        raise DicomUnavailable(f"{self.peer} aborted or closed the association request")

    def _link(self, assoc: Association, pairs: list[Pair]) -> _Link:
        sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        if sock is not None:
            # A command and its dataset go as separate small writes: without this, Nagle's
            # algorithm holds the second until the peer's delayed ACK (40 ms per N-ACTION).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # pynetdicom leaves the socket blocking once connected: a node that stops reading
            # would hang a send (and with it the abort after a DIMSE timeout) for ever.
            sock.settimeout(self.timeout)
        accepted = {
            pairs[cx.context_id // 2]: cx.context_id
            for cx in assoc.accepted_contexts
            if cx.context_id is not None
        }
        refused = {
            pairs[cx.context_id // 2]: cx.status
            for cx in assoc.rejected_contexts
            if cx.context_id is not None
        }
        log.debug("%s: association with %d contexts accepted", self.peer, len(accepted))
        return _Link(assoc, accepted, refused)

    def _why_unreachable(self) -> str:
        """The operating system's reason for a failed connection (pynetdicom only logs it)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=min(self.timeout, 5)):
                return "the connection failed"
        except OSError as exc:
            return exc.strerror or str(exc) or type(exc).__name__

    def _reap_while_open(self) -> None:
        """Release the associations idle for `idle_timeout`, until close()."""
        while not self._closing.wait(max(self.idle_timeout / 2, 0.05)):
            with self._cond:
                now = time.monotonic()
                old = [link for link in self._idle if now - link.idle_since >= self.idle_timeout]
                self._idle = [link for link in self._idle if link not in old]
                self._open -= len(old)
            for link in old:
                _release(link)


def _ack_at_once(event: Event) -> None:
    """After each send: acknowledge the answer's first segment at once.

    DCMTK (storescp, Orthanc) leaves Nagle's algorithm on and writes a response in two parts:
    the second waits for the ACK of the first, which Linux delays up to 40 ms when it has
    nothing to send back. Every exchange took 45 ms instead of 3; TCP_NODELAY on this side does
    not help, and quick-ack mode lapses by itself, hence after every send.
    """
    sock = event.assoc.dul.socket
    if _QUICKACK is not None and sock is not None and sock.socket is not None:
        with contextlib.suppress(OSError):  # closing: no answer to acknowledge
            sock.socket.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


def _release(link: _Link, abort: bool = False) -> None:
    """End an association politely (A-RELEASE), or abort one that is broken."""
    try:
        if abort or not link.assoc.is_established:
            link.assoc.abort()
        else:
            link.assoc.release()
    except Exception as exc:  # already gone: nothing left to end
        log.debug("ending an association: %s", one_line(exc))


def _name(uid: str) -> str:
    """A UID with its name when pydicom knows it: `CT Image Storage (1.2.840...)`."""
    name = UID(uid).name
    return uid if name == uid else f"{name} ({uid})"


def _comment(status: Dataset) -> str:
    comment = status.get("ErrorComment")
    return f": {comment}" if comment else ""
