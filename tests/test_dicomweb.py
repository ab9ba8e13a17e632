"""The DICOMweb client: STOW-RS answers read per instance, group commit, WADO-RS verification,
QIDO-RS health and listing; against stand-in servers and against Orthanc's DICOMweb plugin."""

from __future__ import annotations

import contextlib
import copy
import http.server
import io
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from bridge.config import ServerConfig
from bridge.dicom.header import Identifiers, identifiers
from bridge.errors import (
    AccessDenied,
    ServerUnavailable,
    StoreFailed,
    TransientError,
    VerificationFailed,
)
from bridge.peers.batcher import Batcher
from bridge.peers.dicomjson import StoreOutcome, parse_stow, status_meaning, transient_failure
from bridge.peers.dicomweb import DicomWebClient
from bridge.peers.peer import Listing, Peer
from bridge.peers.retry import RetryPolicy, no_retry
from tests.conftest import MakeOrthanc
from tests.orthanc import OrthancServer, free_ports, orthanc_version, pydicom_test_files
from tests.polling import wait_for

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
ARCHIVE_USERS = {"bridge-archive": "archive-secret"}


# --- test data ---------------------------------------------------------------------------------


def ct_files(
    count: int, *, size: int = 128, patient: str = "DICOMWEB", **elements: Any
) -> list[bytes]:
    """`count` CT images of one new series, random pixels, each with its own SOP instance."""
    base = pydicom.dcmread(pydicom_test_files() / "CT_small.dcm")
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(count * size)
    files = []
    for _ in range(count):
        ds = copy.deepcopy(base)
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient, study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Rows = ds.Columns = size
        ds.PixelData = rng.integers(0, 4000, (size, size), dtype="<u2").tobytes()
        for keyword, value in elements.items():
            setattr(ds, keyword, value)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append(buffer.getvalue())
    return files


def uids(data: bytes | bytearray) -> Identifiers:
    found = identifiers(data)
    assert found is not None
    return found


def multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of the parts of a multipart message."""
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip().strip('"').encode()
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, data = chunk.partition(b"\r\n\r\n")
        parts.append(data[:-2] if data.endswith(b"\r\n") else data)
    return parts


def stow_answer(
    stored: Sequence[str] = (),
    failed: dict[str, int] | None = None,
    warnings: dict[str, int] | None = None,
) -> bytes:
    """A STOW-RS answer in DICOM JSON listing `stored` and `failed` instances."""

    def item(uid: str, tag: str | None = None, code: int | None = None) -> dict[str, Any]:
        found: dict[str, Any] = {
            "00081150": {"vr": "UI", "Value": [CT_IMAGE_STORAGE]},
            "00081155": {"vr": "UI", "Value": [uid]},
        }
        if tag and code is not None:
            found[tag] = {"vr": "US", "Value": [code]}
        return found

    warnings = warnings or {}
    answer = {
        "00081198": {
            "vr": "SQ",
            "Value": [item(uid, "00081197", code) for uid, code in (failed or {}).items()],
        },
        "00081199": {
            "vr": "SQ",
            "Value": [item(uid, "00081196", warnings.get(uid)) for uid in stored],
        },
    }
    return json.dumps(answer).encode()


# --- reading answers -----------------------------------------------------------------------------


def test_a_stow_answer_lists_stored_and_failed_instances_with_their_codes() -> None:
    body = stow_answer(["1.1", "1.2"], {"1.3": 0xA900}, warnings={"1.2": 0xB000})
    answer = parse_stow(body)
    assert answer is not None
    assert answer.stored == {"1.1": None, "1.2": 0xB000}
    assert answer.failed == {"1.3": 0xA900}
    # A list of one dataset, as some archives send it, and codes as strings.
    wrapped = json.loads(stow_answer(failed={"2.1": 0}))
    wrapped["00081198"]["Value"][0]["00081197"]["Value"] = ["A700"]
    again = parse_stow(json.dumps([wrapped]).encode())
    assert again is not None and again.failed == {"2.1": 0xA700}
    wrapped["00081198"]["Value"][0]["00081197"]["Value"] = ["49152"]
    again = parse_stow(json.dumps(wrapped).encode())
    assert again is not None and again.failed == {"2.1": 0xC000}
    empty = parse_stow(b'{"00081198": {"vr": "SQ"}, "00081199": {"vr": "SQ"}}')
    assert empty is not None and (empty.stored, empty.failed) == ({}, {})


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>Please log in</body></html>",
        b'{"HttpError": "Unsupported Media Type", "HttpStatus": 415}',  # Orthanc's own error
        b"[]",
        b"\xff\xfe not text",
        b"",
    ],
)
def test_an_answer_that_is_not_dicom_json_is_told_apart(body: bytes) -> None:
    assert parse_stow(body) is None


def test_status_codes_have_their_meanings_and_only_lack_of_resources_passes() -> None:
    assert status_meaning(0xA700) == "out of resources"
    assert status_meaning(0xA770) == "out of resources"
    assert status_meaning(0xA900) == "data set does not match SOP class"
    assert status_meaning(0xC000) == status_meaning(0xC0FF) == "cannot understand"
    assert status_meaning(0xC122) == "transfer syntax not supported"
    assert status_meaning(0x0110) == "processing failure"
    assert status_meaning(0x0122) == "SOP class not supported"
    assert status_meaning(0x0124) == "not authorized"
    assert status_meaning(0xB000) == "coercion of data elements"
    assert status_meaning(0xB006) == "elements discarded"
    assert status_meaning(0x1234) == "unknown code"
    assert [transient_failure(c) for c in (0xA700, 0xA7FF, 0xA900, 0xC000, 0x0110)] == [
        True,
        True,
        False,
        False,
        False,
    ]


@pytest.mark.parametrize(
    "syntax",
    [
        pydicom.uid.ExplicitVRLittleEndian,
        pydicom.uid.ImplicitVRLittleEndian,
        pydicom.uid.ExplicitVRBigEndian,
        pydicom.uid.DeflatedExplicitVRLittleEndian,
    ],
)
def test_the_uids_are_read_from_the_file_without_pydicom_in_any_encoding(syntax: str) -> None:
    ds = pydicom.dcmread(pydicom_test_files() / "CT_small.dcm")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
    buffer = io.BytesIO()
    # dcmwrite: save_as refuses to change the byte order (the pixels would need swapping,
    # which does not matter here).
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    assert identifiers(buffer.getvalue()) == Identifiers(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID
    )
    assert identifiers(buffer.getvalue()[:200]) is None  # cut before the UIDs


def test_the_client_is_a_peer_and_a_listing() -> None:
    client: Peer = client_for("http://archive.example/dicom-web")
    assert isinstance(client, Listing)
    assert (client.what, client.address) == ("DICOMweb archive", "http://archive.example/dicom-web")


# --- a stand-in archive --------------------------------------------------------------------------

Respond = Callable[[list[str]], tuple[int, str, bytes]]


class _Archive(http.server.BaseHTTPRequestHandler):
    """A stand-in DICOMweb archive: answers each STOW-RS request with `respond(SOP UIDs)` and
    notes what it was sent."""

    protocol_version = "HTTP/1.1"
    url: ClassVar[str]  # its DICOMweb root
    respond: ClassVar[Respond]
    sent: ClassVar[list[list[str]]]  # the SOP instance UIDs of each request
    authorization: ClassVar[list[str | None]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        parts = multipart_parts(self.headers["Content-Type"], body)
        sops = [uids(part).sop_instance for part in parts]
        type(self).sent.append(sops)
        type(self).authorization.append(self.headers.get("Authorization"))
        status, content_type, answer = type(self).respond(sops)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def do_GET(self) -> None:
        type(self).authorization.append(self.headers.get("Authorization"))
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def archive_answering(respond: Respond) -> Iterator[type[_Archive]]:
    """A stand-in archive on loopback for the block; yields its handler class (url, sent)."""

    class Archive(_Archive):  # a class per block: it keeps what it was sent, for the test
        sent: ClassVar[list[list[str]]] = []
        authorization: ClassVar[list[str | None]] = []

    Archive.respond = respond
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Archive)
    server.daemon_threads = True  # a connection the client keeps open does not hold the end
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    Archive.url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    try:
        yield Archive
    finally:
        server.shutdown()
        server.server_close()


def client_for(
    url: str, token: str | None = None, retry: RetryPolicy | None = None
) -> DicomWebClient:
    return DicomWebClient(ServerConfig(url, timeout=5), "research", retry or no_retry(), token)


def json_answer(status: int, body: bytes) -> tuple[int, str, bytes]:
    return status, "application/dicom+json", body


def test_a_partial_success_is_read_per_instance_and_the_unlisted_one_is_asked_again_alone() -> None:
    files = ct_files(5)
    sop = [uids(f).sop_instance for f in files]

    def respond(sent: list[str]) -> tuple[int, str, bytes]:
        if len(sent) > 1:  # 202: stored with a warning, two failures, one not listed
            failed = {sop[2]: 0xA900, sop[3]: 0xA700}
            return json_answer(202, stow_answer([sop[0], sop[1]], failed, {sop[1]: 0xB000}))
        return json_answer(200, stow_answer(sent))

    with archive_answering(respond) as archive:
        outcomes = client_for(archive.url).store_batch(files)
    assert archive.sent == [sop, [sop[4]]]
    assert [(o.stored, o.transient) for o in outcomes] == [
        (True, False),
        (True, False),
        (False, False),
        (False, True),
        (True, False),
    ]
    assert [o.instance for o in outcomes] == [uids(f) for f in files]
    assert outcomes[1].reason == "warning B000, coercion of data elements"
    assert outcomes[2].reason == (
        "research DICOMweb archive did not store it: failure reason A900, data set does not match "
        "SOP class (HTTP 202)"
    )
    assert "A700, out of resources" in outcomes[3].reason
    assert isinstance(outcomes[2].error(), StoreFailed)
    assert isinstance(outcomes[3].error(), TransientError)


def test_all_failed_is_read_from_the_body_of_a_409() -> None:
    files = ct_files(2)
    with archive_answering(
        lambda sent: json_answer(409, stow_answer(failed=dict.fromkeys(sent, 0x0110)))
    ) as archive:
        outcomes = client_for(archive.url).store_batch(files)
    assert len(archive.sent) == 1
    assert all(not o.stored and not o.transient for o in outcomes)
    assert all("failure reason 0110, processing failure (HTTP 409)" in o.reason for o in outcomes)


def test_an_instance_an_answer_does_not_list_is_not_stored() -> None:
    files = ct_files(2)
    sop = [uids(f).sop_instance for f in files]
    with archive_answering(
        lambda sent: json_answer(200, stow_answer([uid for uid in sent if uid != sop[1]]))
    ) as archive:
        outcomes = client_for(archive.url).store_batch(files)
    # Unexplained by the answer to both, it is asked again alone, and still not listed.
    assert archive.sent == [sop, [sop[1]]]
    assert outcomes[0].stored
    assert not outcomes[1].stored and not outcomes[1].transient
    assert outcomes[1].reason == (
        "research DICOMweb archive: its answer (HTTP 200) lists it neither as stored nor as "
        "failed: not stored"
    )


def test_a_request_too_large_is_split_in_halves_until_it_passes_and_remembered() -> None:
    files = ct_files(5)

    def respond(sent: list[str]) -> tuple[int, str, bytes]:
        if len(sent) > 2:
            return 413, "text/plain", b"Request Entity Too Large"
        return json_answer(200, stow_answer(sent))

    with archive_answering(respond) as archive:
        client = client_for(archive.url)
        outcomes = client.store_batch(files)
        assert [len(request) for request in archive.sent] == [5, 2, 3, 1, 2]
        assert all(o.stored for o in outcomes)
        # What was refused is not sent again at that size: split before it goes.
        assert all(o.stored for o in client.store_batch(files))
        assert [len(request) for request in archive.sent[5:]] == [2, 1, 2]
    with archive_answering(lambda sent: (413, "text/plain", b"too large")) as archive:
        (alone,) = client_for(archive.url).store_batch(files[:1])
    assert not alone.stored and not alone.transient
    assert alone.reason == "research DICOMweb archive refused it: HTTP 413: too large"


def test_an_answer_that_is_not_dicom_json_fails_each_instance_with_the_reason() -> None:
    files = ct_files(2)
    page = b"<html>Please log in</html>"
    with archive_answering(lambda sent: (200, "text/html", page)) as archive:
        outcomes = client_for(archive.url).store_batch(files)
    assert [len(request) for request in archive.sent] == [2, 1, 1]  # then each alone
    # Taken, but what was kept cannot be told: sent again later, never recorded as failed.
    assert all(not o.stored and o.transient for o in outcomes)
    assert outcomes[0].reason == (
        "research DICOMweb archive answered HTTP 200 with something that is not DICOM JSON "
        "(text/html): <html>Please log in</html>; it is sent again later"
    )
    with archive_answering(lambda sent: (415, "text/plain", b"Unsupported media type")) as archive:
        outcomes = client_for(archive.url).store_batch(files)
    assert all(not o.stored and not o.transient for o in outcomes)
    assert (
        outcomes[0].reason
        == "research DICOMweb archive refused it: HTTP 415: Unsupported media type"
    )


def test_whole_request_failures_raise_and_an_unreadable_file_is_not_sent() -> None:
    files = ct_files(1)
    busy = r"research DICOMweb archive \(store 1 instances\).*503"
    with (
        archive_answering(lambda sent: (503, "text/plain", b"busy")) as archive,
        pytest.raises(ServerUnavailable, match=busy),
    ):
        client_for(archive.url).store_batch(files)
    with archive_answering(lambda sent: (403, "text/plain", b"")) as archive:
        with pytest.raises(AccessDenied, match=r"HTTP 403, check research\.username and password"):
            client_for(archive.url).store_batch(files)
        (outcome,) = client_for(archive.url).store_batch([b"not DICOM"])
        assert len(archive.sent) == 1  # the unreadable one was never sent
    assert outcome.instance is None and not outcome.stored and not outcome.transient
    assert "UIDs cannot be read from the file" in outcome.reason


def test_a_bearer_token_replaces_basic_auth_and_is_never_shown() -> None:
    files = ct_files(1)
    with archive_answering(lambda sent: json_answer(200, stow_answer(sent))) as archive:
        url = archive.url
        (outcome,) = client_for(url, token="s3cret-token").store_batch(files)
        assert outcome.stored
        config = ServerConfig(url, username="user", password="pw", timeout=5)
        DicomWebClient(config, "research", no_retry()).store_batch(files)
        with pytest.raises(AccessDenied) as refused:  # GET answers 401 here
            client_for(url, token="s3cret-token").probe()
    assert archive.authorization[0] == "Bearer s3cret-token"
    assert archive.authorization[1] == "Basic dXNlcjpwdw=="  # user:pw
    assert str(refused.value).endswith("HTTP 401, check research's token")
    assert "s3cret" not in str(refused.value)


def test_a_server_that_is_down_is_transient_and_not_up() -> None:
    (port,) = free_ports(1)
    retry = RetryPolicy(threading.Event(), max_wait=0.3, initial=0.01, longest=0.05)
    down = client_for(f"http://127.0.0.1:{port}/dicom-web", retry=retry)
    with pytest.raises(ServerUnavailable, match=r"cannot reach http://127\.0\.0\.1:\d+/dicom-web"):
        down.probe()
    assert down.up is False
    with pytest.raises(TransientError, match="refused"):
        Batcher(down).store(ct_files(1)[0])


# --- group commit ---------------------------------------------------------------------------------


class _Recording(DicomWebClient):
    """A client whose store_batch notes each batch and answers `answer(data)` for each file,
    after waiting for `release` on its first call."""

    def __init__(self, answer: Callable[[list[bytes]], list[StoreOutcome]]) -> None:
        retry = RetryPolicy(threading.Event(), max_wait=5, initial=0.01, longest=0.02)
        super().__init__(ServerConfig("http://127.0.0.1:9/dicom-web"), "archive", retry)
        self.answer = answer
        self.batches: list[list[bytes]] = []
        self.release = threading.Event()

    def store_batch(
        self, instances: Sequence[bytes | bytearray | memoryview]
    ) -> list[StoreOutcome]:
        batch = [bytes(data) for data in instances]
        self.batches.append(batch)
        if len(self.batches) == 1:
            assert self.release.wait(10)
        return self.answer(batch)


def stored(batch: list[bytes]) -> list[StoreOutcome]:
    return [StoreOutcome(None, True, data.decode()) for data in batch]


def store_concurrently(
    batcher: Batcher, items: list[bytes]
) -> dict[bytes, StoreOutcome | BaseException]:
    """Store items[0] first (its request blocks until release), then the rest from a thread each
    once it is queued behind it; release the first; every caller's outcome or error."""
    client = batcher.client
    assert isinstance(client, _Recording)
    results: dict[bytes, StoreOutcome | BaseException] = {}

    def store(data: bytes) -> None:
        try:
            results[data] = batcher.store(data)
        except BaseException as exc:
            results[data] = exc

    threads = [threading.Thread(target=store, args=(items[0],))]
    threads[0].start()
    wait_for(lambda: client.batches, 10, "the first request")
    for data in items[1:]:
        threads.append(threading.Thread(target=store, args=(data,)))
        threads[-1].start()
    wait_for(lambda: batcher.queued == len(items) - 1, 10, "every caller queued")
    client.release.set()
    for thread in threads:
        thread.join(10)
    return results


