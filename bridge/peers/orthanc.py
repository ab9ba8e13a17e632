"""The only module that speaks HTTP: one Orthanc REST client with timeouts, auth and TLS.

Every failure is translated into the error tree: unreachable servers, timeouts and 5xx answers
become ServerUnavailable (retried), 404 becomes NotFound, other 4xx become Rejected. Every call
goes through the RetryPolicy it was given, so retries are declared in one place.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlencode

import requests
import urllib3

from bridge import memfile, metrics
from bridge.config import ServerConfig
from bridge.errors import (
    AccessDenied,
    BridgeError,
    ConfigError,
    NotFound,
    Rejected,
    ServerUnavailable,
)
from bridge.peers.retry import RetryPolicy

log = logging.getLogger(__name__)

DICOM = "application/dicom"
# How long a node of a cluster that could not be reached is left out of the turns.
_NODE_REST_SECONDS = 10.0


@dataclass(frozen=True)
class Change:
    """One row of Orthanc's change log."""

    seq: int
    change_type: str
    resource_type: str
    resource_id: str


@dataclass(frozen=True)
class ChangesPage:
    """One page of `/changes`: its rows, whether more follow, and the log's last sequence."""

    changes: list[Change]
    done: bool
    last: int


@dataclass(frozen=True)
class Stored:
    """What Orthanc answered to an upload."""

    instance_id: str
    status: str


def instance_id(patient_id: str, study: str, series: str, sop: str) -> str:
    """Orthanc's ID of an instance: SHA-1 of its four identifiers, in five groups of eight."""
    digest = hashlib.sha1(f"{patient_id}|{study}|{series}|{sop}".encode()).hexdigest()
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


