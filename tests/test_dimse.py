"""bridge.peers.dimse, the DICOM node client, against real peers: DCMTK storescp, Orthanc's DICOM
port and its storage commitment SCP, a pynetdicom SCP with chosen statuses, a silent socket."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest

from bridge.config import DEFAULT_CALLING_AE_TITLE
from bridge.dicom.dicomfile import read_meta
from bridge.dicom.implicit import to_implicit
from bridge.errors import (
    AssociationRejected,
    DicomUnavailable,
    NotCommitted,
    StoreFailed,
    TransientError,
)
from bridge.peers.commitment import GroupCommit
from bridge.peers.dimse import DicomNode, Stored
from bridge.uids import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN
from tests.conftest import MakeOrthanc
from tests.dimse_peers import CT_IMAGE_STORAGE, ScriptedSCP, SilentPeer
from tests.orthanc import (
    JPEG_2000_LOSSLESS,
    OrthancServer,
    StoreSCP,
    free_ports,
    pydicom_test_files,
)
from tests.polling import wait_for

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 5.0  # each exchange of a node under test; failures that wait for it use less

MakeNode = Callable[..., DicomNode]
MakeStoreSCP = Callable[..., StoreSCP]


@pytest.fixture
def make_node() -> Iterator[MakeNode]:
    """Factory for DicomNode(127.0.0.1, port, ae_title, **options), closed after the test."""
    nodes: list[DicomNode] = []

    def make(port: int, ae_title: str, **options: object) -> DicomNode:
        options.setdefault("timeout", TIMEOUT)
        node = DicomNode("127.0.0.1", port, ae_title, **options)  # type: ignore[arg-type]
        nodes.append(node)
        return node

    try:
        yield make
    finally:
        for node in nodes:
            node.close()


@pytest.fixture(scope="module")
def ct() -> bytes:
    """pydicom's CT_small.dcm: CT Image Storage, Explicit VR Little Endian."""
    return (pydicom_test_files() / "CT_small.dcm").read_bytes()


@pytest.fixture(scope="module")
def mr() -> bytes:
    """pydicom's MR_small.dcm: MR Image Storage, Explicit VR Little Endian."""
    return (pydicom_test_files() / "MR_small.dcm").read_bytes()


@pytest.fixture(scope="module")
def j2k() -> bytes:
    """pydicom's MR_small_jp2klossless.dcm: JPEG 2000 lossless, as a PACS sends it."""
    return (pydicom_test_files() / "MR_small_jp2klossless.dcm").read_bytes()


def dataset_of(data: bytes) -> bytes:
    """The encoded dataset after the file meta."""
    _, start = read_meta(memoryview(data))
    return data[start:]


def variant(data: bytes, number: int) -> bytes:
    """`data` as another instance: its SOP Instance UID with `.number` appended."""
    ds = pydicom.dcmread(io.BytesIO(data))
    uid = pydicom.uid.UID(f"{ds.SOPInstanceUID}.{number}")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


# Sending: the file's own bytes, Implicit VR when that is all a node takes, forward ------------


def test_storescp_receives_the_dataset_byte_for_byte(
    make_storescp: MakeStoreSCP, make_node: MakeNode, ct: bytes, mr: bytes
) -> None:
    scp = make_storescp(options=["--bit-preserving"])  # writes what arrived, as it arrived
    node = make_node(scp.port, scp.aet)
    for data in (ct, mr):
        stored = node.store(data)
        assert (stored.syntax, stored.status, stored.warning) == (
            EXPLICIT_VR_LITTLE_ENDIAN,
            0,
            None,
        )
    received = [path.read_bytes() for path in scp.received()]
    assert sorted(map(dataset_of, received)) == sorted(map(dataset_of, (ct, mr)))


