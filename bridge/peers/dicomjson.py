"""DICOM JSON (PS3.18 F) as DICOMweb archives write it, and the STOW-RS answer read per
instance (PS3.18 10.5): the Referenced SOP Sequence (stored, with a Warning Reason), the Failed
SOP Sequence (with a Failure Reason), and what each reason code means. Pure: no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bridge.dicom.header import Identifiers
from bridge.errors import BridgeError, StoreFailed, TransientError

DICOM_JSON = "application/dicom+json"
_FAILED_SOPS = "00081198"
_REFERENCED_SOPS = "00081199"
_SOP_INSTANCE_REF = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"
SOP_INSTANCE = "00080018"
TRANSFER_SYNTAX = "00020010"
AVAILABLE_SYNTAXES = "00083002"
# What reconcile needs of an instance for its Orthanc ID (bridge.peers.orthanc.instance_id).
LISTED = ("00100020", "0020000D", "0020000E", "00080018")

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
    for item in values(sequence):
        if isinstance(item, dict):
            uid = first(item.get(_SOP_INSTANCE_REF))
            if isinstance(uid, str) and uid.rstrip("\0 "):
                found[uid.rstrip("\0 ")] = _code(first(item.get(reason_tag)))
    return found


def values(element: Any) -> list[Any]:
    """The Value list of a DICOM JSON element; [] when it has none."""
    found = element.get("Value") if isinstance(element, dict) else None
    return found if isinstance(found, list) else []


def first(element: Any) -> Any:
    """The first value of a DICOM JSON element; None when it has none."""
    found = values(element)
    return found[0] if found else None


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