class OrthancClient:
    """A client for one Orthanc server, named `role` ("source" or "target") in every error.

    It speaks HTTP through urllib3, the library under requests, called directly: requests
    cost 0.45 ms of CPU per call against urllib3's 0.22, and the bridge makes two calls per
    instance on the main process's one core. requests still decides, once, what applies from
    the environment as it would: proxies, REQUESTS_CA_BUNDLE and ~/.netrc.

    A server with several nodes (an Orthanc cluster on one database) gets its requests in
    turn, so that transfers spread over them and a retry goes to the next node; the change
    log is read from one node, the next one only when it stops answering.
    """

    what = "Orthanc"

    def __init__(self, server: ServerConfig, role: str, retry: RetryPolicy) -> None:
        self.server = server
        self.role = role
        self.retry = retry
        self._headers = {"User-Agent": "orthanc-bridge"}
        auth = (
            (server.username, server.password or "")
            if server.username
            else requests.utils.get_netrc_auth(server.url)
        )
        if auth:
            self._headers.update(urllib3.make_headers(basic_auth=f"{auth[0]}:{auth[1]}"))
        self._timeout = urllib3.Timeout(server.timeout)
        self._proxy = requests.utils.select_proxy(
            server.url, requests.utils.get_environ_proxies(server.url)
        )
        self._http = self._manager(10)
        self._turns = itertools.count()  # next() is atomic: threads share it without a lock
        self._feed_node = 0  # the node the change log is read from
        # Nodes that could not be reached, until when they are left out of the turns.
        self._resting: dict[str, float] = {}
        # Monotonic times of the latest good answer and the latest failure (unreachable,
        # timeout, 5xx, credentials refused), for health checks and the status page.
        self.last_answer: float | None = None
        self.last_failure: float | None = None
        self.last_error: str | None = None

    @property
    def address(self) -> str:
        """The URL of its first node."""
        return self.server.url

    @property
    def up(self) -> bool | None:
        """True when the latest answer was a good one; None before any request."""
        if self.last_failure is None:
            return None if self.last_answer is None else True
        return self.last_answer is not None and self.last_answer > self.last_failure

    def _answered(self) -> None:
        self.last_answer = time.monotonic()
        metrics.SERVER_UP.labels(self.role).set(1)

    def _failed(self, error: BridgeError) -> None:
        self.last_error = str(error)
        self.last_failure = time.monotonic()
        metrics.SERVER_UP.labels(self.role).set(0)

    def probe(self) -> None:
        """One request, never retried, that proves the server answers (health checks)."""
        self._once("GET", "/system", f"{self.role} Orthanc (health check)")

    def _manager(self, connections: int) -> urllib3.PoolManager:
        tls = _tls_options(self.server.verify_tls)
        if not self._proxy:
            return urllib3.PoolManager(maxsize=connections, **tls)
        user, password = requests.utils.get_auth_from_url(self._proxy)
        headers = urllib3.make_headers(proxy_basic_auth=f"{user}:{password}") if user else None
        try:
            return urllib3.ProxyManager(
                self._proxy, maxsize=connections, proxy_headers=headers, **tls
            )
        except urllib3.exceptions.ProxySchemeUnknown:
            raise ConfigError(
                f"{self.role}.url: the environment's proxy for it, {self._proxy}, is not an "
                "http(s) proxy; set no_proxy to bypass it"
            ) from None

    def close(self) -> None:
        """Release pooled connections."""
        self._http.clear()

    def keep_connections(self, count: int) -> None:
        """Keep up to `count` connections open for reuse: one per thread sharing this client.

        A pool keeps 10 by default; a thread beyond that would open (and close) a new
        connection for every request.
        """
        self._http.clear()
        self._http = self._manager(max(count, 10))

    # --- the change log -------------------------------------------------------------------

    def changes(self, since: int, limit: int) -> ChangesPage:
        """Rows after `since` (exclusive), at most `limit` of them."""
        body = self._json("GET", "/changes", params={"since": int(since), "limit": int(limit)})
        return _page(body)

    def last_change(self) -> int:
        """The highest sequence number in the change log."""
        return _page(self._json("GET", "/changes", params={"last": ""})).last

    # --- instances ------------------------------------------------------------------------

    def download(self, instance: str) -> bytes | memoryview:
        """The stored DICOM file of `instance`, byte for byte: a big one in a memory file
        (bridge.memfile), seen through a view of it."""
        # Asked without Accept-Encoding, so not gzipped: compressed pixel data does not
        # shrink, and gzip would cost CPU on both sides of what is usually a LAN or loopback.
        label = f"{self.role} Orthanc (download {instance})"
        path = f"/instances/{instance}/file"
        data = self.retry.call(lambda: self._once("GET", path, label, big=True), self.role)
        metrics.BYTES.labels("downloaded").inc(len(data))
        return data

    def upload(self, data: bytes | bytearray | memoryview) -> Stored:
        """Store a DICOM file; Orthanc answers Success or AlreadyStored."""
        body = self._json(
            "POST",
            "/instances",
            body=data,
            headers={"Content-Type": DICOM},
            what="upload",
        )
        if not isinstance(body, dict) or "ID" not in body:
            raise Rejected(f"{self.role} Orthanc: unexpected answer to an upload: {body!r:.200}")
        metrics.BYTES.labels("uploaded").inc(len(data))
        return Stored(str(body["ID"]), str(body.get("Status", "")))

    def transfer_syntax(self, instance: str) -> str | None:
        """The transfer syntax UID the server holds `instance` in, or None if it lacks it."""
        try:
            body = self._call(
                "GET", f"/instances/{instance}/metadata/TransferSyntax", what=f"check {instance}"
            )
        except NotFound:
            return None
        return body.decode("ascii", "replace").strip()

    def delete(self, instance: str) -> None:
        """Delete `instance`; deleting what is already gone is not an error."""
        try:
            self._call("DELETE", f"/instances/{instance}", what=f"delete {instance}")
        except NotFound:
            log.debug("%s: %s was already deleted", self.role, instance)

    def instance_pages(self, page: int = 10000) -> Iterator[list[str]]:
        """Every instance ID the server holds, one page of at most `page` IDs at a time (in
        Orthanc's order, by its internal id: not sorted by ID)."""
        since = 0
        while True:
            body = self._json("GET", "/instances", params={"since": since, "limit": page})
            if not isinstance(body, list):
                raise Rejected(f"{self.role} Orthanc: /instances did not answer a list")
            ids = [str(i) for i in body]
            if ids:
                yield ids
            since += len(ids)
            if len(ids) < page:
                return

    def count_instances(self) -> int:
        """How many instances the server holds (`/statistics`); 0 if it does not say."""
        body = self._json("GET", "/statistics")
        count = body.get("CountInstances") if isinstance(body, dict) else None
        return count if isinstance(count, int) and count >= 0 else 0

    def read(self, path: str) -> Any:
        """GET `path` (with its query): the JSON answer, or its text if it is not JSON (the raw
        value of a tag, from /instances/{id}/content/{tag}). For routing rules."""
        body = self._call("GET", path)
        try:
            return json.loads(body)
        except ValueError:
            return body.decode("utf-8", "replace")

    def system(self) -> dict[str, Any]:
        """The server's `/system` description (name, version); proves it is reachable."""
        body = self._json("GET", "/system")
        return body if isinstance(body, dict) else {}

    # --- plumbing -------------------------------------------------------------------------

    def _json(self, method: str, path: str, what: str | None = None, **kwargs: Any) -> Any:
        body = self._call(method, path, what=what, **kwargs)
        try:
            return json.loads(body)
        except ValueError:
            raise Rejected(
                f"{self.role} Orthanc: {method} {path} answered something that is not JSON"
            ) from None

    def _call(self, method: str, path: str, what: str | None = None, **kwargs: Any) -> bytes:
        """The body of a successful answer, with retries as the policy declares them."""
        label = f"{self.role} Orthanc ({what or method + ' ' + path})"
        # Bytes: only a download asks for a body that may come in a memory file (`big`).
        return cast(
            bytes, self.retry.call(lambda: self._once(method, path, label, **kwargs), self.role)
        )

    def _once(self, method: str, path: str, label: str, **kwargs: Any) -> bytes | memoryview:
        """One request and its answer, noting whether the server answered well."""
        try:
            data = self._request(method, path, label, **kwargs)
        except (ServerUnavailable, AccessDenied) as exc:
            self._failed(exc)
            raise
        except Rejected:
            self._answered()  # an answer, if not the one hoped for (404 for a deleted instance)
            raise
        self._answered()
        return data

    def _request(
        self,
        method: str,
        path: str,
        label: str,
        *,
        body: bytes | bytearray | memoryview | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, int | str] | None = None,
        big: bool = False,
    ) -> bytes | memoryview:
        """The body of the answer; with `big`, a body of memfile.BIG bytes or more is read
        into a memory file."""
        base = self._node(path)
        url = base + path + (f"?{urlencode(params)}" if params else "")
        try:
            response = self._send(method, url, body, headers)
            try:
                length = response.length_remaining if big and response.status < 300 else None
                if length is not None and length >= memfile.BIG and memfile.SUPPORTED:
                    data: bytes | memoryview = memfile.receive(response, length)
                else:
                    data = response.read()
            finally:
                response.release_conn()
        except urllib3.exceptions.SSLError as exc:
            # A certificate problem will not fix itself: retrying forever would hide it.
            raise Rejected(f"{label}: TLS error talking to {base}: {exc}") from None
        except urllib3.exceptions.NewConnectionError as exc:  # before TimeoutError: a subclass
            self._node_failed(path, base)
            raise ServerUnavailable(f"{label}: cannot reach {base}: {_reason(exc)}") from None
        except urllib3.exceptions.TimeoutError:
            self._node_failed(path, base)
            raise ServerUnavailable(
                f"{label}: no answer from {base} within {self.server.timeout:g} s"
            ) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # The connection dropped, before or during the answer (a server that died).
            self._node_failed(path, base)
            raise ServerUnavailable(
                f"{label}: the answer from {base} was cut short: {_reason(exc)}"
            ) from None
        status = response.status
        if status < 300:
            return data
        if status < 400:
            where = response.headers.get("Location", "elsewhere")
            raise Rejected(
                f"{label}: HTTP {status}, redirected to {where}; "
                f"set {self.role}.url to the address Orthanc itself answers on"
            )
        detail = _detail(bytes(data))  # bytes already: only a good answer is a memory file
        if status >= 500:
            # On an Orthanc cluster, 503 "could not serialize access" is a transaction that
            # lost a race with another node's: transient, like any 5xx, and the node is up.
            self._node_failed(path, base, unreachable=False)
            raise ServerUnavailable(f"{label}: HTTP {status}{detail}")
        if status == 404:
            raise NotFound(f"{label}: not found (HTTP 404){detail}")
        if status in (401, 403):
            raise AccessDenied(f"{label}: HTTP {status}, check {self.role}.username and password")
        raise Rejected(f"{label}: HTTP {status}{detail}")

    def _node(self, path: str) -> str:
        """The node to send a request for `path` to."""
        nodes = self.server.nodes
        if len(nodes) == 1:
            return nodes[0]
        if path == "/changes":
            return nodes[self._feed_node % len(nodes)]
        now = time.monotonic()
        for _ in nodes:  # the next node in turn that is not resting, if any
            node = nodes[next(self._turns) % len(nodes)]
            if self._resting.get(node, 0.0) <= now:
                return node
        return node  # all resting: try them in turn all the same

    def _node_failed(self, path: str, base: str, unreachable: bool = True) -> None:
        """After a node failed: leave it out of the turns for a while if it could not be
        reached, and read the change log from the next node if it was the log's node."""
        nodes = self.server.nodes
        if len(nodes) == 1:
            return
        if unreachable:
            self._resting[base] = time.monotonic() + _NODE_REST_SECONDS
        if path == "/changes" and nodes[self._feed_node % len(nodes)] == base:
            self._feed_node += 1
            log.warning(
                "%s: %s does not answer; reading the change log from %s",
                self.role,
                base,
                nodes[self._feed_node % len(nodes)],
            )

    def _send(
        self,
        method: str,
        url: str,
        body: bytes | bytearray | memoryview | None,
        headers: dict[str, str] | None,
    ) -> urllib3.BaseHTTPResponse:
        """Send a request; its answer's body is left to read. Redirects are refused, and
        retries are the RetryPolicy's but for one case, below."""

        def send() -> urllib3.BaseHTTPResponse:
            return self._http.request(
                method,
                url,
                # bytearray is sent as it is (urllib3 takes any buffer), not copied.
                body=cast(bytes | None, body),
                headers={**self._headers, **headers} if headers else self._headers,
                timeout=self._timeout,
                retries=False,
                redirect=False,
                preload_content=False,
            )

        try:
            return send()
        except urllib3.exceptions.ProtocolError:
            # Closed before any answer: mostly a kept-alive connection that the server closed
            # as the request went out (an idle `run` met this every 8 s or so). Sent again at
            # once on a new connection, not logged as a server problem; safe because every
            # call is idempotent (an upload sent again is AlreadyStored).
            return send()


