"""A DICOM node as a target: C-STORE, verified by status or by storage commitment, and C-ECHO
to tell that it is up.

Only what configures a `dicom` target imports this module (and with it pydicom and pynetdicom),
lazily: the main process of an Orthanc-only bridge never loads them.

Associations are kept open and shared by the transfer threads (bridge.peers.associations). Each
instance needs a presentation context for its SOP class in its transfer syntax; what the node
answered on the association used is final: Explicit VR Little Endian refused but Implicit
accepted, and the instance is rewritten (bridge.dicom.implicit) and sent Implicit; a forwarded
original is sent in its own syntax or not at all.

The bytes sent are the file's own, not a re-encoding: pynetdicom streams a dataset from a file
path as it is, and the path is that of an in-memory file (memfd), so nothing touches the disk.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import _config
from pynetdicom.status import (
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

# The kinds of verification and the default AE title are the configuration's, named once.
from bridge.config import COMMITMENT, DEFAULT_CALLING_AE_TITLE, STATUS, DicomNodeConfig
from bridge.dicom.header import MetaUIDs, meta_uids
from bridge.dicom.implicit import to_implicit
from bridge.errors import (
    BridgeError,
    ConfigError,
    DicomUnavailable,
    Interrupted,
    NotCommitted,
    StoreFailed,
    TransientError,
    VerificationFailed,
    one_line,
)
from bridge.peers import commitment
from bridge.peers.associations import AssociationPool, Broken, Link, Pair
from bridge.peers.peer import Answers
from bridge.peers.retry import RetryPolicy
from bridge.uids import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN

log = logging.getLogger(__name__)

# Given a file path, send_c_store streams the encoded dataset after the file meta in PDU-sized
# chunks instead of decoding it with pydicom and encoding it again. Process-wide; only this
# module sends C-STOREs.
_config.STORE_SEND_CHUNKED_DATASET = True

VERIFICATION = "1.2.840.10008.1.1"
_ECHO: Pair = (VERIFICATION, IMPLICIT_VR_LITTLE_ENDIAN)
_COMMIT: Pair = (commitment.PUSH_MODEL, IMPLICIT_VR_LITTLE_ENDIAN)


@dataclass(frozen=True)
class Stored:
    """What a node answered for one instance."""

    sop_class: str
    sop_instance: str
    syntax: str  # the transfer syntax sent (Implicit VR when the node takes nothing else)
    status: int  # the C-STORE status: 0, or a warning (still stored)
    warning: str | None = None  # e.g. "0xB000 (Coercion of Data Elements)"
    committed: bool = False  # confirmed by a storage commitment report


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
        self.peer = f"{ae_title}@{host}:{port}"
        self.verify = verify
        self.timeout = timeout
        self.commitment_timeout = commitment_timeout
        self.problem: str | None = None  # why the last echo failed
        self._stop = stop or threading.Event()
        self._told_implicit = False
        self._lock = threading.Lock()
        self._listening = commitment_port is not None and verify == COMMITMENT
        self._commitment_address = (commitment_host, commitment_port or 0)
        if self._listening:
            commitment.listen(*self._commitment_address, calling_ae_title)
        self._group = commitment.GroupCommit(self._commit)
        self._pool = AssociationPool(
            host,
            port,
            ae_title,
            calling_ae_title=calling_ae_title,
            timeout=timeout,
            idle_timeout=idle_timeout,
            size=associations,
            always=[_ECHO, _COMMIT] if verify == COMMITMENT else [_ECHO],
            handlers=commitment.HANDLERS,  # a report may come on the association itself
        )

    def __repr__(self) -> str:
        return f"DicomNode({self.peer})"

    def __enter__(self) -> DicomNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The operations ---------------------------------------------------------------------------

    def store(self, data: bytes | bytearray | memoryview, *, forward: bool = False) -> Stored:
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
        stored = self._pool.run(needs, lambda link: self._c_store(link, meta, data, forward))
        if self.verify == COMMITMENT:
            reason = self._group.commit((stored.sop_class, stored.sop_instance))
            if reason is not None:
                raise VerificationFailed(f"{self.peer}: {reason}")
            stored = replace(stored, committed=True)
        return stored

    def commit(self, stored: Sequence[Stored]) -> dict[str, str | None]:
        """Storage commitment for stored instances: by SOP Instance UID, None when committed,
        else why not. NotCommitted when the report does not come by the deadline."""
        if self.verify != COMMITMENT:
            raise ConfigError(f"{self.peer}: commit() needs verify: {COMMITMENT}")
        return self._commit([(s.sop_class, s.sop_instance) for s in stored])

    def _commit(self, instances: list[commitment.Reference]) -> dict[str, str | None]:
        transaction = commitment.begin(instances)
        try:
            self._pool.run([_COMMIT], lambda link: self._ask(link, transaction))
            return commitment.outcome(transaction)
        finally:
            commitment.end(transaction)

    def echo(self) -> bool:
        """Whether the node answers a C-ECHO; `problem` says why not when it does not."""
        if self._pool.saturated:
            # Every association is busy storing: the node is up, and a C-ECHO would wait for
            # one of them to be free.
            self.problem = None
            return True
        try:
            status = self._pool.run([_ECHO], self._c_echo, touch=False)
        except BridgeError as exc:
            self.problem = one_line(exc)
            return False
        self.problem = None if status == 0 else f"C-ECHO status 0x{status:04X}"
        return self.problem is None

    def close(self) -> None:
        """Release every association (those in use once they are done) and stop listening."""
        self._pool.close()
        with self._lock:
            listening, self._listening = self._listening, False
        if listening:
            commitment.unlisten(*self._commitment_address)

    # The exchanges -----------------------------------------------------------------------------

    def _c_store(
        self, link: Link, meta: MetaUIDs, data: bytes | bytearray | memoryview, forward: bool
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
                raise Broken(str(exc), timed_out=False) from None
        finally:
            os.close(fd)
        code = self._status_of(status, "C-STORE", started)
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

    def _syntax_for(self, link: Link, meta: MetaUIDs, forward: bool) -> str:
        """The transfer syntax to send in: the file's own if accepted, else Implicit VR."""
        own = (meta.sop_class, meta.transfer_syntax)
        if own in link.accepted:
            return meta.transfer_syntax
        implicit = (meta.sop_class, IMPLICIT_VR_LITTLE_ENDIAN)
        if meta.transfer_syntax == EXPLICIT_VR_LITTLE_ENDIAN and not forward:
            if implicit in link.accepted:
                with self._lock:
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

    def _ask(self, link: Link, transaction: commitment.Transaction) -> None:
        """Send the N-ACTION and wait for its report (NotCommitted at the deadline).

        The association stays checked out meanwhile: a report on it must not arrive while
        another thread waits there for a C-STORE response.
        """
        if _COMMIT not in link.accepted:
            raise VerificationFailed(
                f"{self.peer} takes no storage commitment requests ({link.refused.get(_COMMIT)})"
            )
        started = time.monotonic()
        status = commitment.send(link.assoc, transaction, link.next_id())
        code = self._status_of(status, "N-ACTION", started)
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

    def _c_echo(self, link: Link) -> int:
        started = time.monotonic()
        status = link.assoc.send_c_echo(msg_id=link.next_id())
        return self._status_of(status, "C-ECHO", started)

    def _status_of(self, status: Dataset, what: str, started: float) -> int:
        """The Status of a response; Broken when none came (pynetdicom then aborted)."""
        if "Status" in status:
            return int(status.Status)
        if time.monotonic() - started >= self.timeout * 0.9:
            raise Broken(f"no answer to {what} within {self.timeout:g} s", timed_out=True)
        raise Broken(f"the association was aborted or closed during {what}", timed_out=False)


