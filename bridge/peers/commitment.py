"""Storage Commitment (Push Model): proof that a DICOM node keeps what it was sent.

A C-STORE status says only that the node received an instance. The N-ACTION asks it to commit
to keeping a list of instances; its answer, an N-EVENT-REPORT naming each instance as committed
or failed, may come on the same association or on a new one that the node opens to the AE
title the bridge calls from (Orthanc does that, to the host and port its `DicomModalities`
names). Reports are matched to their request by Transaction UID, whichever way they come: one
table for the process, so that several targets may share one listening port.

Imported only with bridge.peers.dimse, when a `dicom` target is configured.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

from bridge.errors import BridgeError, ConfigError, readable
from bridge.peers.associations import ack_at_once

log = logging.getLogger(__name__)

PUSH_MODEL = "1.2.840.10008.1.20.1"
# The SOP Instance UID every N-ACTION of the Push Model addresses (PS3.4 J.3.5).
PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMITMENT = 1  # the Action Type ID

# Failure Reason (0008,1197) values of a Failed SOP Sequence item (PS3.4 J.3.2.1.1.1).
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class / instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}

Reference = tuple[str, str]  # (SOP class UID, SOP instance UID)


@dataclass(eq=False)
class Transaction:
    """One N-ACTION waiting for its report."""

    uid: str
    instances: tuple[Reference, ...]
    arrived: threading.Event = field(default_factory=threading.Event)
    report: Dataset | None = None


_lock = threading.Lock()
_waiting: dict[str, Transaction] = {}


def begin(instances: Sequence[Reference]) -> Transaction:
    """A new transaction for `instances`, registered so that its report finds it."""
    transaction = Transaction(generate_uid(prefix=None), tuple(instances))
    with _lock:
        _waiting[transaction.uid] = transaction
    return transaction


def end(transaction: Transaction) -> None:
    """Stop waiting for `transaction`'s report: one that comes later is acknowledged, unused."""
    with _lock:
        _waiting.pop(transaction.uid, None)


def request(transaction: Transaction) -> Dataset:
    """The N-ACTION's Action Information: the Transaction UID and Referenced SOP Sequence."""
    information = Dataset()
    information.TransactionUID = transaction.uid
    items = []
    for sop_class, sop_instance in transaction.instances:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    information.ReferencedSOPSequence = items
    return information


def send(assoc: Association, transaction: Transaction, msg_id: int) -> Dataset:
    """Send the N-ACTION on `assoc`; the status Dataset (empty when no answer came)."""
    status, _ = assoc.send_n_action(
        request(transaction), REQUEST_COMMITMENT, PUSH_MODEL, PUSH_MODEL_INSTANCE, msg_id
    )
    return status


def on_report(event: Event) -> tuple[int, None]:
    """The N-EVENT-REPORT handler, for the listener and for the bridge's own associations."""
    try:
        report = event.event_information
        uid = str(report.get("TransactionUID", ""))
    except Exception as exc:  # pydicom decodes lazily: any error of a bad dataset shows here
        log.warning("unreadable storage commitment report: %s", readable(str(exc)))
        return 0x0110, None  # Processing Failure
    with _lock:
        transaction = _waiting.pop(uid, None)
    if transaction is None:
        # Late (its deadline passed: the instances will be sent and committed again) or not
        # ours. Acknowledged all the same, or the node would keep sending it.
        log.info("storage commitment report for transaction %s, which nobody awaits", uid)
        return 0x0000, None
    transaction.report = report
    transaction.arrived.set()
    return 0x0000, None


HANDLERS: list[EventHandlerType] = [(evt.EVT_N_EVENT_REPORT, on_report)]


def outcome(transaction: Transaction) -> dict[str, str | None]:
    """Each instance's fate in the report by SOP Instance UID: None when committed, else why not.

    An instance the report does not name is not committed: deletion needs a positive proof.
    """
    report = transaction.report
    assert report is not None
    committed = {_reference(item) for item in report.get("ReferencedSOPSequence", [])}
    failed = {
        _reference(item): int(item.get("FailureReason", 0))
        for item in report.get("FailedSOPSequence", [])
    }
    result: dict[str, str | None] = {}
    for reference in transaction.instances:
        code = failed.get(reference)
        if code is not None:
            meaning = FAILURE_REASONS.get(code, "unknown reason")
            result[reference[1]] = f"not committed: failure reason 0x{code:04X} ({meaning})"
        elif reference in committed:
            result[reference[1]] = None
        else:
            result[reference[1]] = "not named in the storage commitment report"
    return result