def _tls_options(verify: bool | str) -> dict[str, Any]:
    """urllib3's certificate settings for `verify_tls`, as requests would apply them."""
    if verify is False:
        return {"cert_reqs": "CERT_NONE"}
    if verify is True:
        verify = (
            os.environ.get("REQUESTS_CA_BUNDLE")
            or os.environ.get("CURL_CA_BUNDLE")
            or requests.utils.DEFAULT_CA_BUNDLE_PATH
        )
    if os.path.isdir(verify):
        return {"cert_reqs": "CERT_REQUIRED", "ca_cert_dir": verify}
    return {"cert_reqs": "CERT_REQUIRED", "ca_certs": verify}


def _page(body: Any) -> ChangesPage:
    if not isinstance(body, dict) or "Changes" not in body:
        raise Rejected(f"/changes answered an unexpected body: {body!r:.200}")
    rows = [
        Change(int(c["Seq"]), str(c["ChangeType"]), str(c["ResourceType"]), str(c["ID"]))
        for c in body["Changes"]
    ]
    return ChangesPage(rows, bool(body.get("Done", True)), int(body.get("Last", 0)))


def _detail(body: bytes) -> str:
    """Orthanc's own explanation of an error, when it gave one."""
    try:
        answer = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return f": {text[:200]}" if text else ""
    if isinstance(answer, dict):
        message = answer.get("Details") or answer.get("Message")
        if message:
            return f": {message}"
    return ""


def _reason(exc: BaseException) -> str:
    """The innermost cause, e.g. 'Connection refused', without urllib3's wrapping."""
    cause: BaseException | None = exc
    while cause is not None and cause.__context__ is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    if isinstance(cause, OSError) and (cause.strerror or str(cause)):
        return cause.strerror or str(cause)  # e.g. "Remote end closed connection without response"
    text = str(exc)
    return text.rsplit(": ", 1)[-1].rstrip(")'\"") if text else type(exc).__name__