def test_callers_that_arrive_during_a_request_share_the_next_ones() -> None:
    client = _Recording(stored)
    items = [f"i{n}".encode() for n in range(8)]
    results = store_concurrently(Batcher(client, batch_size=4, posts=1), items)
    assert [len(batch) for batch in client.batches] == [1, 4, 3]
    # Each caller gets the outcome of its own instance.
    assert {data: getattr(outcome, "reason", None) for data, outcome in results.items()} == {
        data: data.decode() for data in items
    }


@pytest.mark.parametrize("posts", [1, 2, 3])
def test_many_callers_each_get_their_own_outcome_whatever_the_interleaving(posts: int) -> None:
    client = _Recording(stored)
    client.release.set()
    batcher = Batcher(client, batch_size=5, posts=posts)
    items = [f"i{n}".encode() for n in range(400)]
    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(batcher.store, items))
    assert [outcome.reason for outcome in outcomes] == [data.decode() for data in items]
    assert sorted(data for batch in client.batches for data in batch) == sorted(items)
    assert max(len(batch) for batch in client.batches) <= 5
    assert batcher.queued == 0


def test_a_batch_holds_at_most_batch_mb_and_a_larger_instance_goes_alone() -> None:
    client = _Recording(stored)
    mib = 2**20
    items = [b"0" * 10, b"a" * mib, b"b" * mib, b"c" * (3 * mib), b"d" * mib]
    store_concurrently(Batcher(client, batch_size=10, batch_mb=2.5, posts=1), items)
    assert [[data[:1] for data in batch] for batch in client.batches] == [
        [b"0"],
        [b"a", b"b"],
        [b"c"],
        [b"d"],
    ]


