"""The one interface both engines offer the pipeline: start an instance, get a future outcome.

bridge.engine.local moves instances with threads and this machine's decoding processes;
bridge.engine.cluster has Dask workers move them. bridge.cli chooses one, from `cluster:`, and
hands it to the pipeline, which never knows which it drives.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

from bridge.engine.budget import ByteBudget
from bridge.outcomes import Entry, NewInstance


class Engine(Protocol):
    """Moves instances for the pipeline."""

    # Transfer threads: each server's client keeps as many connections (and one for the feed).
    threads: int
    # Instances the pipeline may have in flight: enough to keep every decoder busy.
    slots: int
    # The bytes the instances in flight hold here, within max_inflight_mb.
    budget: ByteBudget
    # Decoding processes kept on this machine (none when the cluster's workers decode).
    decoders_configured: int

    def start(self, item: NewInstance) -> Future[Entry]:
        """Begin moving one instance; the future holds its outcome, or the TransientError,
        AccessDenied or Interrupted that Transfer.run raises."""
        ...

    def decoders_alive(self) -> int:
        """Decoding processes in service."""
        ...

    def decoder_restarts(self) -> int:
        """Decoding processes replaced since the start."""
        ...

    def where(self) -> str | None:
        """Where the transfers run, as the status page says it; None on this machine alone."""
        ...

    def problem(self) -> str | None:
        """What keeps the engine from working now (a health check), or None."""
        ...

    def close(self) -> None:
        """Stop; outcomes not yet given end as Interrupted (or cancelled)."""
        ...
