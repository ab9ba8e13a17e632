"""The command line: subcommands, logging, signals -> one stop Event, and named exit codes.

Expected failures (bad configuration, a server down, an undecodable file) end in one clear
line on stderr and an exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from bridge import __version__
from bridge.config import Config, load
from bridge.engine.destinations import peer_for
from bridge.engine.engines import Engine
from bridge.engine.inventory import Inventory, read_ahead
from bridge.engine.local import LocalEngine
from bridge.engine.pipeline import Pipeline, Summary
from bridge.errors import BridgeError, ConfigError, StateError
from bridge.ledger.retention import Retention
from bridge.ledger.state import State
from bridge.outcomes import PENDING, PROBLEMS
from bridge.peers.orthanc import OrthancClient
from bridge.peers.peer import Listing, Peer
from bridge.peers.retry import RetryPolicy, no_retry
from bridge.routing import needs
from bridge.watch import logs, progress
from bridge.watch.sdnotify import Watchdog
from bridge.watch.web import WebServer

log = logging.getLogger("bridge")

EXIT_OK = 0
EXIT_NOT_ALL_CONVERTED = 1  # catch-up/retry/reconcile: some instance was not delivered
EXIT_CONFIG = 2  # bad command line or configuration
EXIT_STATE = 3  # state directory unusable, or another bridge holds it
EXIT_SERVER = 4  # a server did not answer (status) or refused the credentials
EXIT_SOURCE_RESET = 5  # the source's change log went backwards and the policy is "stop"
EXIT_FORCED = 130  # a second signal: left at once


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `orthanc-bridge` and `python -m bridge`."""
    args = _parser().parse_args(argv)
    try:
        config = load(Path(args.config))
        logs.setup("DEBUG" if args.verbose else config.log_level, config.log_format)
        command: Callable[[argparse.Namespace, Config], int] = args.command
        return command(args, config)
    except ConfigError as exc:
        _fail(str(exc))
        return EXIT_CONFIG
    except StateError as exc:
        _fail(str(exc))
        return EXIT_STATE
    except BridgeError as exc:
        _fail(str(exc))
        return EXIT_SERVER


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c", "--config", default="bridge.yaml", help="configuration file (default: bridge.yaml)"
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser = argparse.ArgumentParser(
        prog="orthanc-bridge",
        description="Decompress every instance arriving in one Orthanc into another.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    commands: list[tuple[str, Callable[[argparse.Namespace, Config], int], str]] = [
        ("run", _run, "follow the source for ever (the daemon)"),
        ("catch-up", _catch_up, "process every change up to the end of the feed, then exit"),
        ("status", _status, "cursor, backlog and counts; failures with their reasons"),
        ("retry", _retry, "process again the instances recorded as failed or unsupported"),
        ("reconcile", _reconcile, "process every source instance that a target lacks"),
    ]
    for name, func, text in commands:
        command = sub.add_parser(name, parents=[common], help=text, description=text)
        command.set_defaults(command=func)
        if name == "status":
            command.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "reconcile":
            command.add_argument(
                "--page-size",
                type=_page_size,
                default=10000,
                metavar="N",
                help="instance IDs asked of each server per request (default: 10000)",
            )
    return parser


def _page_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 100000:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 100000, got {text!r}")
    return value


def _fail(message: str) -> None:
    print(f"orthanc-bridge: error: {message}", file=sys.stderr)


# --- signals ------------------------------------------------------------------------------


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """First SIGTERM/SIGINT sets `stop`; a second one exits at once."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            os._exit(EXIT_FORCED)
        log.info("%s received: finishing in-flight work, then exiting", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --- commands -----------------------------------------------------------------------------


def _clients(config: Config, retry: RetryPolicy) -> tuple[OrthancClient, list[Peer]]:
    """The source's client and one per target, each named as metrics and messages name it."""
    return (
        OrthancClient(config.source, "source", retry),
        [peer_for(t, retry) for t in config.targets],
    )


Work = Callable[[Pipeline, OrthancClient, list[Peer]], Summary]


def _check_labels(config: Config, source: OrthancClient) -> None:
    """Refuse `label` conditions against an Orthanc without labels (before 1.12): they would
    silently never match. A source that does not answer now is not held up for this."""
    uses = [t.name for t in config.targets if "label" in needs(t.rules)]
    if not uses:
        return
    try:
        version = str(source.system().get("Version", ""))
    except BridgeError as exc:
        log.warning("cannot ask the source its version, to check that it has labels: %s", exc)
        return
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if numbers and numbers < (1, 12):
        raise ConfigError(
            f"{uses[0]}: its rules test `label`, but the source runs Orthanc {version}, which "
            "has no labels (Orthanc 1.12 and later)"
        )