def test_a_node_taking_only_implicit_vr_gets_it_without_being_asked(
    make_storescp: MakeStoreSCP,
    make_node: MakeNode,
    ct: bytes,
    mr: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scp = make_storescp(options=["--implicit", "--bit-preserving"])
    node = make_node(scp.port, scp.aet)
    with caplog.at_level(logging.INFO, logger="bridge.peers.dimse"):
        stored = [node.store(data) for data in (ct, mr, ct)]
    assert {s.syntax for s in stored} == {IMPLICIT_VR_LITTLE_ENDIAN}
    said = [r for r in caplog.records if "Implicit VR Little Endian only" in r.getMessage()]
    assert len(said) == 1  # once per target
    by_uid = {pydicom.dcmread(path).SOPInstanceUID: path for path in scp.received()}
    for data in (ct, mr):
        sent = pydicom.dcmread(io.BytesIO(data))
        path = by_uid[sent.SOPInstanceUID]
        got = pydicom.dcmread(path)
        assert got.file_meta.TransferSyntaxUID == IMPLICIT_VR_LITTLE_ENDIAN
        assert dataset_of(path.read_bytes()) == dataset_of(to_implicit(data))
        assert got == sent  # every element, pixel data included
        assert np.array_equal(got.pixel_array, sent.pixel_array)


def test_a_forwarded_jpeg_2000_original_is_refused_where_it_is_not_accepted(
    make_storescp: MakeStoreSCP, make_node: MakeNode, j2k: bytes
) -> None:
    scp = make_storescp()  # uncompressed syntaxes only
    node = make_node(scp.port, scp.aet)
    with pytest.raises(StoreFailed) as refused:
        node.store(j2k, forward=True)
    message = str(refused.value)
    assert "does not accept MR Image Storage" in message
    assert f"JPEG 2000 Image Compression (Lossless Only) ({JPEG_2000_LOSSLESS})" in message
    assert "Transfer Syntax(es) Not Supported" in message
    assert "a forwarded instance is sent only as it is" in message
    assert scp.received() == []


def test_orthanc_takes_a_forwarded_jpeg_2000_original_as_it_is(
    make_orthanc: MakeOrthanc, make_node: MakeNode, j2k: bytes
) -> None:
    peer = make_orthanc("peer")
    stored = make_node(peer.dicom_port, peer.aet).store(j2k, forward=True)
    assert stored.syntax == JPEG_2000_LOSSLESS
    (instance,) = peer.instances()
    assert peer.transfer_syntax(instance) == JPEG_2000_LOSSLESS
    held = pydicom.dcmread(io.BytesIO(peer.file(instance)))
    assert held.PixelData == pydicom.dcmread(io.BytesIO(j2k)).PixelData


def test_orthanc_as_a_c_store_target(
    make_orthanc: MakeOrthanc, make_node: MakeNode, ct: bytes, mr: bytes
) -> None:
    peer = make_orthanc("peer")
    node = make_node(peer.dicom_port, peer.aet)
    assert node.echo()
    for data in (ct, mr):
        assert node.store(data).syntax == EXPLICIT_VR_LITTLE_ENDIAN
    held = {}
    for instance in peer.instances():
        assert peer.transfer_syntax(instance) == EXPLICIT_VR_LITTLE_ENDIAN
        ds = pydicom.dcmread(io.BytesIO(peer.file(instance)))
        held[ds.SOPInstanceUID] = ds
    for data in (ct, mr):
        sent = pydicom.dcmread(io.BytesIO(data))
        assert held[sent.SOPInstanceUID] == sent


def test_something_that_is_not_a_dicom_file_fails(
    make_storescp: MakeStoreSCP, make_node: MakeNode
) -> None:
    scp = make_storescp()
    with pytest.raises(StoreFailed, match="not a DICOM file"):
        make_node(scp.port, scp.aet).store(b"\0" * 200)


# Statuses ---------------------------------------------------------------------------------------


@pytest.fixture
def scripted() -> Iterator[ScriptedSCP]:
    """A started pynetdicom SCP answering 0x0000 until the test says otherwise."""
    scp = ScriptedSCP()
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()


@pytest.mark.parametrize(
    ("code", "said", "raised"),
    [
        (0xB000, "0xB000 (Coercion of Data Elements)", None),
        (0xB006, "0xB006 (Element Discarded)", None),
        (0xB007, "0xB007 (Data Set Does Not Match SOP Class)", None),
        (0xC000, "0xC000 (Cannot Understand)", StoreFailed),
        (0xA900, "0xA900 (Data Set Does Not Match SOP Class)", StoreFailed),
        (0x0122, "0x0122 (Refused: SOP Class Not Supported)", StoreFailed),
        (0xA701, "0xA701 (Refused: Out of Resources)", DicomUnavailable),  # transient
    ],
)
def test_c_store_statuses(
    scripted: ScriptedSCP,
    make_node: MakeNode,
    ct: bytes,
    code: int,
    said: str,
    raised: type[Exception] | None,
) -> None:
    # Warnings: stored, the warning noted. Failures: the code in hex and what it means.
    scripted.status = code
    node = make_node(scripted.port, scripted.ae_title)
    if raised is None:
        stored = node.store(ct)
        assert (stored.status, stored.warning) == (code, said)
    else:
        with pytest.raises(raised, match=f"status {re.escape(said)}"):
            node.store(ct)


def test_a_node_whose_associations_are_all_busy_is_up(
    scripted: ScriptedSCP, make_node: MakeNode, ct: bytes
) -> None:
    node = make_node(scripted.port, scripted.ae_title, associations=1)
    scripted.go_on.clear()
    with ThreadPoolExecutor(1) as pool:
        storing = pool.submit(node.store, ct)
        wait_for(lambda: scripted.stored, 10, "the C-STORE to arrive")
        assert node.echo()  # at once: not after waiting for the busy association
        scripted.go_on.set()
        assert storing.result(10).status == 0


# Peers that refuse, abort, hang or are not there -------------------------------------------------


def test_an_association_rejected_for_its_called_ae_title(
    make_orthanc: MakeOrthanc, make_node: MakeNode, ct: bytes
) -> None:
    peer = make_orthanc("peer", extra_config={"DicomCheckCalledAet": True})
    node = make_node(peer.dicom_port, "NOT-" + peer.aet)
    with pytest.raises(AssociationRejected) as rejected:
        node.store(ct)
    assert "Rejected Permanent" in str(rejected.value)
    assert "Called AE title not recognised" in str(rejected.value)
    assert not node.echo()
    assert node.problem is not None and "Called AE title not recognised" in node.problem
    assert make_node(peer.dicom_port, peer.aet).echo()  # the right title is let in


def test_a_peer_that_accepts_the_connection_and_never_answers(
    make_node: MakeNode, ct: bytes
) -> None:
    peer = SilentPeer()
    try:
        node = make_node(peer.port, "SILENT", timeout=1.0)
        with pytest.raises(DicomUnavailable) as unanswered:
            node.store(ct)
        assert isinstance(unanswered.value, TransientError)
        assert "did not answer the association request within 1 s" in str(unanswered.value)
        assert not node.echo()
    finally:
        peer.stop()


def test_a_node_that_does_not_answer_a_c_store(
    make_storescp: MakeStoreSCP, make_node: MakeNode, ct: bytes
) -> None:
    scp = make_storescp(options=["--sleep-during", "30"])
    with pytest.raises(DicomUnavailable, match="no answer to C-STORE within 1 s"):
        make_node(scp.port, scp.aet, timeout=1.0).store(ct)


def test_a_node_that_aborts_the_association(
    make_storescp: MakeStoreSCP, make_node: MakeNode, ct: bytes
) -> None:
    scp = make_storescp(options=["--abort-after"])
    with pytest.raises(DicomUnavailable, match="aborted or closed during C-STORE"):
        make_node(scp.port, scp.aet).store(ct)


def test_nothing_listening(make_node: MakeNode, ct: bytes) -> None:
    (port,) = free_ports(1)
    node = make_node(port, "NOBODY")
    with pytest.raises(DicomUnavailable, match=r"cannot connect to .*: Connection refused"):
        node.store(ct)
    assert not node.echo()
    assert node.problem is not None and "Connection refused" in node.problem


# Associations: kept open, reused, re-opened --------------------------------------------------


def test_associations_are_kept_open_and_reused(
    make_storescp: MakeStoreSCP, make_node: MakeNode, ct: bytes, mr: bytes
) -> None:
    scp = make_storescp()
    node = make_node(scp.port, scp.aet)
    for number in range(5):
        node.store(variant(ct, number))
    assert node.echo()
    assert scp.associations() == 1
    node.store(mr)  # a SOP class the open association did not propose: a new one does
    node.store(ct)  # ... and it proposed CT too
    assert scp.associations() == 2
    assert len(scp.received()) == 7


def test_threads_share_a_few_associations(
    make_storescp: MakeStoreSCP, make_node: MakeNode, ct: bytes
) -> None:
    scp = make_storescp(options=["--fork"])  # one process per association
    node = make_node(scp.port, scp.aet, associations=3)
    instances = [variant(ct, number) for number in range(40)]
    with ThreadPoolExecutor(8) as pool:
        stored = list(pool.map(node.store, instances))
    assert len({s.sop_instance for s in stored}) == 40
    assert len(scp.received()) == 40
    assert 1 <= scp.associations() <= 3


def test_a_node_taking_one_association_at_a_time(
    make_storescp: MakeStoreSCP,
    make_node: MakeNode,
    ct: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # storescp without --fork leaves a second association request unanswered while one is
    # open: after one such wait, the node's threads share the one association.
    scp = make_storescp()
    node = make_node(scp.port, scp.aet, associations=4, timeout=1.0)
    instances = [variant(ct, number) for number in range(12)]
    with (
        caplog.at_level(logging.WARNING, logger="bridge.peers.dimse"),
        ThreadPoolExecutor(4) as pool,
    ):
        results = list(pool.map(lambda data: _store_or_error(node, data), instances))
    assert all(isinstance(r, Stored) for r in results), results
    assert len(scp.received()) == 12
    assert any("using at most 1" in r.getMessage() for r in caplog.records)


def _store_or_error(node: DicomNode, data: bytes) -> Stored | Exception:
    try:
        return node.store(data)
    except Exception as exc:
        return exc


def test_idle_associations_are_released_and_opened_again(
    make_storescp: MakeStoreSCP, make_node: MakeNode, ct: bytes
) -> None:
    scp = make_storescp()
    node = make_node(scp.port, scp.aet, idle_timeout=0.3)
    node.store(ct)
    wait_for(lambda: "Association Release" in scp.log_path.read_text(), 10, "the release")
    node.store(ct)
    assert scp.associations() == 2


def test_an_association_the_node_closed_is_replaced_unseen(
    make_storescp: MakeStoreSCP, make_node: MakeNode, ct: bytes
) -> None:
    scp = make_storescp(options=["--socket-timeout", "1"])  # drops a silent association
    node = make_node(scp.port, scp.aet, idle_timeout=60)
    node.store(ct)
    wait_for(lambda: scp.log_path.read_text().count("Association") >= 4, 10, "the drop")
    node.store(ct)
    assert scp.associations() == 2


# Storage commitment ------------------------------------------------------------------------------


def committing_orthanc(
    make_orthanc: MakeOrthanc,
    make_node: MakeNode,
    report_elsewhere: bool = False,
    verbose: bool = False,
    **options: object,
) -> tuple[OrthancServer, DicomNode]:
    """An Orthanc, and a node with verify: commitment listening where Orthanc sends its reports
    (on a new association, to the AE it knows by the calling title), or somewhere else."""
    listen_port, elsewhere = free_ports(2)
    bridge_ae = [
        DEFAULT_CALLING_AE_TITLE,
        "127.0.0.1",
        elsewhere if report_elsewhere else listen_port,
    ]
    peer = make_orthanc("peer", modalities={"bridge": bridge_ae}, verbose=verbose)
    node = make_node(
        peer.dicom_port,
        peer.aet,
        verify="commitment",
        commitment_port=listen_port,
        commitment_host="127.0.0.1",
        **options,
    )
    return peer, node


def test_storage_commitment_against_orthanc(
    make_orthanc: MakeOrthanc, make_node: MakeNode, ct: bytes, mr: bytes
) -> None:
    peer, node = committing_orthanc(make_orthanc, make_node)
    stored = node.store(ct)
    assert stored.committed
    assert node.store(mr).committed
    absent = Stored(
        CT_IMAGE_STORAGE, "1.2.826.0.1.3680043.2.1143.404", EXPLICIT_VR_LITTLE_ENDIAN, 0
    )
    outcome = node.commit([stored, absent])
    assert outcome == {
        stored.sop_instance: None,
        absent.sop_instance: "not committed: failure reason 0x0112 (no such object instance)",
    }
    # Deleted since it was stored: no longer committed.
    (instance,) = [i for i in peer.instances() if _uid_of(peer.file(i)) == stored.sop_instance]
    peer.delete(instance)
    assert node.commit([stored])[stored.sop_instance] is not None


def _uid_of(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def test_a_commitment_report_that_never_comes(
    make_orthanc: MakeOrthanc, make_node: MakeNode, ct: bytes
) -> None:
    # Orthanc reports to a port where nobody listens: the node waits out its deadline.
    peer, node = committing_orthanc(
        make_orthanc, make_node, report_elsewhere=True, commitment_timeout=1.0
    )
    with pytest.raises(NotCommitted, match="no storage commitment report within 1 s"):
        node.store(ct)
    assert len(peer.instances()) == 1  # stored, but unproven: retried, never deleted


def test_a_commitment_report_on_the_same_association(
    scripted: ScriptedSCP, make_node: MakeNode, ct: bytes
) -> None:
    node = make_node(scripted.port, scripted.ae_title, verify="commitment")
    stored = node.store(ct)
    assert stored.committed
    other = Stored(CT_IMAGE_STORAGE, "1.2.826.0.1.3680043.2.1143.405", EXPLICIT_VR_LITTLE_ENDIAN, 0)
    assert node.commit([other]) == {
        other.sop_instance: "not committed: failure reason 0x0112 (no such object instance)"
    }
    assert scripted.associations == 1


def test_threads_share_commitment_requests(
    make_orthanc: MakeOrthanc, make_node: MakeNode, ct: bytes
) -> None:
    peer, node = committing_orthanc(make_orthanc, make_node, verbose=True)
    instances = [variant(ct, number) for number in range(24)]
    with ThreadPoolExecutor(8) as pool:
        stored = list(pool.map(node.store, instances))
    assert all(s.committed for s in stored)
    asked = peer.log_path.read_text(errors="replace").count("Incoming storage commitment request")
    assert 1 <= asked <= 24, asked


def test_commitment_requests_gather_while_one_waits_for_its_report() -> None:
    sent: list[list[str]] = []
    first_sent, release = threading.Event(), threading.Event()

    def commit(instances: list[tuple[str, str]]) -> dict[str, str | None]:
        sent.append([uid for _, uid in instances])
        first_sent.set()
        release.wait(30)
        if "bad" in sent[-1]:
            raise NotCommitted("no report")
        return {uid: None for _, uid in instances}

    group = GroupCommit(commit)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(group.commit, ("1.2", "a"))
        first_sent.wait(30)
        later = [pool.submit(group.commit, ("1.2", uid)) for uid in ("b", "c", "bad")]
        wait_for(lambda: sent == [["a"]] and _gathering(group) == 3, 30, "three to gather")
        release.set()
        assert first.result(30) is None
        for future in later:
            with pytest.raises(NotCommitted, match="no report"):
                future.result(30)
    assert [sorted(uids) for uids in sent] == [["a"], ["b", "bad", "c"]]


def _gathering(group: GroupCommit) -> int:
    batch = group._next  # the test needs to know that the three have joined
    return len(batch.instances) if batch is not None else 0


# The main process ------------------------------------------------------------------------------


def test_the_main_process_does_not_load_the_dicom_network_stack() -> None:
    script = (
        "import sys, bridge.cli, bridge.engine.pipeline, bridge.engine.transfer, bridge.config\n"
        "assert 'bridge.peers.dimse' not in sys.modules and 'pynetdicom' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)
