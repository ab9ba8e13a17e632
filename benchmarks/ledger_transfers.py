"""Real transfers on a year's ledger, watched and unwatched, against real Orthancs (issue 20).

Run as `python benchmarks/ledger_transfers.py [--rows 2000000] [--count 150] [--rounds 3]
[--json out.json]`.

1. A ledger as the version of 2026-12-03 left it (schema version 1, tests/ledger_support.py),
   N instances with one delivery at each of two targets, last updated evenly over the past 365
   days, one in 500 failed: the same as benchmarks/ledger.py's. It is filled once and kept in
   the cache directory for a day (filling 2 M rows takes minutes); each run works on a copy.
2. Real Orthancs on loopback: a source and two targets (named a and b, as in the ledger).
3. Each catch-up: COUNT new CT-like JPEG 2000 slices (benchmarks/throughput.py's corpus, with
   new SOP Instance UIDs each time) are uploaded to the source (not timed), the ledger's cursor
   is put just before them, as if the bridge had kept up so far, and `python -m bridge
   catch-up` runs as a subprocess with its HTTP server on; its wall time from start to exit is
   the measure. Watched: the status page and /metrics are fetched every second while it runs,
   each fetch timed.
4. The first start, on the version 1 ledger: migration, then the catch-up, with the default
   retention (90 days), which begins pruning in the background while the catch-up runs.
5. `status --json` (a subprocess; the bridge stopped) on the migrated ledger.
6. Rounds on the migrated ledger with retention off (`ledger_retention_days: 0`): nothing is
   pruned during them. Each round runs one catch-up unwatched and one watched, alternating which
   goes first.
7. Retention's pass over what the first start left (in this process, as the bridge's thread
   does it), timed, with the write lock each batch held; the file's size after it.
8. `status --json` again, and rounds again on the pruned ledger with the default retention
   (its thread runs during them but finds nothing older than 90 days).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.ledger import TARGETS, Watcher, _latency, _size, status_seconds  # noqa: E402
from benchmarks.throughput import corpus  # noqa: E402
from bridge.ledger.retention import DAY, Retention  # noqa: E402
from bridge.ledger.state import State  # noqa: E402
from tests import ledger_support  # noqa: E402
from tests.orthanc import OrthancServer, free_ports  # noqa: E402

PAGES = ("/", "/metrics")
FILL_KEPT = DAY  # a cached version 1 ledger older than this is filled again
UPLOAD_THREADS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--count", type=int, default=150, help="new slices per catch-up")
    parser.add_argument("--rounds", type=int, default=3, help="before and after retention each")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "orthanc-bridge-bench",
        help="where the corpus and the filled version 1 ledger are kept between runs",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ledger-transfers-") as tmp:
        figures = Bench(Path(tmp), args.rows, args.count, args.cache).run(args.rounds)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


class Bench:
    """One source and two targets, a state directory holding a year's ledger, and catch-ups."""

    def __init__(self, work: Path, rows: int, count: int, cache: Path) -> None:
        self.work = work
        self.rows = rows
        self.count = count
        self.cache = cache
        self.state_dir = work / "state"
        self.files = corpus(count, cache)
        self.source = OrthancServer("source", work / "source")
        self.targets = {name: OrthancServer(name, work / name) for name in TARGETS}
        self.batches = 0  # catch-ups so far: the targets hold count times that

    def run(self, rounds: int) -> dict[str, Any]:
        figures: dict[str, Any] = {"rows": self.rows, "targets": len(TARGETS), "count": self.count}
        self._ledger(figures)
        servers = [self.source, *self.targets.values()]
        for server in servers:
            server.start()
        try:
            first = self.catch_up("first start", watched=False, retention_days=90)
            figures["first_start"] = first
            say(
                f"first start: {first['rate']}/s, {first['seconds']} s ({first['migration']}); "
                f"retention meanwhile: {first['retention']}"
            )
            figures["status_json_s"] = self.status_seconds()
            say(f"status --json: {figures['status_json_s']} s")
            figures["rows_before_rounds"] = self._rows()
            figures["without_retention"] = self.rounds(rounds, retention_days=0)

            figures["bytes_before_retention"] = _size(self.state_dir)
            figures["retention"] = self.prune()
            figures["bytes_after_retention"] = _size(self.state_dir)
            figures["rows_after_retention"] = self._rows()
            say(
                f"retention: {figures['retention']}; file {figures['bytes_before_retention']} "
                f"-> {figures['bytes_after_retention']} bytes, "
                f"{figures['rows_after_retention']} rows"
            )
            figures["status_json_after_retention_s"] = self.status_seconds()
            say(f"status --json after retention: {figures['status_json_after_retention_s']} s")
            figures["after_retention"] = self.rounds(rounds, retention_days=90)
            figures["bytes_after_rounds"] = _size(self.state_dir)
        finally:
            for server in servers:
                server.kill()
        return figures

    # --- the ledger ----------------------------------------------------------------------------

    def _ledger(self, figures: dict[str, Any]) -> None:
        """A copy of the cached version 1 ledger (filled first if missing or too old)."""
        cached = self.cache / f"ledger-v1-{self.rows}.sqlite"
        if not cached.exists() or time.time() - cached.stat().st_mtime > FILL_KEPT:
            cached.unlink(missing_ok=True)
            part = cached.with_suffix(".part")
            for stale in part.parent.glob(part.name + "*"):
                stale.unlink()  # a fill cut short
            started = time.monotonic()
            now = time.time()
            ledger_support.fill(part, self.rows, TARGETS, updated=now - 365 * DAY, span=365 * DAY)
            with sqlite3.connect(part) as db:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            os.utime(part, (now, now))  # the rows' dates are relative to this
            part.replace(cached)
            for stale in part.parent.glob(part.name + "-*"):
                stale.unlink()  # its empty WAL and shared memory
            say(f"filled {self.rows} rows in {time.monotonic() - started:.0f} s")
        self.state_dir.mkdir(parents=True)
        shutil.copyfile(cached, self.state_dir / State.FILE)
        figures["v1_bytes"] = _size(self.state_dir)
        figures["ledger_filled_days_ago"] = round((time.time() - cached.stat().st_mtime) / DAY, 2)

    def _rows(self) -> dict[str, int]:
        with sqlite3.connect(self.state_dir / State.FILE) as db:
            return {
                table: int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                for table in ("instances", "deliveries")
            }

    def _set_cursor(self, seq: int) -> None:
        """Where the bridge would be had it kept up with this source until now."""
        db = sqlite3.connect(self.state_dir / State.FILE, isolation_level=None)
        try:
            db.execute("UPDATE meta SET value = ? WHERE key = 'cursor'", (str(seq),))
        finally:
            db.close()

    # --- catch-ups -----------------------------------------------------------------------------

    def rounds(self, rounds: int, retention_days: float) -> dict[str, Any]:
        """`rounds` pairs of catch-ups, unwatched and watched, alternating which goes first."""
        ratios: list[float] = []
        runs: list[dict[str, Any]] = []
        latencies: dict[str, list[float]] = {page: [] for page in PAGES}
        for number in range(rounds):
            order = (False, True) if number % 2 == 0 else (True, False)
            done = {
                watched: self.catch_up(
                    f"round {number + 1}", watched, retention_days, latencies=latencies
                )
                for watched in order
            }
            ratio = round(done[True]["rate"] / done[False]["rate"], 3)
            ratios.append(ratio)
            runs.extend(done.values())
            say(
                f"round {number + 1} (retention {retention_days:g} days): unwatched "
                f"{done[False]['rate']}/s, watched {done[True]['rate']}/s: {ratio}; "
                f"page {done[True]['latency_ms']['/']}, "
                f"metrics {done[True]['latency_ms']['/metrics']}"
            )
        result = {
            "watched_over_unwatched": ratios,
            "median": statistics.median(ratios),
            "latency_ms": {page: _latency(values) for page, values in latencies.items()},
            "runs": runs,
        }
        say(f"ratio median {result['median']}; all fetches {result['latency_ms']}")
        return result

    def catch_up(
        self,
        label: str,
        watched: bool,
        retention_days: float,
        latencies: dict[str, list[float]] | None = None,
    ) -> dict[str, Any]:
        """Upload COUNT new slices, put the cursor before them, time one catch-up."""
        self.batches += 1
        files = renamed(self.files)
        before = self.source.changes_last()
        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(self.source.upload, files))
        self._set_cursor(before)
        port = free_ports(1)[0]
        run_dir = self.work / f"run-{self.batches}"
        run_dir.mkdir()
        config = self._config(run_dir, port, retention_days)
        log = run_dir / "bridge.log"
        own: dict[str, list[float]] = {page: [] for page in PAGES}
        argv = [sys.executable, "-m", "bridge", "catch-up", "-c", str(config)]
        with log.open("wb") as out:
            started, wall_clock = time.monotonic(), time.time()
            process = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            watcher = Watcher(f"http://127.0.0.1:{port}", own) if watched else None
            if watcher:
                watcher.start()
            status = process.wait()
            seconds = time.monotonic() - started
            if watcher:
                watcher.stop()
        if status != 0:
            raise SystemExit(f"{label}: the bridge exited with {status}; see {log}")
        for name, target in self.targets.items():
            held = int(target.get_json("/statistics")["CountInstances"])
            if held != self.count * self.batches:
                raise SystemExit(f"{label}: target {name} holds {held} instances")
        lines = log.read_text().splitlines()
        done = [
            datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for line in lines
            if " converted from " in line
        ]
        if latencies is not None:
            for page, values in own.items():
                latencies[page].extend(values)
        return {
            "label": label,
            "watched": watched,
            "seconds": round(seconds, 2),
            "rate": round(self.count / seconds, 2),
            "first_converted_after_s": round(done[0] - wall_clock, 2) if done else None,
            "steady_rate": round((len(done) - 1) / (done[-1] - done[0]), 2)
            if len(done) > 1
            else None,
            "latency_ms": {page: _latency(values) for page, values in own.items()},
            "migration": _line(lines, " migrated from version 1"),
            "retention": _line(lines, "ledger retention: "),
        }

    def _config(self, run_dir: Path, port: int, retention_days: float) -> Path:
        path = run_dir / "bridge.yaml"
        config = {
            "source": {"url": self.source.url},
            "targets": [{"name": name, "url": t.url} for name, t in self.targets.items()],
            "state_dir": str(self.state_dir),
            "http_listen": f"127.0.0.1:{port}",
            "ledger_retention_days": retention_days,
        }
        path.write_text(json.dumps(config))  # JSON is YAML
        return path

    def status_seconds(self) -> float:
        """`status --json` as a person runs it, the bridge stopped."""
        return status_seconds(self._config(self.work, free_ports(1)[0], 90))

    def prune(self) -> dict[str, Any]:
        """Retention's pass (90 days) over the ledger, as the bridge's thread runs it."""
        state = State(self.state_dir)
        try:
            retention = Retention(state, 90)
            began = time.monotonic()
            retention.run_once()
            seconds = time.monotonic() - began
            state._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            state.close()
        return {
            "rows": retention.pruned,
            "seconds": round(seconds, 1),
            "batches": retention.batches,
            "longest_batch_ms": round(retention.longest_batch * 1000, 1),
            "mean_batch_ms": round(retention.held / max(1, retention.batches) * 1000, 2),
        }


def renamed(files: Sequence[bytes]) -> list[bytes]:
    """The same slices under new SOP Instance UIDs: new instances for the source and ledger."""
    import pydicom
    from pydicom.uid import generate_uid

    out = []
    for data in files:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def _line(lines: list[str], marker: str) -> str | None:
    found = [line for line in lines if marker in line]
    return found[-1][24:] if found else None


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
