"""DICOM peers for tests/test_dimse.py besides storescp and Orthanc (tests/orthanc.py).

`SilentPeer` accepts TCP connections and never answers: a hung node. `ScriptedSCP` is a
pynetdicom storage SCP in this process whose C-STORE status a test chooses (the warnings and
failures storescp and Orthanc never send), that counts its associations, and that answers a
storage commitment request on the same association, as some archives do and Orthanc does not.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import N_ACTION_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

from tests.orthanc import free_ports

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
PUSH_MODEL = "1.2.840.10008.1.20.1"
PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"


class SilentPeer:
    """Accepts connections on a loopback port, reads nothing, answers nothing, until stopped."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", free_ports(1)[0]))
        self.port: int = self._server.getsockname()[1]
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # closed by stop()
                return
            self._held.append(conn)

    def stop(self) -> None:
        """Close the listening socket and every connection it accepted."""
        self._server.close()
        for conn in self._held:
            conn.close()
        self._thread.join(timeout=5)


@dataclass
class ScriptedSCP:
    """A pynetdicom storage and storage commitment SCP whose answers the test sets."""

    ae_title: str = "SCRIPTED"
    status: int = 0x0000  # answered to every C-STORE
    port: int = field(default_factory=lambda: free_ports(1)[0])
    associations: int = 0
    stored: list[str] = field(default_factory=list)  # SOP Instance UIDs, in order
    # While clear, each C-STORE is answered only once it is set (a busy node).
    go_on: threading.Event = field(default_factory=threading.Event)
    _server: ThreadedAssociationServer | None = None
    _requests: dict[Association, Dataset] = field(default_factory=dict)

    def start(self) -> None:
        """Listen on `port`, in a background thread of this process."""
        self.go_on.set()
        ae = AE(ae_title=self.ae_title)
        for sop_class in (CT_IMAGE_STORAGE, MR_IMAGE_STORAGE, VERIFICATION, PUSH_MODEL):
            ae.add_supported_context(sop_class)
        handlers: list[EventHandlerType] = [
            (evt.EVT_ESTABLISHED, self._on_association),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_ACTION, self._on_commitment_request),
            (evt.EVT_DIMSE_SENT, self._after_sending),
        ]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def stop(self) -> None:
        """Stop listening and end its associations."""
        if self._server is not None:
            self._server.shutdown()

    def _on_association(self, event: Event) -> None:
        self.associations += 1

    def _on_store(self, event: Event) -> int:
        request = event.request
        assert isinstance(request, C_STORE)
        self.stored.append(str(request.AffectedSOPInstanceUID))
        self.go_on.wait(30)
        return self.status

    def _on_commitment_request(self, event: Event) -> tuple[int, None]:
        self._requests[event.assoc] = event.action_information
        return 0x0000, None

    def _after_sending(self, event: Event) -> None:
        # The report must follow the N-ACTION response, which is on its way only now.
        if isinstance(event.message, N_ACTION_RSP) and event.assoc in self._requests:
            request = self._requests.pop(event.assoc)
            threading.Thread(target=self._report, args=(event.assoc, request)).start()

    def _report(self, assoc: Association, request: Dataset) -> None:
        """Every instance this SCP stored is committed, any other fails (no such instance)."""
        report = Dataset()
        report.TransactionUID = request.TransactionUID
        report.ReferencedSOPSequence = []
        report.FailedSOPSequence = []
        for item in request.ReferencedSOPSequence:
            if item.ReferencedSOPInstanceUID in self.stored:
                report.ReferencedSOPSequence.append(item)
            else:
                item.FailureReason = 0x0112
                report.FailedSOPSequence.append(item)
        event_type = 2 if report.FailedSOPSequence else 1
        assoc.send_n_event_report(report, event_type, PUSH_MODEL, PUSH_MODEL_INSTANCE)
