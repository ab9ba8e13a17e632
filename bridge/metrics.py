"""Every metric the bridge exports, defined here with its help text; the code that does the
work updates them, and the HTTP server (bridge.watch.web) only renders them.

The names are a contract with users' dashboards and alert rules (deploy/monitoring): never
rename one. Labels are bounded: outcomes, stages, server roles, and transfer syntax UIDs from a
fixed list (anything else is "other"), never an instance ID, so a hostile file cannot make a
series of its own.

Updating a metric costs about a microsecond; the bridge updates a dozen per instance, against
tens of milliseconds of decoding.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge import __version__
from bridge.outcomes import PROBLEMS, Delivery
from bridge.uids import KNOWN_SYNTAXES

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # memory, CPU and open files of the main process
PlatformCollector(registry=REGISTRY)

STAGES = ("download", "decode", "upload", "verify", "delete")
SERVERS = ("source", "target")
DIRECTIONS = ("downloaded", "uploaded")

INSTANCES = Counter(
    "orthanc_bridge_instances",
    "Instances finished, by outcome and source transfer syntax (other: a UID not in the "
    "standard; unknown: never read)",
    ["outcome", "syntax"],
    registry=REGISTRY,
)
CLUSTER_WORKERS = Gauge(
    "orthanc_bridge_cluster_workers",
    "Dask workers connected to the cluster's scheduler, as last asked (0 without `cluster:`)",
    registry=REGISTRY,
)
DELIVERIES = Counter(
    "orthanc_bridge_deliveries",
    "Instances finished at each target, by outcome: converted, forwarded, skipped (its rules "
    "did not take it), failed, unsupported",
    ["target", "outcome"],
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "orthanc_bridge_stage_seconds",
    "Seconds one instance spent in each stage: download, decode (waiting for a decoding "
    "process included), upload, verify, delete",
    ["stage"],
    # From a 1 ms check to a 500 MiB tomosynthesis decode.
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
BACKLOG = Gauge(
    "orthanc_bridge_backlog_changes",
    "Changes in the source's log above the cursor: work not yet done (0 when caught up)",
    registry=REGISTRY,
)
CURSOR = Gauge(
    "orthanc_bridge_cursor",
    "The durable cursor: every change up to it is finished",
    registry=REGISTRY,
)
SOURCE_LAST_CHANGE = Gauge(
    "orthanc_bridge_source_last_change",
    "The highest change sequence number the source reported at the latest poll",
    registry=REGISTRY,
)
INFLIGHT_INSTANCES = Gauge(
    "orthanc_bridge_inflight_instances",
    "Instances being downloaded, decoded or uploaded now",
    registry=REGISTRY,
)
INFLIGHT_BYTES = Gauge(
    "orthanc_bridge_inflight_bytes",
    "Bytes the instances in flight hold (files and decoded copies), bounded by max_inflight_mb",
    registry=REGISTRY,
)
SERVER_UP = Gauge(
    "orthanc_bridge_server_up",
    "1 when the server's latest answer was a good one, 0 when it was unreachable, timed out, "
    "answered 5xx or refused the credentials",
    ["server"],
    registry=REGISTRY,
)
RETRIES = Counter(
    "orthanc_bridge_retries",
    "Requests retried after a transient failure (unreachable, timeout, 5xx), by server",
    ["server"],
    registry=REGISTRY,
)
DECODERS = Gauge(
    "orthanc_bridge_decoders",
    "Decoding processes alive",
    registry=REGISTRY,
)
DECODER_RESTARTS = Counter(
    "orthanc_bridge_decoder_restarts",
    "Decoding processes replaced after dying (crash, out-of-memory kill) or taking too long",
    registry=REGISTRY,
)
BYTES = Counter(
    "orthanc_bridge_bytes",
    "Bytes of DICOM files downloaded from the source and uploaded to the target",
    ["direction"],
    registry=REGISTRY,
)
LAST_POLL = Gauge(
    "orthanc_bridge_last_poll_timestamp_seconds",
    "Unix time of the latest answer from the source's change log",
    registry=REGISTRY,
)
BUILD = Info("orthanc_bridge_build", "The running version", registry=REGISTRY)
BUILD.info({"version": __version__})

for _server in SERVERS:
    RETRIES.labels(_server)
for _direction in DIRECTIONS:
    BYTES.labels(_direction)
# Bound once: `with STAGE["decode"].time():` then costs no label lookup.
STAGE = {stage: STAGE_SECONDS.labels(stage) for stage in STAGES}


def syntax_label(uid: str | None) -> str:
    """A transfer syntax UID as a bounded label value."""
    if uid is None:
        return "unknown"
    return uid if uid in KNOWN_SYNTAXES else "other"


def count_instance(outcome: str, syntax: str | None, deliveries: Iterable[Delivery] = ()) -> None:
    """One instance finished with `outcome`, and with its outcome at each target."""
    INSTANCES.labels(outcome, syntax_label(syntax)).inc()
    for delivery in deliveries:
        DELIVERIES.labels(delivery.target, delivery.state).inc()


_position_lock = threading.Lock()
_position = {"last": 0, "cursor": 0}


def feed_position(last: int | None = None, cursor: int | None = None) -> None:
    """The source's last change and/or the cursor moved: the backlog is their difference."""
    with _position_lock:
        if last is not None:
            _position["last"] = last
            SOURCE_LAST_CHANGE.set(last)
            LAST_POLL.set(time.time())
        if cursor is not None:
            _position["cursor"] = cursor
            CURSOR.set(cursor)
        BACKLOG.set(max(0, _position["last"] - _position["cursor"]))


class _Ledger(Collector):
    """orthanc_bridge_ledger_instances, read from the ledger at each scrape."""

    def __init__(self) -> None:
        self.read: Callable[[], dict[str, int]] | None = None

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        counts = self.read() if self.read is not None else {}
        return [self._family(counts)]

    @staticmethod
    def _family(counts: dict[str, int] | None = None) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "orthanc_bridge_ledger_instances",
            "Instances the ledger holds as failed or unsupported: kept in the source, waiting "
            "for a person (`orthanc-bridge status`, then `retry`)",
            labels=["state"],
        )
        for state in PROBLEMS:
            family.add_metric([state], (counts or {}).get(state, 0))
        return family


LEDGER = _Ledger()
REGISTRY.register(LEDGER)


def watch(
    ledger: Callable[[], dict[str, int]],
    inflight: Callable[[], tuple[int, int]],
    decoders: Callable[[], int],
) -> None:
    """Read these at each scrape: the ledger's waiting counts, (instances, bytes) in flight,
    and the decoding processes alive."""
    LEDGER.read = ledger
    INFLIGHT_INSTANCES.set_function(lambda: inflight()[0])
    INFLIGHT_BYTES.set_function(lambda: inflight()[1])
    DECODERS.set_function(decoders)
