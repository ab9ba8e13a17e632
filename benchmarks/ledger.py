"""The ledger after a year: migration, `status`, the page and /metrics under write load, and
retention, on a ledger of N rows with two targets (issue 20).

Run as `python benchmarks/ledger.py [--rows 1000000] [--seconds 10] [--json out.json]`.

1. A ledger exactly as the version of 2026-12-03 makes it (schema version 1:
   tests/ledger_support.py) is filled to N instances, one delivery per target each, last
   updated evenly over the past 365 days, one in 500 failed; executemany in transactions of
   100,000 rows.
2. Before: what that version paid per look, its GROUP BY counts on that file.
3. First open by this version: the migration (totals counted once, indexes built).
4. `status --json` as a subprocess (the servers are closed ports on loopback: they answer at
   once with a refusal, so the time is the ledger's and the interpreter's).
5. Writers: 4 threads record new outcomes (two deliveries each, the cursor with them) as fast
   as the disk lets them, with synchronous=FULL as in production, for --seconds, first
   unwatched, then while /metrics and the status page are fetched from the real HTTP server of
   a real Pipeline (its ledger reads on their own connection) every second, then back to back:
   the writes' rate each way, and the latency of each fetch. (The writers and the server share
   this process's GIL and 2 cores: back to back, the page's rendering competes for them.)
6. Retention (90 days) on the same ledger while the writers go on: how long it takes to prune
   the rows older than 90 days (about 3/4 of them), the longest batch (the write lock held),
   the writers' rate meanwhile, and the file's size before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bridge.cli import _clients, make_pipeline  # noqa: E402
from bridge.config import load  # noqa: E402
from bridge.ledger.retention import BATCH, DAY, PAUSE, Retention  # noqa: E402
from bridge.ledger.state import Pruned, State  # noqa: E402
from bridge.outcomes import CONVERTED, Delivery, Entry  # noqa: E402
from bridge.peers.retry import RetryPolicy  # noqa: E402
from bridge.watch.web import WebServer  # noqa: E402
from tests import ledger_support  # noqa: E402
from tests.orthanc import free_ports  # noqa: E402

WRITERS = 4
_FREE = ("freelist_count", "page_size")
TARGETS = ("a", "b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=10.0, help="per write-load phase")
    parser.add_argument("--dir", type=Path, help="work here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--batch", type=int, default=BATCH, help="retention's rows per batch")
    parser.add_argument("--pause", type=float, default=PAUSE, help="retention's pause, s")
    parser.add_argument(
        "--v1", type=Path, help="copy this version 1 ledger of --rows rows instead of filling one"
    )
    parser.add_argument(
        "--no-retention", action="store_true", help="skip step 6 (minutes at 10 M rows)"
    )
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    try:
        figures = run(
            work,
            args.rows,
            args.seconds,
            args.v1,
            None if args.no_retention else (args.batch, args.pause),
        )
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def run(
    work: Path,
    rows: int,
    seconds: float,
    v1: Path | None = None,
    prune: tuple[int, float] | None = (BATCH, PAUSE),
) -> dict[str, Any]:
    state_dir = work / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / State.FILE
    figures: dict[str, Any] = {"rows": rows, "targets": len(TARGETS)}
    now = time.time()

    started = time.monotonic()
    if v1 is not None:
        # Filled earlier (its rows' dates relative to then): the file, not its WAL.
        shutil.copyfile(v1, path)
    else:
        ledger_support.fill(path, rows, TARGETS, updated=now - 365 * DAY, span=365 * DAY)
    figures["fill_s"] = round(time.monotonic() - started, 1)
    figures["v1_bytes_per_instance"] = round(_size(state_dir) / rows)
    say(f"filled {rows} rows in {figures['fill_s']} s, {figures['v1_bytes_per_instance']} B/row")

    db = sqlite3.connect(path)
    figures["v1_counts_s"] = _timed(
        lambda: db.execute("SELECT state, count(*) FROM instances GROUP BY state").fetchall()
    )
    figures["v1_delivery_counts_s"] = _timed(
        lambda: db.execute(
            "SELECT target, state, count(*) FROM deliveries GROUP BY target, state"
        ).fetchall()
    )
    db.close()
    say(f"before: counts {figures['v1_counts_s']} s, by target {figures['v1_delivery_counts_s']} s")

    started = time.monotonic()
    state = State(state_dir)
    figures["migration_s"] = round(time.monotonic() - started, 2)
    say(f"first open (migration): {figures['migration_s']} s")
    state.close()

    config = _config(work, state_dir)
    figures["status_json_s"] = status_seconds(config)
    say(f"status --json: {figures['status_json_s']} s")

    state = State(state_dir)
    stop = threading.Event()
    os.environ.pop("BRIDGE_HTTP_USERNAME", None)
    loaded = load(config)
    source, targets = _clients(loaded, RetryPolicy(stop, max_wait=0))
    pipeline = make_pipeline(loaded, state, source, targets, stop)
    web = WebServer(loaded, "run", pipeline.snapshot, pipeline.health, state.reader)
    web.start()
    base = f"http://127.0.0.1:{web.port}"
    try:
        writers = _Writers(state, start=rows + 10)
        figures["writes_per_s_unwatched"] = writers.rate(seconds)
        say(f"writes unwatched: {figures['writes_per_s_unwatched']}/s")
        for how, every in (("every second", 1.0), ("back to back", 0.0)):
            latencies: dict[str, list[float]] = {"/": [], "/metrics": []}
            watching = Watcher(base, latencies, every)
            watching.start()
            rate = writers.rate(seconds)
            watching.stop()
            figures[f"writes_per_s watched {how}"] = rate
            figures[f"watched {how} / unwatched"] = round(
                rate / figures["writes_per_s_unwatched"], 3
            )
            for page, values in latencies.items():
                figures[f"latency_ms {how} {page}"] = _latency(values)
            say(
                f"writes, page and /metrics fetched {how}: {rate}/s "
                f"({figures[f'watched {how} / unwatched']}); page "
                f"{figures[f'latency_ms {how} /']}, metrics {figures[f'latency_ms {how} /metrics']}"
            )

        if prune:
            _prune(state, state_dir, base, writers, figures, *prune)
    finally:
        web.close()
        pipeline.close()
        for client in (source, *targets):
            client.close()
        state.close()
    if prune:
        figures["status_json_after_retention_s"] = status_seconds(config)
    return figures


def _prune(
    state: State,
    state_dir: Path,
    base: str,
    writers: _Writers,
    figures: dict[str, Any],
    batch: int,
    pause: float,
) -> None:
    """Step 6: retention's first pass while the writers go on and the page is watched."""
    size_before = _size(state_dir)
    retention = Retention(state, 90, pause=pause, batch=batch)
    figures["retention_batch"], figures["retention_pause_ms"] = batch, pause * 1000
    held: list[float] = []
    prune_once = state.prune

    def timed_prune(before: float, limit: int) -> Pruned:
        done = prune_once(before, limit)
        held.append(done.seconds * 1000)
        return done

    state.prune = timed_prune  # type: ignore[method-assign]
    latencies: dict[str, list[float]] = {"/": [], "/metrics": []}
    watching = Watcher(base, latencies, 1.0)
    watching.start()
    pruned_in: list[float] = []

    def prune() -> None:
        began = time.monotonic()
        retention.run_once()
        pruned_in.append(time.monotonic() - began)

    pruning = threading.Thread(target=prune)
    began = time.monotonic()
    pruning.start()
    written = writers.until(lambda: not pruning.is_alive())
    figures["retention_s"] = round(pruned_in[0], 1)
    figures["retention_rows"] = retention.pruned
    figures["retention_batches"] = retention.batches
    figures["retention_longest_batch_ms"] = round(retention.longest_batch * 1000, 1)
    figures["retention_mean_batch_ms"] = round(retention.held / retention.batches * 1000, 1)
    cuts = statistics.quantiles(held, n=1000, method="inclusive") if len(held) > 1 else held * 999
    figures["retention_batch_ms p50 p99 p99.9"] = [round(cuts[i], 1) for i in (499, 989, 998)]
    figures["writes_per_s_while_pruning"] = round(written / (time.monotonic() - began))
    watching.stop()
    for page, values in latencies.items():
        figures[f"latency_ms while pruning {page}"] = _latency(values)
    figures["bytes_before_retention"] = size_before
    state._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    figures["bytes_after_retention"] = _size(state_dir)
    free, page = (state._db.execute(f"PRAGMA {p}").fetchone()[0] for p in _FREE)
    figures["bytes_free_for_reuse"] = free * page
    say(
        f"retention: {retention.pruned} rows in {figures['retention_s']} s, longest batch "
        f"{figures['retention_longest_batch_ms']} ms (mean "
        f"{figures['retention_mean_batch_ms']}; p50, p99, p99.9 "
        f"{figures['retention_batch_ms p50 p99 p99.9']}), writes meanwhile "
        f"{figures['writes_per_s_while_pruning']}/s, file {size_before >> 20} -> "
        f"{figures['bytes_after_retention'] >> 20} MiB, "
        f"{figures['bytes_free_for_reuse'] >> 20} MiB of it free for new rows"
    )