def _reference(item: Dataset) -> Reference:
    return str(item.get("ReferencedSOPClassUID", "")), str(item.get("ReferencedSOPInstanceUID", ""))


# Grouping ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Batch:
    instances: list[Reference] = field(default_factory=list)
    ready: bool = False  # its turn: no more joins, one member sends it
    claimed: bool = False
    done: bool = False
    outcome: dict[str, str | None] = field(default_factory=dict)
    error: BaseException | None = None


class GroupCommit:
    """One N-ACTION for the instances of many threads: while one request waits for its report,
    the instances stored meanwhile gather into the next (per instance: 34 instances/s to
    Orthanc with 8 threads; Orthanc opens an association for each report)."""

    def __init__(self, commit: Callable[[list[Reference]], dict[str, str | None]]) -> None:
        self._commit = commit
        self._cond = threading.Condition()
        self._next: _Batch | None = None  # gathering
        self._busy = False  # a batch is being sent or waits for its report

    def commit(self, instance: Reference) -> str | None:
        """The instance's fate in its batch's report (as outcome() says), or the batch's error."""
        with self._cond:
            batch = self._next = self._next or _Batch()
            batch.instances.append(instance)
            if not self._busy:
                self._start(batch)
            while not batch.done and (not batch.ready or batch.claimed):
                self._cond.wait()
            sends = not batch.done
            batch.claimed = True
        if sends:
            self._send(batch)
        if batch.error is not None:
            raise _again(batch.error)
        return batch.outcome.get(instance[1], "not named in the storage commitment report")

    def _start(self, batch: _Batch) -> None:
        self._busy, self._next, batch.ready = True, None, True

    def _send(self, batch: _Batch) -> None:
        try:
            outcome, error = self._commit(batch.instances), None
        except BaseException as exc:  # every member gets it, whatever it is
            outcome, error = {}, exc
        with self._cond:
            batch.outcome, batch.error, batch.done = outcome, error, True
            if self._next is not None:
                self._start(self._next)
            else:
                self._busy = False
            self._cond.notify_all()


def _again(error: BaseException) -> BaseException:
    """`error` anew for another thread to raise (each class of ours takes one message)."""
    if isinstance(error, BridgeError):
        return type(error)(str(error))
    return error


# Listeners --------------------------------------------------------------------------------------

_servers: dict[tuple[str, int], tuple[ThreadedAssociationServer, int]] = {}


def listen(host: str, port: int, ae_title: str) -> None:
    """Receive reports on host:port (host "" for every interface); shared, counted per address."""
    with _lock:
        server, users = _servers.get((host, port), (None, 0))
        if server is None:
            ae = AE(ae_title=ae_title)
            ae.add_supported_context(PUSH_MODEL)
            try:
                # Acknowledging at once matters here too: Orthanc's report waited 40 ms for
                # the delayed ACK of its first half (bridge.peers.associations.ack_at_once).
                handlers = [*HANDLERS, (evt.EVT_DATA_SENT, ack_at_once)]
                server = ae.start_server((host, port), block=False, evt_handlers=handlers)
            except OSError as exc:
                raise ConfigError(
                    f"commitment_port {port}: cannot listen on it: {exc.strerror or exc}"
                ) from None
            assert server is not None
            log.info("listening for storage commitment reports on %s:%d", host or "*", port)
        _servers[(host, port)] = (server, users + 1)


def unlisten(host: str, port: int) -> None:
    """Undo one `listen`; the last one stops the server."""
    with _lock:
        server, users = _servers.pop((host, port), (None, 0))
        if server is not None and users > 1:
            _servers[(host, port)] = (server, users - 1)
            server = None
    if server is not None:
        server.shutdown()
