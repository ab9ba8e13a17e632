"""The source's instances that some target lacks, for `reconcile`, in bounded memory.

Each server's listing streams into a throwaway SQLite file in the state directory, page by
page; the comparison is a query, and the missing IDs come back as a stream. Orthanc lists
`/instances` by its internal id, not by ID, so two listings cannot simply be merged: the file
sorts them instead of memory. A source and a target of a million instances each take about
200 MiB of disk while it runs, and a few MiB of memory (SQLite's page cache) at any size.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from queue import Full, Queue

from bridge.errors import StateError


class Inventory:
    """Instance IDs listed by the source and the targets; what the targets lack."""

    FILE = "reconcile.sqlite"

    def __init__(self, directory: Path) -> None:
        self.path = directory / self.FILE
        # Nobody else uses it (the state directory has one bridge at a time): one that a
        # killed reconcile left behind is simply replaced.
        self.path.unlink(missing_ok=True)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None)
            # A scratch file: nothing to recover after a crash, so no journal and no fsync.
            self._db.execute("PRAGMA journal_mode = OFF")
            self._db.execute("PRAGMA synchronous = OFF")
            self._db.execute("CREATE TABLE source (id TEXT NOT NULL)")
            self._db.execute("CREATE TABLE missing (id TEXT PRIMARY KEY) WITHOUT ROWID")
        except sqlite3.Error as exc:
            raise StateError(f"cannot make {self.path} to compare the servers: {exc}") from exc
        self.listed = 0  # IDs read so far from the server being listed (progress)

    def list_source(self, pages: Iterable[list[str]]) -> int:
        """Read the source's listing; how many IDs it gave."""
        return self._load("source", pages)

    def list_target(self, pages: Iterable[list[str]]) -> int:
        """Read one target's listing (replacing the previous target's); how many IDs it gave."""
        with _scratch(self.path):
            self._db.execute("DROP TABLE IF EXISTS target")
            self._db.execute("CREATE TABLE target (id TEXT NOT NULL)")
        return self._load("target", pages)

    def subtract_target(self) -> None:
        """Add the source's instances that the last target listed lacks to the missing."""
        with _scratch(self.path):
            # Appended in Orthanc's order, indexed once at the end (an external sort: several
            # times faster than inserting a million IDs into an index one by one), and both
            # indexes walked in step, so that each lookup lands next to the one before.
            self._db.execute("CREATE INDEX IF NOT EXISTS source_id ON source (id)")
            self._db.execute("CREATE INDEX target_id ON target (id)")
            self._db.execute(
                "INSERT OR IGNORE INTO missing SELECT id FROM source INDEXED BY source_id"
                " WHERE NOT EXISTS (SELECT 1 FROM target WHERE target.id = source.id)"
                " ORDER BY id"
            )
            self._db.execute("DROP TABLE target")

    def missing_count(self) -> int:
        """How many of the source's instances some target lacks."""
        return int(self._db.execute("SELECT count(*) FROM missing").fetchone()[0])

    def missing(self) -> Iterator[str]:
        """The IDs of the source's instances that some target lacks, sorted, one at a time."""
        for (iid,) in self._db.execute("SELECT id FROM missing ORDER BY id"):
            yield iid

    def close(self) -> None:
        """Close and delete the file."""
        self._db.close()
        self.path.unlink(missing_ok=True)

    def _load(self, table: str, pages: Iterable[list[str]]) -> int:
        self.listed = 0
        with _scratch(self.path):
            self._db.execute("BEGIN")
            for page in pages:
                self._db.executemany(f"INSERT INTO {table} (id) VALUES (?)", ((i,) for i in page))
                self.listed += len(page)
            self._db.execute("COMMIT")
        return self.listed


def read_ahead(pages: Iterator[list[str]], depth: int = 2) -> Generator[list[str], None, None]:
    """`pages`, fetched by a thread of their own up to `depth` pages ahead of the reader: the
    next request is on the wire while this page goes into SQLite. Errors come out in order."""
    queue: Queue[list[str] | BaseException | None] = Queue(maxsize=depth)
    done = threading.Event()  # the reader left: the fetcher stops too

    def put(item: list[str] | BaseException | None) -> bool:
        while not done.is_set():
            try:
                queue.put(item, timeout=0.2)
                return True
            except Full:
                pass
        return False

    def fetch() -> None:
        try:
            for page in pages:
                if not put(page):
                    return
        except BaseException as exc:  # handed to the reader, who raises it
            put(exc)
            return
        put(None)

    fetcher = threading.Thread(target=fetch, name="listing", daemon=True)
    fetcher.start()
    try:
        while (item := queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        done.set()
        fetcher.join()


@contextmanager
def _scratch(path: Path) -> Iterator[None]:
    """SQLite's errors (a full disk, mostly) as StateError, naming the file."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StateError(f"{path}: cannot write the comparison of the servers: {exc}") from exc
