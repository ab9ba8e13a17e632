"""What becomes of an instance: the states, one instance's outcome, the change that announced it.

The vocabulary every layer shares: the feed announces a `NewInstance`, an engine moves it and
answers an `Entry` (with a `Delivery` per target), the ledger keeps entries, and the metrics, the
status page and the logs name their states. Entries also come back from Dask workers: plain
frozen dataclasses, nothing that holds a connection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

CONVERTED = "converted"  # the target holds it in Explicit VR Little Endian
FORWARDED = "forwarded"  # sent unchanged, as a `forward` rule or `forward_unchanged` asks
SKIPPED = "skipped"  # no target's rules take it: left in the source
FAILED = "failed"  # permanent error: kept in the source, reason recorded
UNSUPPORTED = "unsupported"  # cannot become native pixels: kept in the source
VANISHED = "vanished"  # deleted from the source before the bridge got to it
PENDING = "pending"  # re-queued by `retry`
DELETING = "deleting"  # verified in the target; deleting the original was under way
FINISHED = (CONVERTED, FORWARDED, FAILED, UNSUPPORTED, VANISHED, SKIPPED)
# What a run of an instance ends in, as the metrics and the status page count it.
OUTCOMES = (CONVERTED, FORWARDED, FAILED, UNSUPPORTED, VANISHED)
PROBLEMS = (FAILED, UNSUPPORTED)  # kept in the source: they wait for a person
# What retention may delete: done for good. Failed, unsupported, pending and deleting rows are
# work a person or the bridge still has to do, and are kept whatever their age.
PRUNABLE = (CONVERTED, FORWARDED, SKIPPED, VANISHED)


@dataclass(frozen=True)
class NewInstance:
    """An instance arrived in the source at change `seq`."""

    seq: int
    instance_id: str


@dataclass(frozen=True)
class Delivery:
    """What became of one instance at one target: converted, forwarded, skipped or failed."""

    target: str
    state: str
    error: str | None = None


@dataclass(frozen=True)
class Entry:
    """The outcome of one instance, as the ledger keeps it."""

    instance_id: str
    seq: int | None
    state: str
    source_syntax: str | None = None
    error: str | None = None
    seconds: float | None = None
    deleted_original: bool = False
    updated: float = 0.0
    attempts: int = 0
    deliveries: tuple[Delivery, ...] = ()  # per target; recorded with the entry
    # Every target that takes it verifiably holds its copy (not written to the ledger).
    deletable: bool = False


def outcome_fields(iid: str, outcome: str, syntax: str | None, started: float) -> dict[str, object]:
    """The fields of an instance's outcome that JSON logs carry (bridge.watch.logs.EVENT_FIELDS)."""
    return {
        "instance": iid,
        "outcome": outcome,
        "source_syntax": syntax,
        "ms": round((time.monotonic() - started) * 1000),
    }
