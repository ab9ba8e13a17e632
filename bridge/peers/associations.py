"""A pool of kept-open associations with one DICOM node, shared by threads (bridge.peers.dimse).

Each association serves one thread at a time, the most recently used first, so that a trickle
of instances keeps one open and the rest age out after `idle_timeout`: pynetdicom polls every
millisecond in two threads per association, 7% of a core for each one kept open doing nothing.
Each association proposes one presentation context per (abstract syntax, transfer syntax) that
the pool was asked for so far, at most 128 (the oldest go first); an exchange needing one that
no free association proposed opens a new association, which proposes them all. A node that
leaves a second association request unanswered while one is open (storescp without --fork)
makes the pool use only as many as were open then.

Failures become bridge.errors: an association the node rejects for good, AssociationRejected
(fatal, as refused credentials are); one it cannot be reached for, does not answer, aborts or
rejects for now, DicomUnavailable (retried).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.presentation import build_context

from bridge.errors import (
    AssociationRejected,
    BridgeError,
    DicomUnavailable,
    Interrupted,
    one_line,
)

log = logging.getLogger(__name__)

# At INFO pynetdicom logs every association, and its ERROR lines repeat what the errors raised
# here say, some with a traceback. Left alone if someone set a level on purpose; otherwise its
# handlers that describe every PDU and message for those logs are not even bound.
if logging.getLogger("pynetdicom").level == logging.NOTSET:
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    _config.LOG_HANDLER_LEVEL = "none"

MAX_CONTEXTS = 128  # per association: odd context IDs 1 to 255 (PS3.8 9.3.2.2)
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only

Pair = tuple[str, str]  # (abstract syntax, transfer syntax): one proposed presentation context
T = TypeVar("T")


@dataclass(eq=False)
class Link:
    """One association, and what its presentation contexts came to."""

    assoc: Association
    accepted: dict[Pair, int]  # context ID of each accepted pair
    refused: dict[Pair, str]  # why each other proposed pair was refused
    idle_since: float = field(default_factory=time.monotonic)
    uses: int = 0
    msg_id: int = 0

    def covers(self, needs: Sequence[Pair]) -> bool:
        """Whether it proposed every pair of `needs` (accepted or not)."""
        return all(pair in self.accepted or pair in self.refused for pair in needs)

    def next_id(self) -> int:
        """A Message ID for the next request on this association."""
        self.msg_id = self.msg_id % 0xFFFF + 1
        return self.msg_id


class _Busy(DicomUnavailable):
    """The node left an association request unanswered, or rejected it for a local limit."""


class Broken(Exception):
    """Raised by an exchange whose association failed (no answer, aborted): it is dropped."""

    def __init__(self, reason: str, timed_out: bool) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class AssociationPool:
    """Kept-open associations with one node, for any number of threads."""

    def __init__(
        self,
        host: str,
        port: int,
        ae_title: str,
        *,
        calling_ae_title: str,
        timeout: float,
        idle_timeout: float,
        size: int,
        always: Sequence[Pair],
        handlers: Sequence[EventHandlerType] = (),
    ) -> None:
        self.host, self.port, self.ae_title = host, port, ae_title
        self.peer = f"{ae_title}@{host}:{port}"
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self._ae = AE(ae_title=calling_ae_title)
        self._ae.acse_timeout = self._ae.dimse_timeout = timeout
        self._ae.connection_timeout = timeout
        self._ae.network_timeout = None  # idle associations are released here, see _reap
        self._handlers = list(handlers)
        self._limit = max(1, size)
        self._cond = threading.Condition()
        self._idle: list[Link] = []  # most recently used last
        self._open = 0  # associations open or being opened, idle or not
        self._opening = 0  # of which being opened
        self._closed = False
        self._closing = threading.Event()  # wakes the reaper
        self._always = list(always)  # proposed on every association
        self._wanted: dict[Pair, None] = {}  # by last use, oldest first
        self._reaper = threading.Thread(target=self._reap_while_open, daemon=True)
        self._reaper.name = f"dimse-reaper-{self.peer}"
        self._reaper.start()

    def run(self, needs: Sequence[Pair], action: Callable[[Link], T], touch: bool = True) -> T:
        """`action` on an association that proposed `needs`; once more on a fresh one when a
        reused association turns out broken (the node may have closed it meanwhile).

        Broken becomes DicomUnavailable. Unless `touch`, the exchange does not count as a use
        (C-ECHO: the status checks every few seconds would keep an idle association open).
        """
        for attempt in (1, 2):
            link = self._checkout(needs)
            reused = link.uses > 0
            try:
                result = action(link)
            except Broken as exc:
                self._checkin(link, broken=True)
                if attempt == 1 and reused and not exc.timed_out:
                    log.debug(
                        "%s: kept-open association failed (%s), opening another", self.peer, exc
                    )
                    continue
                raise DicomUnavailable(f"{self.peer}: {exc}") from None
            except BaseException as exc:
                # One of ours (a refused context, a missing report) leaves the association as
                # it was; anything else may have left it in the middle of an exchange.
                self._checkin(link, broken=not isinstance(exc, BridgeError))
                raise
            if touch:
                link.uses += 1
                link.idle_since = time.monotonic()
            self._checkin(link, keep=touch or reused)
            return result
        raise AssertionError("unreachable")

    @property
    def saturated(self) -> bool:
        """Whether every association it may open is open and in use."""
        with self._cond:
            return self._open - self._opening >= self._limit and not self._idle

    def close(self) -> None:
        """Release every association (those in use once they are done)."""
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

    def _checkout(self, needs: Sequence[Pair]) -> Link:
        """An association of this thread's own that proposed every pair of `needs`."""
        deadline = time.monotonic() + self.timeout
        while True:
            stale: list[Link] = []
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
                    self._cond.notify_all()
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
        self, needs: Sequence[Pair], stale: list[Link], deadline: float
    ) -> tuple[Link | None, list[Pair]]:
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

    def _checkin(self, link: Link, broken: bool = False, keep: bool = True) -> None:
        """Give an association back: kept for the next use, or closed."""
        with self._cond:
            keep = keep and not broken and not self._closed and link.assoc.is_established
            if keep:
                self._idle.append(link)
            else:
                self._open -= 1
            self._cond.notify_all()
        if not keep:
            _release(link, abort=broken)

    def _associate(self, pairs: list[Pair]) -> Link:
        """Open an association proposing `pairs` (one context each, in that order)."""
        connected = threading.Event()

        def on_connect(event: Event) -> None:
            connected.set()

        started = time.monotonic()
        try:
            assoc = self._ae.associate(
                self.host,
                self.port,
                contexts=[build_context(abstract, syntax) for abstract, syntax in pairs],
                ae_title=self.ae_title,
                evt_handlers=[
                    *self._handlers,
                    (evt.EVT_CONN_OPEN, on_connect),
                    (evt.EVT_DATA_SENT, ack_at_once),
                ],
            )
        except OSError as exc:  # the host name does not resolve
            raise DicomUnavailable(f"cannot connect to {self.peer}: {_reason(exc)}") from None
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

    def _link(self, assoc: Association, pairs: list[Pair]) -> Link:
        sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        if sock is not None:
            # A command and its dataset go as separate small writes: without this, Nagle's
            # algorithm holds the second until the peer's delayed ACK (40 ms per N-ACTION).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # pynetdicom leaves the socket blocking once connected: a node that stops reading
            # would hang a send (and with it the abort after a DIMSE timeout) for ever.
            sock.settimeout(self.timeout)
        _leave_answers_to_askers(assoc)
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
        return Link(assoc, accepted, refused)

    def _why_unreachable(self) -> str:
        """The operating system's reason for a failed connection (pynetdicom only logs it)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=min(self.timeout, 5)):
                return "the connection failed"
        except OSError as exc:
            return _reason(exc)

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


def ack_at_once(event: Event) -> None:
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


def _leave_answers_to_askers(assoc: Association) -> None:
    """Keep the association's reactor thread from taking the answer a send_*() waits for.

    pynetdicom pauses that thread around each send_*() with a flag it checks before it acts:
    when the GIL hands over between the two, the thread takes the answer from the queue, drops
    it as "unexpected", and the C-STORE waits out its DIMSE timeout (with 8 threads on 2
    cores, about one run of 150 instances in three). The reactor reads the queue without
    blocking and the send_*() methods block: the former now gets requests only (a report on
    the same association, a C-ECHO from the node), never an answer.
    """
    dimse = assoc.dimse
    take = dimse.get_msg

    def get_msg(block: bool = False) -> tuple[int | None, Any]:
        if not block:
            _, first = dimse.peek_msg()
            if first is not None and not first.is_valid_request:
                return None, None
        return take(block)

    setattr(dimse, "get_msg", get_msg)  # noqa: B010 (mypy refuses assigning to a method)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _release(link: Link, abort: bool = False) -> None:
    """End an association politely (A-RELEASE), or abort one that is broken."""
    try:
        if abort or not link.assoc.is_established:
            link.assoc.abort()
        else:
            link.assoc.release()
    except Exception as exc:  # already gone: nothing left to end
        log.debug("ending an association: %s", one_line(exc))