def make_pipeline(
    config: Config,
    state: State,
    source: OrthancClient,
    targets: Sequence[Peer],
    stop: threading.Event,
) -> Pipeline:
    """The pipeline on the engine `cluster:` chooses: Dask workers, or this machine alone."""
    engine: Engine
    if config.cluster is not None:
        # Imported only here: a bridge without a cluster never loads the Dask client's side.
        from bridge.engine.cluster import ClusterEngine

        # The transfers run on Dask workers; here, only the feed, the ledger and deletions.
        engine = ClusterEngine(config, config.cluster, source, state.record, stop)
    else:
        engine = LocalEngine(config, source, targets, state.record, stop)
    return Pipeline(config, state, source, targets, stop, engine)


def _with_pipeline(config: Config, command: str, work: Work) -> Summary:
    """Run `work` on a pipeline, with the HTTP server, health probes and systemd's watchdog."""
    stop = threading.Event()
    forever = command == "run"
    retry = RetryPolicy(stop, max_wait=None if forever else config.catch_up_retry_seconds)
    source, targets = _clients(config, retry)
    _check_labels(config, source)
    with contextlib.ExitStack() as cleanup:
        # Each part is closed, last made first, however far the start-up got (a Dask
        # scheduler that cannot be reached fails the pipeline after the state was opened).
        for client in (source, *targets):
            cleanup.callback(client.close)
        state = State(config.state_dir)
        cleanup.callback(state.close)
        cleanup.enter_context(_stop_on_signals(stop))
        pipeline = make_pipeline(config, state, source, targets, stop)
        cleanup.callback(pipeline.close)
        retention = Retention(state, config.ledger_retention_days)
        cleanup.callback(retention.close)
        cleanup.callback(pipeline.health.close)
        web = WebServer(config, command, pipeline.snapshot, pipeline.health, state.reader)
        cleanup.callback(web.close)
        watchdog = Watchdog(pipeline.health.liveness, lambda: pipeline.mode)
        cleanup.callback(watchdog.close)
        web.start()
        pipeline.health.start()
        watchdog.start()
        retention.start()
        return work(pipeline, source, targets)
    raise AssertionError("unreachable")  # ExitStack does not swallow exceptions


def _run(args: argparse.Namespace, config: Config) -> int:
    where = (
        f"on the Dask cluster at {config.cluster.scheduler}"
        if config.cluster
        else f"with {config.worker_count} decoding processes"
    )
    log.info(
        "orthanc-bridge %s: following %s, converting into %s %s",
        __version__,
        config.source.url,
        ", ".join(t.server.url for t in config.targets),
        where,
    )
    summary = _with_pipeline(config, "run", lambda pipeline, _s, _t: pipeline.follow(forever=True))
    if summary.stopped_by:
        _fail(summary.stopped_by)
        return EXIT_SOURCE_RESET if summary.source_reset else EXIT_SERVER
    log.info("stopped; cursor saved")
    return EXIT_OK


def _one_shot(what: str, config: Config, work: Work) -> int:
    """Run `work` once, with bounded retries, then print its summary and choose the exit code."""
    started = time.monotonic()
    summary = _with_pipeline(config, what, work)
    return _report(what, summary, time.monotonic() - started)


def _catch_up(args: argparse.Namespace, config: Config) -> int:
    def work(pipeline: Pipeline, source: OrthancClient, targets: list[Peer]) -> Summary:
        start = pipeline.cursor

        def read() -> tuple[int, int]:
            last = pipeline.source_last
            return pipeline.cursor - start, max(0, last - start) if last else 0

        with progress.shown("catch-up", "changes", read, config.progress_interval):
            return pipeline.follow(forever=False)

    return _one_shot("catch-up", config, work)


def _process(
    pipeline: Pipeline, what: str, ids: Iterable[str], total: int, interval: float
) -> Summary:
    """Process `ids` (`total` of them, maybe a stream) with a progress report: `retry` and
    `reconcile`."""
    pipeline.mode = what

    def read() -> tuple[int, int]:
        return sum(pipeline.summary.counts.values()), total

    with progress.shown(what, "instances", read, interval):
        return pipeline.process(ids, total)


def _retry(args: argparse.Namespace, config: Config) -> int:
    def work(pipeline: Pipeline, source: OrthancClient, targets: list[Peer]) -> Summary:
        # PENDING too: a retry that was killed or gave up on a server left its instances
        # pending; without this, no later retry would ever pick them up again.
        ids = pipeline.state.requeue((*PROBLEMS, PENDING))
        log.info("retrying %d instances", len(ids))
        return _process(pipeline, "retrying", ids, len(ids), config.progress_interval)

    return _one_shot("retry", config, work)


