"""What every server the bridge talks to offers its watchers, whatever its kind.

An Orthanc (bridge.peers.orthanc), a DICOMweb archive and a DICOM node each note their latest
answer and failure; health (bridge.watch.health), the status page and /metrics read them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable


class Peer(Protocol):
    """A server as its watchers see it."""

    role: str  # "source", "target", or the target's name
    what: str  # its kind, as people say it: "Orthanc", "DICOMweb archive", "DICOM node"
    last_answer: float | None  # monotonic time of the latest good answer
    last_failure: float | None
    last_error: str | None

    @property
    def up(self) -> bool | None:
        """True when the latest answer was a good one; None before any."""
        ...

    @property
    def address(self) -> str:
        """Where it is, as the status page shows it (a URL, or AE@host:port)."""
        ...

    def probe(self) -> None:
        """One request, never retried, that proves the server answers; raises if not."""
        ...

    def keep_connections(self, count: int) -> None:
        """Keep up to `count` connections open: one per thread that shares this peer."""
        ...

    def close(self) -> None:
        """Release its connections."""
        ...


@runtime_checkable
class Listing(Protocol):
    """A server that can list what it holds, by Orthanc instance ID (for `reconcile`)."""

    role: str

    def instance_pages(self, page: int = 10000) -> Iterator[list[str]]:
        """Every instance's Orthanc ID, one page at a time."""
        ...

    def count_instances(self) -> int:
        """How many instances it holds (for a progress bar's total)."""
        ...
