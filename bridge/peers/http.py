"""The one HTTP layer: a pooled client with timeouts, auth and TLS, every failure translated.

Unreachable servers, timeouts and 5xx answers become ServerUnavailable (retried), refused
credentials AccessDenied, 404 NotFound, other 4xx Rejected. Every retried call goes through
the RetryPolicy the client was given, so retries are declared in one place. The Orthanc REST
client (bridge.peers.orthanc) and the DICOMweb client (bridge.peers.dicomweb) are built on it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast
from urllib.parse import urlencode

import requests
import urllib3

from bridge import memfile
from bridge.config import ServerConfig
from bridge.errors import (
    AccessDenied,
    ConfigError,
    NotFound,
    Rejected,
    ServerUnavailable,
)
from bridge.peers.peer import Answers
from bridge.peers.retry import RetryPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")
# Query parameters: a mapping, or pairs when a name repeats (QIDO-RS's includefield).
Params = Mapping[str, int | str] | Sequence[tuple[str, int | str]]


@dataclass(frozen=True)
class Answer:
    """An answer the client did not translate into an error: its status, headers and body."""

    status: int
    headers: Mapping[str, str]
    data: bytes
    # With `big`: a 2xx body of memfile.BIG bytes or more, read into a memory file (data b"").
    view: memoryview | None = None


class HttpClient(Answers):
    """A client for one HTTP server, named `role` (e.g. "source", "target") in every error.

    It speaks HTTP through urllib3, the library under requests, called directly: requests
    cost 0.45 ms of CPU per call against urllib3's 0.22, and the bridge makes two calls per
    instance on the main process's one core. requests still decides, once, what applies from
    the environment as it would: proxies, REQUESTS_CA_BUNDLE and ~/.netrc.

    A bearer `token`, when given, replaces basic auth. Subclasses choose the node a request
    goes to (`_node`, `_node_failed`: an Orthanc cluster has several) and name the kind of
    server (`what`), in messages too.
    """

    what = "server"  # its kind, as people say it, after its role in messages: "target Orthanc"

    def __init__(
        self, server: ServerConfig, role: str, retry: RetryPolicy, token: str | None = None
    ) -> None:
        super().__init__(role)
        self.server = server
        self.retry = retry
        self._headers = {"User-Agent": "orthanc-bridge"}
        auth = (
            (server.username, server.password or "")
            if server.username
            else requests.utils.get_netrc_auth(server.url)
        )
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        elif auth:
            self._headers.update(urllib3.make_headers(basic_auth=f"{auth[0]}:{auth[1]}"))
        self._credentials = f"{role}'s token" if token else f"{role}.username and password"
        self._timeout = urllib3.Timeout(server.timeout)
        self._proxy = requests.utils.select_proxy(
            server.url, requests.utils.get_environ_proxies(server.url)
        )
        self._http = self._manager(10)

    @property
    def address(self) -> str:
        """The URL of its first node."""
        return self.server.url

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

    # --- plumbing -------------------------------------------------------------------------

    def _label(self, method: str, path: str, call: str | None) -> str:
        """How errors name a call: "target Orthanc (upload)"."""
        return f"{self.role} {self.what} ({call or method + ' ' + path})"

    def _json(self, method: str, path: str, what: str | None = None, **kwargs: Any) -> Any:
        body = self._call(method, path, what=what, **kwargs)
        try:
            return json.loads(body)
        except ValueError:
            raise Rejected(
                f"{self.role} {self.what}: {method} {path} answered something that is not JSON"
            ) from None

    def _call(self, method: str, path: str, what: str | None = None, **kwargs: Any) -> bytes:
        """The body of a successful answer, with retries as the policy declares them."""
        label = self._label(method, path, what)
        return self.retry.call(lambda: self._once(method, path, label, **kwargs), self.role)

    def _once(self, method: str, path: str, label: str, **kwargs: Any) -> bytes:
        """One request and its answer, noting whether the server answered well."""
        return self._noted(lambda: self._request(method, path, label, **kwargs))

    def _noted(self, request: Callable[[], T]) -> T:
        """`request()`'s result, noting whether the server answered well."""
        try:
            result = request()
        except (ServerUnavailable, AccessDenied) as exc:
            self._failed(exc)
            raise
        except Rejected:
            self._answered()  # an answer, if not the one hoped for (404 for a deleted instance)
            raise
        self._answered()
        return result

    def _request(self, method: str, path: str, label: str, **kwargs: Any) -> bytes:
        """The body of a 2xx answer; any other answer raised as its error."""
        answer = self._exchange(method, path, label, **kwargs)
        if answer.status < 300:
            return answer.data
        self._refused(answer, label)

    def _refused(self, answer: Answer, label: str) -> NoReturn:
        """Raise a 4xx answer as its error (NotFound for 404)."""
        detail = error_detail(answer.data)
        if answer.status == 404:
            raise NotFound(f"{label}: not found (HTTP 404){detail}")
        raise Rejected(f"{label}: HTTP {answer.status}{detail}")

    def _exchange(
        self,
        method: str,
        path: str,
        label: str,
        *,
        body: bytes | bytearray | memoryview | None = None,
        headers: dict[str, str] | None = None,
        params: Params | None = None,
        big: bool = False,
    ) -> Answer:
        """One request: failures to answer, redirects, 5xx and refused credentials raised as
        their errors; any other answer (2xx, 4xx) returned for the caller to read."""
        base = self._node(path)
        url = base + path + (f"?{urlencode(params)}" if params else "")
        try:
            response = self._send(method, url, body, headers)
            view: memoryview | None = None
            try:
                length = response.length_remaining if big and response.status < 300 else None
                if length is not None and length >= memfile.BIG and memfile.SUPPORTED:
                    data, view = b"", memfile.receive(response, length)
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
        if 300 <= status < 400:
            where = response.headers.get("Location", "elsewhere")
            raise Rejected(
                f"{label}: HTTP {status}, redirected to {where}; "
                f"set {self.role}.url to the address {self.what} itself answers on"
            )
        if status >= 500:
            # On an Orthanc cluster, 503 "could not serialize access" is a transaction that
            # lost a race with another node's: transient, like any 5xx, and the node is up.
            self._node_failed(path, base, unreachable=False)
            raise ServerUnavailable(f"{label}: HTTP {status}{error_detail(data)}")
        if status in (401, 403):
            raise AccessDenied(f"{label}: HTTP {status}, check {self._credentials}")
        return Answer(status, response.headers, data, view)

    def _node(self, path: str) -> str:
        """The node to send a request for `path` to."""
        return self.server.url

    def _node_failed(self, path: str, base: str, unreachable: bool = True) -> None:
        """Called after node `base` failed a request for `path` (for clusters)."""

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


def error_detail(body: bytes) -> str:
    """The server's own explanation of an error (Orthanc's Details or Message), if any."""
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