def _reconcile(args: argparse.Namespace, config: Config) -> int:
    page: int = args.page_size

    def work(pipeline: Pipeline, source: OrthancClient, targets: list[Peer]) -> Summary:
        interval = config.progress_interval
        inventory = Inventory(config.state_dir)
        try:
            with _listing(pipeline, source, page, inventory, interval) as pages:
                inventory.list_source(pages)
            # An instance some target lacks is processed again: its rules decide again where
            # it goes, and targets that hold it already answer AlreadyStored and are verified.
            for target in targets:
                if pipeline.stop.is_set():
                    break
                if not isinstance(target, Listing):
                    log.warning(
                        "reconcile cannot list the %s %s: it is left out of the comparison",
                        target.what,
                        target.role,
                    )
                    continue
                with _listing(pipeline, target, page, inventory, interval) as pages:
                    inventory.list_target(pages)
                if pipeline.stop.is_set():
                    break  # a listing cut short: comparing with it would invent work
                pipeline.mode = f"comparing the source with {target.role}"
                log.info("%s", pipeline.mode)
                inventory.subtract_target()
            if pipeline.stop.is_set():
                return pipeline.summary
            missing = inventory.missing_count()
            log.info("the targets lack %d of the source's instances", missing)
            return _process(pipeline, "reconciling", inventory.missing(), missing, interval)
        finally:
            inventory.close()

    return _one_shot("reconcile", config, work)


@contextmanager
def _listing(
    pipeline: Pipeline, client: Listing, page: int, inventory: Inventory, interval: float
) -> Iterator[Iterator[list[str]]]:
    """The pages of `client`'s `/instances`, with a progress report while they are read; the
    pages end early when the bridge is stopped."""
    what = f"listing {client.role}"
    pipeline.mode = f"{what}'s instances"
    try:
        expected = client.count_instances()  # for the progress bar's total only
    except BridgeError as exc:
        log.debug("%s: no count of its instances: %s", client.role, exc)
        expected = 0

    def pages() -> Iterator[list[str]]:
        for ids in read_ahead(client.instance_pages(page)):
            pipeline.health.beat()
            yield ids
            if pipeline.stop.is_set():
                return

    def read() -> tuple[int, int]:
        return inventory.listed, expected

    with progress.shown(what, "instances", read, interval):
        yield pages()


def _report(what: str, summary: Summary, seconds: float) -> int:
    done = sum(summary.counts.values())
    counts = ", ".join(f"{n} {state}" for state, n in sorted(summary.counts.items())) or "nothing"
    rate = done / seconds if seconds else 0.0
    peak = summary.peak_inflight_bytes / 1024**2
    print(f"{what}: {counts} in {seconds:.1f} s ({rate:.1f}/s, at most {peak:.0f} MiB in flight)")
    for entry in summary.problems:
        print(f"  {entry.state} {entry.instance_id}: {entry.error}")
    for iid, reason in summary.unfinished.items():
        print(f"  not finished {iid}: {reason}")
    if summary.stopped_by:
        print(f"  stopped: {summary.stopped_by}")
    if summary.source_reset:
        return EXIT_SOURCE_RESET
    return EXIT_OK if summary.ok else EXIT_NOT_ALL_CONVERTED


def _status(args: argparse.Namespace, config: Config) -> int:
    if not (config.state_dir / State.FILE).exists():
        raise StateError(f"no state in {config.state_dir} yet: the bridge has never run there")
    state = State(config.state_dir, read_only=True)
    try:
        cursor = state.cursor()
        counts = state.counts()
        per_target = state.delivery_counts()
        problems = state.entries((*PROBLEMS, PENDING), limit=50)
    finally:
        state.close()
    source, targets = _clients(config, no_retry())
    report: dict[str, object] = {"cursor": cursor, "counts": counts}
    target_reports: dict[str, dict[str, object]] = {}
    report["targets"] = target_reports
    unreachable = False
    try:
        last = source.last_change()
        report["source_last_change"] = last
        report["behind"] = max(0, last - cursor)
    except BridgeError as exc:
        report["source_error"] = str(exc)
        unreachable = True
    for target in targets:
        found: dict[str, object] = {"counts": per_target.get(target.role, {})}
        target_reports[target.role] = found
        try:
            target.probe()
        except BridgeError as exc:
            found["error"] = str(exc)
            if target.role == "target":  # the single `target:`, as before there were several
                report["target_error"] = str(exc)
            unreachable = True
    report["problems"] = [
        {"instance": e.instance_id, "state": e.state, "syntax": e.source_syntax, "reason": e.error}
        for e in problems
    ]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_status(report)
    return EXIT_SERVER if unreachable else EXIT_OK


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none"


def _print_status(report: dict[str, object]) -> None:
    print(f"cursor:        change {report['cursor']}")
    if "source_last_change" in report:
        print(
            f"source:        last change {report['source_last_change']}, "
            f"{report['behind']} changes behind"
        )
    if "source_error" in report:
        print(f"source:        UNREACHABLE: {report['source_error']}")
    targets = report["targets"]
    assert isinstance(targets, dict)
    for name, found in targets.items():
        if "error" in found:
            print(f"{name + ':':<14} UNREACHABLE: {found['error']}")
    counts = report["counts"]
    assert isinstance(counts, dict)
    print("instances:     " + _counts(counts))
    if len(targets) > 1:
        for name, found in targets.items():
            print(f"  at {name}: {_counts(found['counts'])}")
    problems = report["problems"]
    assert isinstance(problems, list)
    if problems:
        print("kept in the source (run `orthanc-bridge retry` after fixing the cause):")
        for p in problems:
            print(f"  {p['state']} {p['instance']} ({p['syntax']}): {p['reason']}")
