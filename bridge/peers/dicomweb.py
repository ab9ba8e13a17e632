"""A DICOMweb archive as a target: STOW-RS stores, WADO-RS verifies, QIDO-RS answers and lists.

The client speaks to a service root (`http://host:8042/dicom-web`) through the one HTTP layer
(bridge.peers.http): the same timeouts, TLS, proxies and error translation as the Orthanc client,
with basic auth or a bearer token.

How a STOW-RS answer is read, per instance (PS3.18 10.5): listed in the Failed SOP Sequence
(0008,1198), it failed with its Failure Reason (0008,1197); listed in the Referenced SOP
Sequence (0008,1199), it was stored, with its Warning Reason (0008,1196) if any; listed in
neither, it was not stored. The HTTP status (200, 202 partial, 409 all failed, 400 some
unreadable) does not decide: the lists do. An answer about several instances that leaves one
unexplained (not listed, or not DICOM JSON at all) is not trusted for it: that instance is sent
again alone, at once, so that the answer is about it alone (Orthanc's plugin 1.7 stops reading
a request at the first instance it cannot store and lists none of the rest). Alone:

- listed in neither sequence of a DICOM JSON answer: not stored, permanent (StoreFailed);
- a 4xx answer that is not DICOM JSON: refused, permanent (413 splits a batch first);
- a 2xx answer that is not DICOM JSON: transient. The archive took the request, but what it
  kept cannot be told; sending it again is harmless (a STOW-RS of an instance the archive
  holds stores it again), and a proxy's error page or a glitch should not fail instances;
- Failure Reason A7xx (out of resources) is transient; every other code is permanent.

5xx answers, connection failures and timeouts fail the whole request (ServerUnavailable), and
401/403 too (AccessDenied). Nothing here retries a request: Batcher.store does, through the
client's RetryPolicy, per instance.

Checked against Orthanc's plugin (1.7 on Orthanc 1.10, 1.20 on 1.12): neither reports the
transfer syntax it holds an instance in, in WADO-RS metadata ((0002,0010), (0008,3002)) or in
QIDO-RS, so there verification proves presence only; an archive that reports it is checked.
Both report an instance that a Lua ReceivedInstanceFilter dropped as stored (Referenced SOP
Sequence): only the WADO-RS check finds that it is not.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, cast
from urllib.parse import quote

from bridge import metrics
from bridge.config import ServerConfig
from bridge.dicom.header import Identifiers, identifiers
from bridge.errors import (
    NotFound,
    Rejected,
    VerificationFailed,
)
from bridge.peers.dicomjson import (
    AVAILABLE_SYNTAXES,
    DICOM_JSON,
    LISTED,
    SOP_INSTANCE,
    TRANSFER_SYNTAX,
    StoreOutcome,
    StowAnswer,
    first,
    parse_stow,
    status_meaning,
    transient_failure,
    values,
)
from bridge.peers.http import Answer, HttpClient, error_detail
from bridge.peers.orthanc import instance_id
from bridge.peers.retry import RetryPolicy

log = logging.getLogger(__name__)

_Item = tuple[
    int, Identifiers, bytes | bytearray | memoryview
]  # (index in the caller's list, UIDs, file)


class DicomWebClient(HttpClient):
    """A client for one DICOMweb service, named `role` (the target's name) in every error.

    `server.url` is the service root; `token`, when given, is sent as a bearer token instead
    of basic auth.
    """

    what = "DICOMweb archive"

    def __init__(
        self, server: ServerConfig, role: str, retry: RetryPolicy, token: str | None = None
    ) -> None:
        super().__init__(server, role, retry, token)
        # The smallest request the archive refused as too large (413): larger batches are
        # split before they are sent, not after each is refused (nginx's default limit is
        # 1 MiB: every batch would otherwise cost several refused uploads).
        self._refused_bytes: int | None = None

    def probe(self) -> None:
        """One QIDO-RS request, never retried, that proves the archive answers (health checks)."""
        label = self._label("GET", "/studies", "health check")
        self._once("GET", "/studies", label, params={"limit": 1}, headers=_ACCEPT_JSON)

    # --- STOW-RS --------------------------------------------------------------------------

    def store_batch(
        self, instances: Sequence[bytes | bytearray | memoryview]
    ) -> list[StoreOutcome]:
        """Store DICOM files with one STOW-RS request (more when the archive asks, see the
        module); the outcome of each, in order. Never retried: a request that fails as a
        whole raises (ServerUnavailable, AccessDenied, Rejected)."""
        outcomes: list[StoreOutcome | None] = [None] * len(instances)
        items: list[_Item] = []
        for index, data in enumerate(instances):
            found = identifiers(data)
            if found is None:
                outcomes[index] = StoreOutcome(
                    None,
                    False,
                    f"{self.role} {self.what}: not sent, its study, series and SOP instance "
                    "UIDs cannot be read from the file",
                )
            else:
                items.append((index, found, data))
        if items:
            self._store(items, outcomes)
        return cast(list[StoreOutcome], outcomes)  # each one set, by now

    def _store(self, items: list[_Item], outcomes: list[StoreOutcome | None]) -> None:
        size = sum(len(data) for _, _, data in items)
        refused = self._refused_bytes
        if len(items) > 1 and refused is not None and size >= refused:
            half = len(items) // 2
            self._store(items[:half], outcomes)
            self._store(items[half:], outcomes)
            return
        answer = self._post(items)
        if answer.status == 413 and len(items) > 1:
            self._refused_bytes = min(size, refused or size)
            log.info(
                "%s: %d instances (%.1f MiB) are too large for one request (HTTP 413); "
                "sending them in two, and no request that large again",
                self.role,
                len(items),
                size / 2**20,
            )
            self._store(items, outcomes)
            return
        listed = parse_stow(answer.data)
        unexplained = []
        for item in items:
            outcome = self._outcome(item[1], answer, listed, alone=len(items) == 1)
            if outcome is None:
                unexplained.append(item)
                continue
            outcomes[item[0]] = outcome
            if outcome.stored:
                metrics.BYTES.labels("uploaded").inc(len(item[2]))
        if unexplained:
            log.info(
                "%s: its answer (HTTP %d) to %d instances does not explain %d; sending each "
                "of those alone",
                self.role,
                answer.status,
                len(items),
                len(unexplained),
            )
        for item in unexplained:
            self._store([item], outcomes)

    def _post(self, items: list[_Item]) -> Answer:
        """One STOW-RS request carrying `items`; its answer, whatever the status but 5xx."""
        # A random 128-bit boundary: no file can contain it but by a chance not worth a scan.
        boundary = uuid.uuid4().hex
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        chunks: list[bytes | bytearray | memoryview] = []
        for _, _, data in items:
            chunks += [head, data, b"\r\n"]
        chunks.append(f"--{boundary}--\r\n".encode())
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": DICOM_JSON,
        }
        label = self._label("POST", "/studies", f"store {len(items)} instances")
        body = b"".join(chunks)
        return self._noted(
            lambda: self._exchange("POST", "/studies", label, body=body, headers=headers)
        )

    def _outcome(
        self, instance: Identifiers, answer: Answer, listed: StowAnswer | None, alone: bool
    ) -> StoreOutcome | None:
        """What `answer` says of `instance`; None when it does not tell and others shared it."""
        name, status, uid = f"{self.role} {self.what}", answer.status, instance.sop_instance
        if listed is not None and uid in listed.failed:
            code = listed.failed[uid]
            if code is None:
                return StoreOutcome(
                    instance, False, f"{name} did not store it (HTTP {status}; no reason given)"
                )
            return StoreOutcome(
                instance,
                False,
                f"{name} did not store it: failure reason {code:04X}, {status_meaning(code)} "
                f"(HTTP {status})",
                transient_failure(code),
            )
        if listed is not None and uid in listed.stored:
            code = listed.stored[uid]
            warning = "" if code is None else f"warning {code:04X}, {status_meaning(code)}"
            return StoreOutcome(instance, True, warning)
        if not alone:
            return None
        if listed is not None:
            return StoreOutcome(
                instance,
                False,
                f"{name}: its answer (HTTP {status}) lists it neither as stored nor as "
                "failed: not stored",
            )
        if status >= 400:
            return StoreOutcome(
                instance, False, f"{name} refused it: HTTP {status}{error_detail(answer.data)}"
            )
        kind = answer.headers.get("Content-Type") or "no content type"
        return StoreOutcome(
            instance,
            False,
            f"{name} answered HTTP {status} with something that is not DICOM JSON ({kind})"
            f"{error_detail(answer.data)}; it is sent again later",
            transient=True,
        )

    # --- WADO-RS --------------------------------------------------------------------------

    def metadata(self, instance: Identifiers) -> dict[str, Any] | None:
        """The WADO-RS metadata (DICOM JSON) of `instance`; None when the archive lacks it."""
        path = "/".join(
            (
                "/studies",
                quote(instance.study, safe=""),
                "series",
                quote(instance.series, safe=""),
                "instances",
                quote(instance.sop_instance, safe=""),
                "metadata",
            )
        )
        try:
            body = self._call(
                "GET", path, what=f"metadata of {instance.sop_instance}", headers=_ACCEPT_JSON
            )
        except NotFound:
            return None
        try:
            document = json.loads(body) if body.strip() else []  # 204: none
        except ValueError:
            raise Rejected(
                f"{self.role} {self.what}: the metadata of {instance.sop_instance} is not JSON"
            ) from None
        for dataset in document if isinstance(document, list) else [document]:
            if isinstance(dataset, dict) and first(dataset.get(SOP_INSTANCE)) == (
                instance.sop_instance
            ):
                return dataset
        return None

    def verify(self, instance: Identifiers, syntax: str) -> str | None:
        """Check that the archive holds `instance`, in transfer syntax `syntax` when it says
        which (0002,0010, or 0008,3002 Available Transfer Syntax UID); the syntax it reported,
        None when it reports none. Raises VerificationFailed."""
        found = self.metadata(instance)
        if found is None:
            raise VerificationFailed(
                f"after upload {self.role} does not hold it: no WADO-RS metadata for "
                f"SOP instance {instance.sop_instance}"
            )
        held = first(found.get(TRANSFER_SYNTAX))
        if isinstance(held, str) and held:
            if held != syntax:
                raise VerificationFailed(
                    f"after upload {self.role} holds it as {held}, expected {syntax}"
                )
            return held
        available = [uid for uid in values(found.get(AVAILABLE_SYNTAXES)) if uid]
        if available and syntax not in available:
            raise VerificationFailed(
                f"after upload {self.role} offers it as {', '.join(map(str, available))}, "
                f"not {syntax}"
            )
        return syntax if available else None

    # --- QIDO-RS --------------------------------------------------------------------------

    def instance_pages(self, page: int = 1000) -> Iterator[list[str]]:
        """The Orthanc ID (bridge.peers.orthanc.instance_id) of every instance QIDO-RS lists, one
        page of at most `page` at a time, paged with limit and offset."""
        fields = [("includefield", tag) for tag in LISTED]
        offset, previous = 0, None
        while True:
            params = [("limit", page), ("offset", offset), *fields]
            body = self._call(
                "GET", "/instances", what="list instances", params=params, headers=_ACCEPT_JSON
            )
            try:
                rows = json.loads(body) if body.strip() else []  # 204: no more
            except ValueError:
                rows = None
            if not isinstance(rows, list):
                raise Rejected(f"{self.role} {self.what}: /instances did not answer a list")
            if not rows:
                return
            # A server that ignores offset would answer the same page for ever.
            if rows[0] == previous:
                raise Rejected(
                    f"{self.role} {self.what}: /instances answered the same page at offset "
                    f"{offset}: it does not page with limit and offset"
                )
            previous = rows[0]
            ids = [iid for iid in map(_orthanc_id, rows) if iid]
            if len(ids) < len(rows):
                log.warning(
                    "%s: %d instances listed without their UIDs are left out",
                    self.role,
                    len(rows) - len(ids),
                )
            if ids:
                yield ids
            # Not "fewer than asked: the end": servers cap limit below what was asked.
            offset += len(rows)

    def count_instances(self) -> int:
        """0: QIDO-RS gives no count (for reconcile's progress, which then shows none)."""
        return 0


_ACCEPT_JSON = {"Accept": DICOM_JSON}


def _orthanc_id(row: Any) -> str | None:
    """The Orthanc ID of an instance from its QIDO-RS row; None without its UIDs."""
    if not isinstance(row, dict):
        return None
    patient, study, series, sop = (first(row.get(tag)) for tag in LISTED)
    if not (isinstance(study, str) and isinstance(series, str) and isinstance(sop, str)):
        return None
    return instance_id(patient if isinstance(patient, str) else "", study, series, sop)