def test_after_a_failed_request_each_of_its_instances_is_retried_alone() -> None:
    def answer(batch: list[bytes]) -> list[StoreOutcome]:
        if len(client.batches) <= 2:
            raise ServerUnavailable("research DICOMweb archive (store): HTTP 500")
        return stored(batch)

    client = _Recording(answer)
    items = [f"i{n}".encode() for n in range(4)]
    results = store_concurrently(Batcher(client, batch_size=4, posts=1), items)
    assert [len(batch) for batch in client.batches] == [1, 3, 1, 1, 1, 1]
    assert all(isinstance(outcome, StoreOutcome) for outcome in results.values())


def test_an_outcome_that_is_not_stored_raises_its_error() -> None:
    def answer(batch: list[bytes]) -> list[StoreOutcome]:
        return [
            StoreOutcome(None, False, f"{data.decode()} refused", transient=data == b"full")
            for data in batch
        ]

    client = _Recording(answer)
    client.release.set()
    batcher = Batcher(client)
    with pytest.raises(StoreFailed, match="bad refused"):
        batcher.store(b"bad")
    assert len(client.batches) == 1  # permanent: not retried
    client.retry = RetryPolicy(threading.Event(), max_wait=0.2, initial=0.01, longest=0.02)
    with pytest.raises(TransientError, match="full refused"):
        batcher.store(b"full")
    assert len(client.batches) > 2  # transient: retried until the policy gave up


