"""The Orthanc REST client, on the one HTTP layer (bridge.peers.http): timeouts, auth, TLS.

Every failure is translated into the error tree: unreachable servers, timeouts and 5xx answers
become ServerUnavailable (retried), 404 becomes NotFound, other 4xx become Rejected. Every call
goes through the RetryPolicy it was given, so retries are declared in one place.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bridge import metrics
from bridge.config import ServerConfig
from bridge.errors import NotFound, Rejected
from bridge.peers.http import HttpClient
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


class OrthancClient(HttpClient):
    """A client for one Orthanc server, named `role` ("source" or "target") in every error.

    A server with several nodes (an Orthanc cluster on one database) gets its requests in
    turn, so that transfers spread over them and a retry goes to the next node; the change
    log is read from one node, the next one only when it stops answering.
    """

    what = "Orthanc"

    def __init__(self, server: ServerConfig, role: str, retry: RetryPolicy) -> None:
        super().__init__(server, role, retry)
        self._turns = itertools.count()  # next() is atomic: threads share it without a lock
        self._feed_node = 0  # the node the change log is read from
        # Nodes that could not be reached, until when they are left out of the turns.
        self._resting: dict[str, float] = {}

    def probe(self) -> None:
        """One request, never retried, that proves the server answers (health checks)."""
        self._once("GET", "/system", f"{self.role} Orthanc (health check)")

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
        label = self._label("GET", "", f"download {instance}")
        path = f"/instances/{instance}/file"

        def once() -> bytes | memoryview:
            answer = self._exchange("GET", path, label, big=True)
            if answer.status >= 300:
                self._refused(answer, label)
            return answer.view if answer.view is not None else answer.data

        data = self.retry.call(lambda: self._noted(once), self.role)
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


def _page(body: Any) -> ChangesPage:
    if not isinstance(body, dict) or "Changes" not in body:
        raise Rejected(f"/changes answered an unexpected body: {body!r:.200}")
    rows = [
        Change(int(c["Seq"]), str(c["ChangeType"]), str(c["ResourceType"]), str(c["ID"]))
        for c in body["Changes"]
    ]
    return ChangesPage(rows, bool(body.get("Done", True)), int(body.get("Last", 0)))
