"""The only module that speaks HTTP: one Orthanc REST client with timeouts, auth and TLS.

Every failure is translated into the error tree: unreachable servers, timeouts and 5xx answers
become ServerUnavailable (retried), 404 becomes NotFound, other 4xx become Rejected. Every call
goes through the RetryPolicy it was given, so retries are declared in one place.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import requests
import urllib3

from bridge.config import ServerConfig
from bridge.errors import AccessDenied, NotFound, Rejected, ServerUnavailable
from bridge.retry import RetryPolicy

log = logging.getLogger(__name__)

DICOM = "application/dicom"


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
    """A client for one Orthanc server, named `role` ("source" or "target") in every error."""

    def __init__(self, server: ServerConfig, role: str, retry: RetryPolicy) -> None:
        self.server = server
        self.role = role
        self.retry = retry
        self._session = requests.Session()
        if server.username:
            self._session.auth = (server.username, server.password or "")
        self._session.verify = server.verify_tls
        self._session.headers["User-Agent"] = "orthanc-bridge"
        # Proxies, REQUESTS_CA_BUNDLE and ~/.netrc still apply as requests would apply them,
        # but are read once here instead of on every request (a quarter of its CPU per call).
        env = self._session.merge_environment_settings(server.url, {}, None, None, None)
        netrc = None if server.username else requests.utils.get_netrc_auth(server.url)
        self._session.trust_env = False
        self._session.proxies = env["proxies"]
        self._session.verify = env["verify"]
        if netrc:
            self._session.auth = netrc

    def close(self) -> None:
        """Release pooled connections."""
        self._session.close()

    def keep_connections(self, count: int) -> None:
        """Keep up to `count` connections open for reuse: one per thread sharing this client.

        requests keeps 10 per host by default; a thread beyond that would open (and close) a
        new connection for every request.
        """
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=max(count, 10))
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    # --- the change log -------------------------------------------------------------------

    def changes(self, since: int, limit: int) -> ChangesPage:
        """Rows after `since` (exclusive), at most `limit` of them."""
        body = self._json("GET", "/changes", params={"since": int(since), "limit": int(limit)})
        return _page(body)

    def last_change(self) -> int:
        """The highest sequence number in the change log."""
        return _page(self._json("GET", "/changes", params={"last": ""})).last

    # --- instances ------------------------------------------------------------------------

    def download(self, instance: str) -> bytes:
        """The stored DICOM file of `instance`, byte for byte."""
        path = f"/instances/{instance}/file"
        label = self._label("GET", path, f"download {instance}")
        # Not gzip: compressed pixel data does not shrink, and gzip would cost CPU on both
        # sides of a connection that is usually a LAN or the loopback.
        headers = {"Accept-Encoding": "identity"}
        return self.retry.call(lambda: self._body("GET", path, label, headers=headers), label)

    def upload(self, data: bytes | bytearray) -> Stored:
        """Store a DICOM file; Orthanc answers Success or AlreadyStored."""
        body = self._json(
            "POST",
            "/instances",
            data=data,
            headers={"Content-Type": DICOM, "Expect": ""},
            what="upload",
        )
        if not isinstance(body, dict) or "ID" not in body:
            raise Rejected(f"{self.role} Orthanc: unexpected answer to an upload: {body!r:.200}")
        return Stored(str(body["ID"]), str(body.get("Status", "")))

    def transfer_syntax(self, instance: str) -> str | None:
        """The transfer syntax UID the server holds `instance` in, or None if it lacks it."""
        try:
            response = self._call(
                "GET", f"/instances/{instance}/metadata/TransferSyntax", what=f"check {instance}"
            )
        except NotFound:
            return None
        return response.text.strip()

    def delete(self, instance: str) -> None:
        """Delete `instance`; deleting what is already gone is not an error."""
        try:
            self._call("DELETE", f"/instances/{instance}", what=f"delete {instance}")
        except NotFound:
            log.debug("%s: %s was already deleted", self.role, instance)

    def instance_ids(self, page: int = 10000) -> list[str]:
        """Every instance ID the server holds, read in pages."""
        ids: list[str] = []
        while True:
            body = self._json("GET", "/instances", params={"since": len(ids), "limit": page})
            if not isinstance(body, list):
                raise Rejected(f"{self.role} Orthanc: /instances did not answer a list")
            ids.extend(str(i) for i in body)
            if len(body) < page:
                return ids

    def system(self) -> dict[str, Any]:
        """The server's `/system` description (name, version); proves it is reachable."""
        body = self._json("GET", "/system")
        return body if isinstance(body, dict) else {}

    # --- plumbing -------------------------------------------------------------------------

    def _json(self, method: str, path: str, what: str | None = None, **kwargs: Any) -> Any:
        response = self._call(method, path, what=what, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise Rejected(
                f"{self.role} Orthanc: {method} {path} answered something that is not JSON"
            ) from None

    def _call(
        self, method: str, path: str, what: str | None = None, **kwargs: Any
    ) -> requests.Response:
        label = self._label(method, path, what)
        return self.retry.call(lambda: self._once(method, path, label, **kwargs), label)

    def _label(self, method: str, path: str, what: str | None) -> str:
        """How errors name a call: the server's role and what was being done."""
        return f"{self.role} Orthanc ({what or method + ' ' + path})"

    def _body(self, method: str, path: str, label: str, **kwargs: Any) -> bytes:
        """The whole body of a successful answer, read in one go; a cut-short body is retried."""
        response = self._once(method, path, label, stream=True, **kwargs)
        try:
            # `response.content` would read it in 10 KiB pieces, each through four layers of
            # Python: a third of the main process's CPU for a 180 KB download.
            return bytes(response.raw.read(decode_content=True))
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            reason = exc.args[0] if exc.args else type(exc).__name__
            raise ServerUnavailable(
                f"{label}: the answer from {self.server.url} was cut short: {reason}"
            ) from None
        finally:
            response.close()

    def _once(self, method: str, path: str, label: str, **kwargs: Any) -> requests.Response:
        url = self.server.url + path
        try:
            response = self._session.request(method, url, timeout=self.server.timeout, **kwargs)
        except requests.exceptions.SSLError as exc:
            # A certificate problem will not fix itself: retrying forever would hide it.
            raise Rejected(f"{label}: TLS error talking to {self.server.url}: {exc}") from None
        except requests.exceptions.Timeout:
            raise ServerUnavailable(
                f"{label}: no answer from {self.server.url} within {self.server.timeout:g} s"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise ServerUnavailable(
                f"{label}: cannot reach {self.server.url}: {_reason(exc)}"
            ) from None
        if response.status_code < 400:
            return response
        detail = _detail(response)
        if response.status_code >= 500:
            raise ServerUnavailable(f"{label}: HTTP {response.status_code}{detail}")
        if response.status_code == 404:
            raise NotFound(f"{label}: not found (HTTP 404){detail}")
        if response.status_code in (401, 403):
            raise AccessDenied(
                f"{label}: HTTP {response.status_code}, check {self.role}.username and password"
            )
        raise Rejected(f"{label}: HTTP {response.status_code}{detail}")


def _page(body: Any) -> ChangesPage:
    if not isinstance(body, dict) or "Changes" not in body:
        raise Rejected(f"/changes answered an unexpected body: {body!r:.200}")
    rows = [
        Change(int(c["Seq"]), str(c["ChangeType"]), str(c["ResourceType"]), str(c["ID"]))
        for c in body["Changes"]
    ]
    return ChangesPage(rows, bool(body.get("Done", True)), int(body.get("Last", 0)))


def _detail(response: requests.Response) -> str:
    """Orthanc's own explanation of an error, when it gave one."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return f": {text[:200]}" if text else ""
    if isinstance(body, dict):
        message = body.get("Details") or body.get("Message")
        if message:
            return f": {message}"
    return ""


def _reason(exc: requests.exceptions.RequestException) -> str:
    """The innermost cause, e.g. 'Connection refused', without urllib3's wrapping."""
    cause: BaseException | None = exc
    while cause is not None and cause.__context__ is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    text = str(exc)
    return text.rsplit(": ", 1)[-1].rstrip(")'\"") if text else type(exc).__name__