# --- against Orthanc's DICOMweb plugin ------------------------------------------------------------


@pytest.fixture
def archive(make_orthanc: MakeOrthanc) -> OrthancServer:
    """An Orthanc with its DICOMweb plugin, and authentication."""
    return make_orthanc("archive", dicomweb=True, users=ARCHIVE_USERS)


def archive_client(server: OrthancServer, password: str | None = None) -> DicomWebClient:
    user, secret = next(iter(server.users.items()), (None, None))
    config = ServerConfig(server.dicomweb_url, user, password or secret, timeout=10)
    return DicomWebClient(config, "research", no_retry())


def wado_retrieve(server: OrthancServer, instance: Identifiers) -> bytes:
    """The file WADO-RS returns for `instance`."""
    response = server.request(
        "GET",
        f"/dicom-web/studies/{instance.study}/series/{instance.series}"
        f"/instances/{instance.sop_instance}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    response.raise_for_status()
    (part,) = multipart_parts(response.headers["Content-Type"], response.content)
    return part


def test_concurrent_stores_share_requests_and_arrive_pixel_equal(archive: OrthancServer) -> None:
    client = archive_client(archive)
    batcher = Batcher(client, batch_size=4)
    files = ct_files(12)
    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(batcher.store, files))
    assert all(outcome.stored and outcome.reason == "" for outcome in outcomes)
    for data, outcome in zip(files, outcomes, strict=True):
        assert outcome.instance == uids(data)
        # Orthanc's plugin does not say which transfer syntax it holds: presence is proved.
        assert client.verify(outcome.instance, EXPLICIT) is None
        copy_back = pydicom.dcmread(io.BytesIO(wado_retrieve(archive, outcome.instance)))
        assert copy_back.PixelData == pydicom.dcmread(io.BytesIO(data)).PixelData
        assert copy_back.file_meta.TransferSyntaxUID == EXPLICIT
    assert client.up is True


