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
import threading
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote

from bridge import metrics
from bridge.config import ServerConfig
from bridge.dicom.header import Identifiers, identifiers
from bridge.errors import (
    BridgeError,
    NotFound,
    Rejected,
    StoreFailed,
    TransientError,
    VerificationFailed,
)
from bridge.peers.http import Answer, HttpClient, error_detail
from bridge.peers.orthanc import instance_id
from bridge.peers.retry import RetryPolicy

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
_FAILED_SOPS = "00081198"
_REFERENCED_SOPS = "00081199"
_SOP_INSTANCE_REF = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"
_SOP_INSTANCE = "00080018"
_TRANSFER_SYNTAX = "00020010"
_AVAILABLE_SYNTAXES = "00083002"
# What reconcile needs of an instance for its Orthanc ID (bridge.peers.orthanc.instance_id).
_LISTED = ("00100020", "0020000D", "0020000E", "00080018")

# Meanings of STOW-RS Failure and Warning Reasons: PS3.18 Table 10.5.3-1 and the storage
# statuses of PS3.4 (Annex B.2.3) and PS3.7 (Annex C).
_MEANINGS = {
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0117: "invalid SOP instance",
    0x0119: "class-instance conflict",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0211: "unrecognized operation",
    0x0212: "mistyped argument",
    0x0213: "resource limitation",
    0xC122: "transfer syntax not supported",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}
_RANGES = (
    (0xFF00, 0xA700, "out of resources"),
    (0xFF00, 0xA900, "data set does not match SOP class"),
    (0xF000, 0xC000, "cannot understand"),
    (0xF000, 0xB000, "warning"),
)


def status_meaning(code: int) -> str:
    """What a STOW-RS Failure or Warning Reason code means, e.g. 0xA700: "out of resources"."""
    if code in _MEANINGS:
        return _MEANINGS[code]
    for mask, value, meaning in _RANGES:
        if code & mask == value:
            return meaning
    return "unknown code"


def transient_failure(code: int) -> bool:
    """Whether a Failure Reason may pass by itself: only "out of resources" (A7xx) says so."""
    return code & 0xFF00 == 0xA700


@dataclass(frozen=True)
class StoreOutcome:
    """What the archive answered about one instance sent with STOW-RS."""

    instance: Identifiers | None  # its UIDs, as read from the file (None: unreadable, not sent)
    stored: bool
    reason: str = ""  # why it was not stored, or the warning it was stored with
    transient: bool = False  # not stored, but worth sending again later

    def error(self) -> BridgeError:
        """The error for an instance that was not stored: TransientError or StoreFailed."""
        return TransientError(self.reason) if self.transient else StoreFailed(self.reason)


@dataclass(frozen=True)
class StowAnswer:
    """The instances a STOW-RS answer lists: SOP Instance UID -> reason code (None: none)."""

    stored: dict[str, int | None]
    failed: dict[str, int | None]


def parse_stow(body: bytes) -> StowAnswer | None:
    """The instances a STOW-RS answer lists as stored and as failed; None when the body is not
    DICOM JSON (one dataset, or a list of one as some archives send)."""
    try:
        document = json.loads(body)
    except ValueError:  # UnicodeDecodeError too
        return None
    if isinstance(document, list) and len(document) == 1:
        document = document[0]
    if not _is_dataset(document):
        return None
    return StowAnswer(
        _listed(document.get(_REFERENCED_SOPS), _WARNING_REASON),
        _listed(document.get(_FAILED_SOPS), _FAILURE_REASON),
    )


def _is_dataset(document: Any) -> bool:
    """Whether `document` looks like a DICOM JSON dataset: tags of 8 hex digits -> {"vr": ...}."""
    if not isinstance(document, dict):
        return False
    for tag, element in document.items():
        if len(tag) != 8 or not isinstance(element, dict) or "vr" not in element:
            return False
        try:
            int(tag, 16)
        except ValueError:
            return False
    return True


