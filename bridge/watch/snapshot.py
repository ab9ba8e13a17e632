"""What the pipeline is doing, read at one moment: all the status page needs of the engine.

The pipeline (bridge.engine.pipeline) makes one on each request; the page never reaches into
the pipeline itself, so nothing it does can take a lock a transfer holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Snapshot:
    """The engine's side of the status page."""

    mode: str  # what the command is doing: "catching up", "following", "retrying's instances"...
    stopping: bool
    cursor: int
    source_last: int  # the source's latest change, as last read
    total: int  # instances to process by ID (`retry`, `reconcile`); 0 when following the feed
    outcomes: dict[str, int] = field(default_factory=dict)  # this run's, per state
    rate: list[int] = field(default_factory=list)  # instances finished per minute, last hour
    inflight_instances: int = 0
    inflight_bytes: int = 0
    inflight_limit: int = 0
    decoders_alive: int = 0
    decoders_configured: int = 0
    decoder_restarts: int = 0
    where: str | None = None  # the cluster the transfers run on; None on this machine

    @property
    def done(self) -> int:
        """Instances finished in this run."""
        return sum(self.outcomes.values())