def test_a_failing_instance_is_recorded_while_the_others_in_its_batch_are_stored(
    make_orthanc: MakeOrthanc,
) -> None:
    # Orthanc cannot store an instance larger than its whole storage: its plugin fails it.
    server = make_orthanc("full", dicomweb=True, extra_config={"MaximumStorageSize": 1})
    client = archive_client(server)
    small = ct_files(3, patient="SMALL")
    big = ct_files(1, size=1024, patient="BIG")[0]  # 2 MiB
    outcomes = client.store_batch([small[0], big, small[1], small[2]])
    assert [o.stored for o in outcomes] == [True, False, True, True]
    failed = outcomes[1]
    if orthanc_version() >= (1, 12):  # plugin 1.20: 202, Failure Reason A700
        assert failed.transient
        assert "failure reason A700, out of resources (HTTP 202)" in failed.reason
    else:  # plugin 1.7 stops at the instance it cannot store and lists nothing after it
        assert not failed.transient
        assert "lists it neither as stored nor as failed" in failed.reason
    for data in small:
        client.verify(uids(data), EXPLICIT)
    with pytest.raises(VerificationFailed, match="does not hold it: no WADO-RS metadata"):
        client.verify(uids(big), EXPLICIT)


def test_an_instance_orthanc_filters_out_is_said_stored_and_caught_by_verification(
    make_orthanc: MakeOrthanc, tmp_path: Path
) -> None:
    script = tmp_path / "filter.lua"
    script.write_text(
        "function ReceivedInstanceFilter(dicom, origin, info)\n"
        '  return dicom.SeriesDescription ~= "REFUSE"\n'
        "end\n"
    )
    server = make_orthanc("filtered", dicomweb=True, extra_config={"LuaScripts": [str(script)]})
    client = archive_client(server)
    (kept,) = ct_files(1)
    (dropped,) = ct_files(1, SeriesDescription="REFUSE")
    outcomes = client.store_batch([kept, dropped])
    assert [o.stored for o in outcomes] == [True, True]  # what the plugin answers, wrongly
    client.verify(uids(kept), EXPLICIT)
    with pytest.raises(VerificationFailed, match="does not hold it"):
        client.verify(uids(dropped), EXPLICIT)


def test_listing_pages_through_qido_with_orthanc_ids(archive: OrthancServer) -> None:
    client = archive_client(archive)
    outcomes = client.store_batch(ct_files(4, patient="LIST-A") + ct_files(3, patient="LIST-B"))
    assert all(o.stored for o in outcomes)
    pages = list(client.instance_pages(page=3))
    assert [len(page) for page in pages] == [3, 3, 1]
    listed = [iid for page in pages for iid in page]
    assert sorted(listed) == sorted(archive.instances())  # Orthanc's own IDs, computed


def test_up_credentials_and_a_server_that_goes_down(archive: OrthancServer) -> None:
    client = archive_client(archive)
    client.probe()
    assert client.up is True
    with pytest.raises(AccessDenied, match=r"HTTP 401, check research\.username and password"):
        archive_client(archive, password="wrong").store_batch(ct_files(1))
    archive.kill()
    with pytest.raises(ServerUnavailable, match="cannot reach"):
        client.probe()
    assert client.up is False
    with pytest.raises(ServerUnavailable):
        client.store_batch(ct_files(1))


def test_metadata_of_an_instance_the_archive_lacks_is_none(archive: OrthancServer) -> None:
    client = archive_client(archive)
    (data,) = ct_files(1)
    assert client.metadata(uids(data)) is None
    client.store_batch([data])
    found = client.metadata(uids(data))
    assert found is not None and found["00080018"]["Value"] == [uids(data).sop_instance]
