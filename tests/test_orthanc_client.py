"""The HTTP client and the feed, against a real Orthanc: every failure becomes a named error."""

from __future__ import annotations

import contextlib
import http.server
import ssl
import subprocess
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pydicom
import pytest

from bridge.config import ServerConfig
from bridge.errors import (
    AccessDenied,
    ConfigError,
    FeedResetError,
    NotFound,
    Rejected,
    ServerUnavailable,
)
from bridge.outcomes import NewInstance
from bridge.peers import feed
from bridge.peers.orthanc import ChangesPage, OrthancClient, instance_id
from bridge.peers.retry import RetryPolicy, no_retry
from tests.orthanc import OrthancServer, free_ports, pydicom_test_files


def client(server: OrthancServer, password: str | None = None) -> OrthancClient:
    user, secret = server.auth or (None, None)
    config = ServerConfig(server.url, user, password or secret, timeout=5)
    return OrthancClient(config, "source", no_retry())


def test_changes_download_upload_and_delete(source: OrthancServer) -> None:
    path = pydicom_test_files() / "MR_small_jp2klossless.dcm"
    iid = str(source.upload(path)["ID"])
    orthanc = client(source)
    events = list(
        feed.follow(
            orthanc, 0, page_size=2, stop=threading.Event(), poll_interval=0.1, forever=False
        )
    )
    # NewInstance comes first; the new series/study/patient rows need no work but are scanned.
    assert events == [NewInstance(1, iid), feed.Scanned(2), feed.Scanned(4)]
    assert events[-1] == feed.Scanned(orthanc.last_change())
    assert orthanc.download(iid) == path.read_bytes()
    assert orthanc.transfer_syntax(iid) == "1.2.840.10008.1.2.4.90"
    ds = pydicom.dcmread(path)
    assert (
        instance_id(ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        == iid
    )
    again = orthanc.upload(path.read_bytes())
    assert (again.instance_id, again.status) == (iid, "AlreadyStored")
    orthanc.delete(iid)
    orthanc.delete(iid)  # already gone: not an error
    assert orthanc.transfer_syntax(iid) is None
    with pytest.raises(NotFound, match="not found"):
        orthanc.download(iid)


def test_failures_are_translated(source: OrthancServer) -> None:
    with pytest.raises(AccessDenied, match=r"HTTP 401, check source\.username and password"):
        client(source, password="wrong").last_change()
    with pytest.raises(Rejected, match="HTTP 400"):
        client(source).upload(b"not dicom at all")
    (port,) = free_ports(1)
    down = OrthancClient(ServerConfig(f"http://127.0.0.1:{port}"), "target", no_retry())
    with pytest.raises(ServerUnavailable, match=r"cannot reach http://127\.0\.0\.1:.*refused"):
        down.system()


class _Handler(http.server.BaseHTTPRequestHandler):
    """A stand-in server's request handler: quiet, and answers JSON in one call."""

    def answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _serving(handler: type[_Handler]) -> Iterator[str]:
    """A stand-in HTTP server on loopback for the block; yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _System(_Handler):
    """Answers /system like an Orthanc named "https"."""

    def do_GET(self) -> None:
        self.answer(b'{"Name": "https"}')


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An HTTPS server with a self-signed certificate for 127.0.0.1: its URL and that cert.

    Not Orthanc: Debian's Orthanc 1.10 resets every HTTPS connection after the handshake
    (SslEnabled, checked with curl), so sites terminate TLS in a reverse proxy in front of
    it, which is what this stands for.
    """
    workdir = tmp_path_factory.mktemp("https")
    key, cert = workdir / "key.pem", workdir / "cert.pem"
    request = "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1"
    names = "subjectAltName=IP:127.0.0.1"
    subprocess.run(
        ["openssl", *request.split(), "-addext", names, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _System)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert
    server.shutdown()
    server.server_close()


def test_https_checks_the_certificate_as_configured(
    https_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, cert = https_server
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)

    def name(verify: bool | str) -> object:
        config = ServerConfig(url, timeout=5, verify_tls=verify)
        return OrthancClient(config, "source", no_retry()).system()["Name"]

    assert name(str(cert)) == "https"
    with pytest.raises(Rejected, match=r"TLS error talking to https://127\.0\.0\.1.*verify"):
        name(True)  # the public CAs do not know this certificate
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    assert name(True) == "https"  # as requests would: the bundle the environment names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # urllib3 warns that nothing is checked: as asked
        monkeypatch.delenv("REQUESTS_CA_BUNDLE")
        assert name(False) == "https"


def test_a_socks_proxy_from_the_environment_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("http_proxy", "socks5://proxy.example:1080")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(ConfigError, match=r"source\.url: the environment's proxy"):
        OrthancClient(ServerConfig("http://pacs.example:8042"), "source", no_retry())


class _ClosesKeptAliveConnections(_Handler):
    """Answers the first request of each connection and closes it on the second unanswered:
    what a server that closes idle connections does when a request crosses the close."""

    protocol_version = "HTTP/1.1"
    answered = 0

    def do_GET(self) -> None:
        if getattr(self, "_served", False):
            self.close_connection = True
            return
        self._served = True
        self.answer(b'{"Name": "flaky"}')
        type(self).answered += 1


def test_a_kept_alive_connection_closed_under_a_request_is_not_a_server_problem() -> None:
    with _serving(_ClosesKeptAliveConnections) as url:
        orthanc = OrthancClient(ServerConfig(url, timeout=5), "source", no_retry())
        for _ in range(5):  # no retry policy: only the client's own resend
            assert orthanc.system()["Name"] == "flaky"
    assert _ClosesKeptAliveConnections.answered == 5


class _CutShort(_Handler):
    """Promises 100000 bytes, sends 10 and hangs up: a server that died mid-answer."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"0123456789")
        self.wfile.flush()
        self.close_connection = True


def test_a_download_cut_short_is_transient() -> None:
    with _serving(_CutShort) as url:
        cut = OrthancClient(ServerConfig(url, timeout=5), "source", no_retry())
        with pytest.raises(ServerUnavailable, match=r"download abc\): the answer .* cut short"):
            cut.download("abc")


def test_retry_policy_gives_up_after_its_bound_and_on_stop() -> None:
    (port,) = free_ports(1)
    stop = threading.Event()
    policy = RetryPolicy(stop, max_wait=0.5, initial=0.05, longest=0.1)
    down = OrthancClient(ServerConfig(f"http://127.0.0.1:{port}"), "source", policy)
    with pytest.raises(ServerUnavailable):
        down.system()
    stop.set()
    forever = OrthancClient(
        ServerConfig(f"http://127.0.0.1:{port}"), "source", RetryPolicy(stop, max_wait=None)
    )
    with pytest.raises(ServerUnavailable):
        forever.system()  # returns at once: the stop event ends the retries


class _ResetSource:
    """A change log that ends below the cursor, as after a database reset."""

    def changes(self, since: int, limit: int) -> ChangesPage:
        return ChangesPage([], True, 3)


def test_a_log_ending_below_the_cursor_is_a_reset() -> None:
    source = _ResetSource()
    with pytest.raises(FeedResetError, match="ends at 3 but the cursor is at 10"):
        list(
            feed.follow(
                source,  # type: ignore[arg-type]
                10,
                page_size=10,
                stop=threading.Event(),
                poll_interval=0.1,
                forever=False,
            )
        )


class _Node(_Handler):
    """One node of a stand-in Orthanc cluster: counts what it is asked, by path."""

    asked: ClassVar[list[tuple[str, str]]] = []  # (node, path), over the nodes of one test

    def do_GET(self) -> None:
        name = type(self).__name__
        self.asked.append((name, self.path.split("?")[0]))
        if self.path.startswith("/changes"):
            self.answer(b'{"Changes": [], "Done": true, "Last": 7}')
        else:
            self.answer(b"{}")


class _NodeA(_Node):
    pass


class _NodeB(_Node):
    pass


def test_requests_spread_over_the_nodes_and_the_feed_reads_one() -> None:
    _Node.asked = []
    with _serving(_NodeA) as a, _serving(_NodeB) as b:
        nodes = OrthancClient(ServerConfig(a, nodes=(a, b), timeout=5), "source", no_retry())
        for _ in range(4):
            nodes.system()
            nodes.last_change()
    systems = [name for name, path in _Node.asked if path == "/system"]
    feeds = {name for name, path in _Node.asked if path == "/changes"}
    assert sorted(systems) == ["_NodeA", "_NodeA", "_NodeB", "_NodeB"]
    assert feeds == {"_NodeA"}  # the first node, while it answers


def test_the_feed_moves_to_the_next_node_when_its_node_is_down() -> None:
    (down,) = free_ports(1)
    _Node.asked = []
    stop = threading.Event()
    retry = RetryPolicy(stop, max_wait=5, initial=0.01, longest=0.02)
    with _serving(_NodeB) as b:
        dead = f"http://127.0.0.1:{down}"
        nodes = OrthancClient(ServerConfig(dead, nodes=(dead, b), timeout=5), "source", retry)
        assert nodes.last_change() == 7  # refused by the first node, answered by the second
        assert nodes.last_change() == 7
        for _ in range(3):
            nodes.system()  # other requests: retried on the next node in turn
    assert [name for name, path in _Node.asked if path == "/changes"] == ["_NodeB", "_NodeB"]
    assert [name for name, path in _Node.asked if path == "/system"] == ["_NodeB"] * 3