def _name(uid: str) -> str:
    """A UID with its name when pydicom knows it: `CT Image Storage (1.2.840...)`."""
    name = UID(uid).name
    return uid if name == uid else f"{name} ({uid})"


def _comment(status: Dataset) -> str:
    comment = status.get("ErrorComment")
    return f": {comment}" if comment else ""


class DicomPeer(Answers):
    """A dicom target's node as the transfers and the watchers use it: C-STORE retried by the
    declared policy, up when C-ECHO answers, its latest answer and failure noted as every
    server's are (bridge.peers.peer.Peer)."""

    what = "DICOM node"

    def __init__(
        self, config: DicomNodeConfig, role: str, retry: RetryPolicy, listen: bool
    ) -> None:
        super().__init__(role)
        self.retry = retry
        self.config = config
        # Only a bridge that transfers listens for commitment reports: `status` echoes alone,
        # beside a running bridge that holds the port.
        self.node = DicomNode(
            config.host,
            config.port,
            config.ae_title,
            calling_ae_title=config.calling_ae_title,
            timeout=config.timeout,
            # Kept open while instances keep coming; released after a 2 s gap, so that a node
            # serving one association at a time (storescp) never holds a second one back for
            # long, and an idle association's polling (7% of a core) stops soon.
            idle_timeout=2.0,
            verify=config.verify,
            commitment_port=config.commitment_port if listen else None,
            commitment_timeout=config.commitment_timeout,
            stop=retry.stop,
        )

    @property
    def address(self) -> str:
        return self.node.peer

    def store(self, data: bytes | bytearray | memoryview, forward: bool) -> str | None:
        """C-STORE one file (and commit it with verify: commitment); its warning, if any."""

        def attempt() -> Stored:
            try:
                stored = self.node.store(data, forward=forward)
            except TransientError as exc:
                self._failed(exc)
                raise
            self._answered()
            return stored

        return self.retry.call(attempt, self.role).warning

    def probe(self) -> None:
        if self.node.echo():
            self._answered()
            return
        error = DicomUnavailable(f"{self.role} DICOM node {self.address}: {self.node.problem}")
        self._failed(error)
        raise error

    def keep_connections(self, count: int) -> None:
        """Nothing to do: the node's associations are a pool of their own."""

    def close(self) -> None:
        self.node.close()