class _Writers:
    """Threads recording new converted outcomes, each with its cursor, as a transfer does."""

    def __init__(self, state: State, start: int) -> None:
        self._state = state
        self._next = start
        self._lock = threading.Lock()

    def rate(self, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        return round(self.until(lambda: time.monotonic() >= deadline) / seconds)

    def until(self, done: Callable[[], bool]) -> int:
        """Write until `done()`; return how many outcomes were written."""
        counts = [0] * WRITERS

        def write(number: int) -> None:
            while not done():
                with self._lock:
                    seq = self._next
                    self._next += 1
                deliveries = tuple(Delivery(t, CONVERTED) for t in TARGETS)
                iid = ledger_support.instance_id(seq)
                entry = Entry(iid, seq, CONVERTED, deliveries=deliveries)
                self._state.record(entry, cursor=seq)
                counts[number] += 1

        threads = [threading.Thread(target=write, args=(n,)) for n in range(WRITERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(counts)


class Watcher:
    """Fetches the status page and /metrics every `every` seconds (0: back to back), timing
    each answered fetch (one before the server listens, or after it closed, is not counted)."""

    def __init__(self, base: str, latencies: dict[str, list[float]], every: float = 1.0) -> None:
        self._every = every
        self._base = base
        self._latencies = latencies
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._done.is_set():
                answered = False
                for page, times in self._latencies.items():
                    began = time.monotonic()
                    try:
                        session.get(self._base + page, timeout=60).raise_for_status()
                    except requests.ConnectionError:
                        continue  # not listening yet, or gone
                    times.append(time.monotonic() - began)
                    answered = True
                # Until the server listens, a person's browser would be retrying too.
                self._done.wait(self._every if answered else 0.05)


def _config(work: Path, state_dir: Path) -> Path:
    closed = free_ports(2)  # nothing listens there: a refusal at once
    path = work / "bridge.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "source": {"url": f"http://127.0.0.1:{closed[0]}", "timeout": 2},
                "target": {"url": f"http://127.0.0.1:{closed[1]}", "timeout": 2},
                "state_dir": str(state_dir),
                "workers": 1,
                "http_listen": f"127.0.0.1:{free_ports(1)[0]}",
            }
        )
    )
    return path


def status_seconds(config: Path) -> float:
    """Seconds `status --json` takes, as a person runs it."""
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "status", "--json", "-c", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = round(time.monotonic() - began, 2)
    if '"counts"' not in done.stdout:
        raise RuntimeError(f"status printed no counts: {done.stdout} {done.stderr}")
    return seconds


def _size(state_dir: Path) -> int:
    return sum(p.stat().st_size for p in state_dir.iterdir() if p.name.startswith(State.FILE))


def _timed(work: Callable[[], object]) -> float:
    began = time.monotonic()
    work()
    return round(time.monotonic() - began, 3)


def _latency(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    if not ms:
        return {}
    return {
        "n": len(ms),
        "p50": round(statistics.median(ms), 1),
        "p95": round(
            statistics.quantiles(ms, n=20, method="inclusive")[-1] if len(ms) > 1 else ms[0], 1
        ),
        "max": round(ms[-1], 1),
    }


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