def _listed(sequence: Any, reason_tag: str) -> dict[str, int | None]:
    """SOP Instance UID -> reason code of each item of a Referenced or Failed SOP Sequence."""
    found: dict[str, int | None] = {}
    for item in _values(sequence):
        if isinstance(item, dict):
            uid = _first(item.get(_SOP_INSTANCE_REF))
            if isinstance(uid, str) and uid.rstrip("\0 "):
                found[uid.rstrip("\0 ")] = _code(_first(item.get(reason_tag)))
    return found


def _values(element: Any) -> list[Any]:
    """The Value list of a DICOM JSON element; [] when it has none."""
    values = element.get("Value") if isinstance(element, dict) else None
    return values if isinstance(values, list) else []


def _first(element: Any) -> Any:
    values = _values(element)
    return values[0] if values else None


def _code(value: Any) -> int | None:
    """A reason code: US is a JSON number; some servers send a string, read as 4 hex digits
    ("A700") or else as decimal ("42752")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text, 16) if len(text) == 4 else int(text)
        except ValueError:
            return None
    return None


# Batcher's defaults, from benchmarks/dicomweb_batch.py (8 transfer threads, 0.5 MiB CT slices,
# Orthanc's plugin on loopback): two requests at a time beat one by 20% on Orthanc 1.10 and
# four little more (on 1.12, which stalls some STOW-RS requests for 5 s, four were 4
# times slower); with two, batches hold 2-3 instances from 8 threads, and 16 leaves room for
# more threads. Batching halves this process's CPU per instance (0.8 ms against 1.6 alone).
DEFAULT_BATCH_SIZE = 16
DEFAULT_BATCH_MB = 32.0
DEFAULT_POSTS = 2

_Item = tuple[int, Identifiers, bytes | bytearray]  # (index in the caller's list, UIDs, file)


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

    def store_batch(self, instances: Sequence[bytes | bytearray]) -> list[StoreOutcome]:
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
        chunks: list[bytes | bytearray] = []
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
            if isinstance(dataset, dict) and _first(dataset.get(_SOP_INSTANCE)) == (
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
        held = _first(found.get(_TRANSFER_SYNTAX))
        if isinstance(held, str) and held:
            if held != syntax:
                raise VerificationFailed(
                    f"after upload {self.role} holds it as {held}, expected {syntax}"
                )
            return held
        available = [uid for uid in _values(found.get(_AVAILABLE_SYNTAXES)) if uid]
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
        fields = [("includefield", tag) for tag in _LISTED]
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
    patient, study, series, sop = (_first(row.get(tag)) for tag in _LISTED)
    if not (isinstance(study, str) and isinstance(series, str) and isinstance(sop, str)):
        return None
    return instance_id(patient if isinstance(patient, str) else "", study, series, sop)


@dataclass
class _Pending:
    """One caller's instance in the Batcher's queue, and then its outcome."""

    data: bytes | bytearray
    alone: bool  # sent in a request of its own
    wake: threading.Condition  # its caller waits on it, over the Batcher's one lock
    waiting: bool = False  # its caller waits (and is not sending another request)
    outcome: StoreOutcome | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None or self.error is not None


class Batcher:
    """Group commit for STOW-RS: instances that threads store at the same time share requests.

    Each caller blocks in store() until the archive has answered for its instance. Whoever
    finds a request slot free (`posts` of them) sends what is queued then, its own instance or
    others', up to `batch_size` instances and `batch_mb` MiB (one larger instance goes alone):
    a request carries what arrived while the previous one was on the wire. Instances that
    trickle in go one by one without waiting for a batch to fill; under load, batches fill.
    """

    def __init__(
        self,
        client: DicomWebClient,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_mb: float = DEFAULT_BATCH_MB,
        posts: int = DEFAULT_POSTS,
    ) -> None:
        self.client = client
        self.batch_size = max(1, batch_size)
        self.batch_bytes = int(batch_mb * 2**20)
        self.posts = max(1, posts)
        self._lock = threading.Lock()
        self._queue: deque[_Pending] = deque()
        self._sending = 0

    @property
    def queued(self) -> int:
        """How many instances wait for a request."""
        return len(self._queue)

    def store(self, data: bytes | bytearray) -> StoreOutcome:
        """Store one instance, retried as the client's RetryPolicy declares; its outcome once
        stored (`reason`: the archive's warning, if any). Raises StoreFailed when the archive
        did not store it, TransientError when the policy gives up, AccessDenied."""
        attempts = 0

        def attempt() -> StoreOutcome:
            nonlocal attempts
            attempts += 1
            # After a transient failure the instance travels alone: one that the archive
            # chokes on (HTTP 500 every time) then holds back no other.
            outcome = self._submit(data, alone=attempts > 1)
            if not outcome.stored:
                raise outcome.error()
            return outcome

        return self.client.retry.call(attempt, self.client.role)

    def _submit(self, data: bytes | bytearray, alone: bool) -> StoreOutcome:
        """Queue one instance, send requests while a slot is free and it waits, and return
        its outcome (or raise what failed its request)."""
        # Each caller waits on its own condition and is woken only when its instance is done
        # or a slot is its to take: with one shared condition, every answer woke every
        # waiting thread, and 8 threads cost 1 ms of CPU more per instance (notify_all).
        item = _Pending(data, alone, threading.Condition(self._lock))
        with self._lock:
            self._queue.append(item)
            while True:
                if item.done:
                    return _result(item)
                if self._sending < self.posts and self._queue:
                    batch = self._take()
                    self._sending += 1
                    self._wake_next()  # another slot may be free too
                    self._lock.release()
                    try:
                        self._send(batch)
                    finally:
                        self._lock.acquire()
                        self._sending -= 1
                        self._wake_next()
                else:
                    item.waiting = True
                    item.wake.wait()
                    item.waiting = False

    def _wake_next(self) -> None:
        """Wake the first waiting caller of a queued instance if a slot is free for it to
        take (called holding the lock)."""
        if self._sending < self.posts:
            for pending in self._queue:
                if pending.waiting:
                    pending.waiting = False  # woken: the next call wakes another
                    pending.wake.notify()
                    return

    def _take(self) -> list[_Pending]:
        """The next request's instances, in the order they came (called holding the lock)."""
        batch = [self._queue.popleft()]
        size = len(batch[0].data)
        while self._queue and len(batch) < self.batch_size and not batch[0].alone:
            following = self._queue[0]
            if following.alone or size + len(following.data) > self.batch_bytes:
                break
            batch.append(self._queue.popleft())
            size += len(following.data)
        return batch

    def _send(self, batch: list[_Pending]) -> None:
        """One request for `batch`; each of its callers gets its outcome or the error."""
        try:
            outcomes = self.client.store_batch([item.data for item in batch])
        except BaseException as exc:
            self._finish(batch, [None] * len(batch), exc)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt, SystemExit: after the others were told
            return
        self._finish(batch, outcomes, None)

    def _finish(
        self,
        batch: list[_Pending],
        outcomes: Sequence[StoreOutcome | None],
        error: BaseException | None,
    ) -> None:
        with self._lock:
            for item, outcome in zip(batch, outcomes, strict=True):
                item.outcome, item.error = outcome, error
                item.wake.notify()


def _result(item: _Pending) -> StoreOutcome:
    """A finished item's outcome, or its request's error raised in this caller's thread."""
    if item.error is not None:
        if isinstance(item.error, BridgeError):
            # A copy per caller: every error takes one message (bridge.errors), and one object
            # raised in several threads at once would gather their tracebacks.
            raise type(item.error)(str(item.error)) from item.error
        raise item.error
    assert item.outcome is not None
    return item.outcome
