"""Where a copy goes: one class per kind of target, each storing a copy and proving it is kept.

`Transfer` (bridge.engine.transfer) decides what each target takes and hands it a `Copy`;
the destination stores it and, when asked to (before an original is deleted) or until the
target has shown that it keeps what it is sent, verifies it, raising VerificationFailed when
the copy is not there as sent. Each kind reads its own proof:

- orthanc: the REST API's answer, then the transfer syntax Orthanc says it holds;
- dicomweb: the STOW-RS answer per instance, then WADO-RS metadata;
- dicom: the C-STORE status, or a Storage Commitment report.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Protocol, cast

from bridge.config import DICOMWEB, DicomWebConfig, TargetConfig
from bridge.errors import Interrupted, VerificationFailed
from bridge.metrics import STAGE
from bridge.outcomes import FORWARDED
from bridge.peers.batcher import Batcher
from bridge.peers.dicomweb import DicomWebClient
from bridge.peers.orthanc import OrthancClient
from bridge.peers.peer import Peer
from bridge.peers.retry import RetryPolicy

log = logging.getLogger(__name__)


@dataclass
class Copy:
    """What one target is sent, and what it must then hold."""

    data: bytes | bytearray | memoryview
    syntax: str
    state: str  # CONVERTED or FORWARDED
    passed_through: bool  # an undecodable syntax passed on (forward_unchanged): never deleted


class Destination(Protocol):
    """One target, as a transfer sees it."""

    config: TargetConfig

    @property
    def name(self) -> str:
        """The target's name, in the ledger, the metrics and the logs."""
        ...

    def store(self, iid: str, copy: Copy, verify: bool) -> None:
        """Store `copy` of source instance `iid`; with `verify`, prove that the target holds
        it as sent. Raises PermanentError (recorded), TransientError (retried later),
        Interrupted (shutdown)."""
        ...


class OrthancDestination:
    """An Orthanc target, through its REST API.

    Orthanc's `AlreadyStored` may mean it kept an older copy (its default `OverwriteInstances:
    false`), which is then replaced; `Success` is checked until one upload shows that the
    target stores what it is sent.
    """

    def __init__(self, config: TargetConfig, client: OrthancClient, stop: threading.Event) -> None:
        self.config = config
        self.client = client
        self._stop = stop
        # Whether an upload answered Success was found stored as sent. Until then every
        # upload is checked: a target that transcodes what arrives (IngestTranscoding, a Lua
        # filter) says Success too. Once one was, Success is trusted, saving a request per
        # instance (2% of the throughput), except before deleting an original.
        self.keeps_what_it_gets = False

    @property
    def name(self) -> str:
        return self.config.name

    def store(self, iid: str, copy: Copy, verify: bool) -> None:
        client, expected = self.client, copy.syntax
        with STAGE["upload"].time():
            stored = client.upload(copy.data)
        if stored.instance_id != iid:
            # Same UIDs, yet another ID: Orthanc read an identifier differently in the two
            # files (e.g. a PatientID stored with VR UN in the original). Verify that copy.
            log.warning("instance %s: %s files it as %s", iid, self.name, stored.instance_id)
        if stored.status == "Success" and self.keeps_what_it_gets and not verify:
            return
        with STAGE["verify"].time():
            held = client.transfer_syntax(stored.instance_id)
        if held == expected and stored.status == "Success":
            self.keeps_what_it_gets = True
        if held != expected and stored.status == "AlreadyStored":
            # The target kept an older copy (compressed, or sent by something else): replace it.
            log.info("instance %s: %s held it as %s; replacing that copy", iid, self.name, held)
            if self._stop.is_set():
                raise Interrupted("shutting down")
            client.delete(stored.instance_id)
            client.upload(copy.data)
            held = client.transfer_syntax(stored.instance_id)
        if held != expected:
            raise VerificationFailed(
                f"after upload {self.name} holds it as {held or 'nothing'}, expected {expected}"
            )


class DicomWebDestination:
    """A DICOMweb archive: STOW-RS, several instances per request, then WADO-RS metadata.

    The STOW-RS answer says per instance whether it was stored; an archive may still drop
    what it said it stored (Orthanc's plugin does, behind a Lua filter), so the copy is
    checked with WADO-RS until one check shows that the archive keeps what it is told it
    stored, and before every deletion of an original.
    """

    def __init__(self, config: TargetConfig, client: DicomWebClient) -> None:
        settings = config.dicomweb or DicomWebConfig()
        self.config = config
        self.client = client
        self._batcher = Batcher(client, settings.batch_size, settings.batch_mb)
        self.keeps_what_it_gets = False

    @property
    def name(self) -> str:
        return self.config.name

    def store(self, iid: str, copy: Copy, verify: bool) -> None:
        with STAGE["upload"].time():
            outcome = self._batcher.store(copy.data)
        warning = outcome.reason
        if warning:
            log.warning(
                "instance %s: %s stored it with a warning: %s", iid, self.name, outcome.reason
            )
        if outcome.instance is None or (self.keeps_what_it_gets and not verify):
            return
        with STAGE["verify"].time():
            self.client.verify(outcome.instance, copy.syntax)
        self.keeps_what_it_gets = True


class Storing(Protocol):
    """A DICOM node's peer (bridge.peers.dimse.DicomPeer), as its destination uses it."""

    def store(self, data: bytes | bytearray | memoryview, forward: bool) -> str | None:
        """C-STORE one file (committed with verify: commitment); its warning, if any."""
        ...


class DicomDestination:
    """A DICOM node: C-STORE, verified by its status or by Storage Commitment.

    A store status is all the proof `verify: status` has; delete_original needs `verify:
    commitment` (bridge.config refuses the other at start-up), where the node's report that
    it holds the instance is the proof, for every copy.
    """

    def __init__(self, config: TargetConfig, node: Storing) -> None:
        self.config = config
        self.node = node

    @property
    def name(self) -> str:
        return self.config.name

    def store(self, iid: str, copy: Copy, verify: bool) -> None:
        with STAGE["upload"].time():
            warning = self.node.store(copy.data, forward=copy.state == FORWARDED)
        if warning:
            log.warning("instance %s: %s stored it with a warning: %s", iid, self.name, warning)


def peer_for(target: TargetConfig, retry: RetryPolicy, listen: bool = True) -> Peer:
    """A client for `target`, of its kind; `target.server` has its credentials. `listen`: a
    DICOM node's commitment reports are received here (a transferring bridge, not `status`)."""
    if target.dicom is not None:
        # Only here: pydicom and pynetdicom load only when a dicom target is configured.
        from bridge.peers.dimse import DicomPeer

        return DicomPeer(target.dicom, target.name, retry, listen)
    if target.kind == DICOMWEB:
        token = target.dicomweb.token if target.dicomweb else None
        return DicomWebClient(target.server, target.name, retry, token)
    return OrthancClient(target.server, target.name, retry)


def destination_for(target: TargetConfig, peer: Peer, stop: threading.Event) -> Destination:
    """The destination of `target`'s kind around its client (made by peer_for)."""
    if isinstance(peer, OrthancClient):
        return OrthancDestination(target, peer, stop)
    if isinstance(peer, DicomWebClient):
        return DicomWebDestination(target, peer)
    if target.dicom is not None:
        return DicomDestination(target, cast(Storing, peer))
    raise TypeError(f"no destination for {type(peer).__name__}")
