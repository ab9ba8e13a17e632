"""The cluster engine: transfers run on Dask workers, the ledger stays on this coordinator.

The pipeline keeps the feed, the cursor and the ledger here. `ClusterTransfer.start` hands an
instance to a `Batches` queue, which sends small batches of IDs as Dask tasks (Dask costs about
1 ms per task, a CT slice 25 ms of decoding) and resolves each instance's own future when its
batch answers; no thread waits per instance. Workers download, transcode, upload and verify
(bridge.engine.remote); only the decision to delete an original is taken here, in a few threads of
our own, after the worker verified the copy, exactly as on one machine.

Failures: a lost worker costs Dask a re-execution elsewhere (our transfers are idempotent). A
batch that keeps killing workers (`KilledWorker`) is split in halves until the instance that
kills them is alone; that one is recorded as failed. A lost scheduler, or a server that stays
down for a worker, is a TransientError: the instance is sent again after the retry policy's
backoff (a timer, not a waiting thread), while the Dask client reconnects by itself.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from bridge import __version__, metrics
from bridge.config import MIB, ClusterConfig, Config
from bridge.engine.budget import ByteBudget
from bridge.engine.local import transcode_options
from bridge.engine.tasks import DASK_SETTINGS, TRANSFER_BATCH, WARM, Job, job, version
from bridge.errors import AccessDenied, ConfigError, Interrupted, TransientError, one_line
from bridge.outcomes import DELETING, FAILED, Entry, NewInstance, outcome_fields
from bridge.peers.orthanc import OrthancClient
from bridge.peers.retry import RetryPolicy, note_retry

log = logging.getLogger(__name__)

# How often the scheduler is asked how many workers it has.
_WORKERS_EVERY = 2.0
# How long a partial batch waits for more instances before it leaves.
_LINGER = 0.02
_POLL = 0.2


class ClusterError(TransientError):
    """Raised when the scheduler cannot be reached or loses a batch; the batch is sent again."""


def connect(config: ClusterConfig) -> Any:
    """A Dask client for the scheduler, after checking that every worker runs our version."""
    try:
        import dask.config
        from distributed import Client
        from distributed.security import Security
    except ImportError:
        raise ConfigError(
            "cluster: Dask is not installed; pip install 'orthanc-bridge[cluster]'"
        ) from None
    security = None
    if config.scheduler.startswith("tls://"):
        security = Security(  # type: ignore[no-untyped-call]
            tls_ca_file=config.tls_ca_file,
            tls_client_cert=config.tls_cert,
            tls_client_key=config.tls_key,
            require_encryption=True,
        )
    # The client's own ticks and system monitor, as the scheduler's and workers'.
    dask.config.update(dask.config.config, dask.config.collect_env(DASK_SETTINGS))
    try:
        client = Client(  # type: ignore[no-untyped-call]
            config.scheduler, security=security, timeout=30, set_as_default=False
        )
    except (OSError, TimeoutError) as exc:
        raise ClusterError(
            f"cluster: cannot reach the scheduler {config.scheduler}: {exc}"
        ) from None
    try:
        check_versions(client)
    except BaseException:
        client.close()  # type: ignore[no-untyped-call]
        raise
    return client


def check_versions(client: Any) -> None:
    """Refuse workers that run another orthanc-bridge, or none at all."""
    try:
        versions: dict[str, str] = client.run(version, on_error="return")
    except Exception as exc:
        raise ConfigError(f"cluster: cannot ask the workers their version: {exc}") from None
    wrong = {
        worker: (found if isinstance(found, str) else f"none ({type(found).__name__}: {found})")
        for worker, found in versions.items()
        if found != __version__
    }
    if wrong:
        listing = "; ".join(f"{worker} runs {found}" for worker, found in sorted(wrong.items()))
        raise ConfigError(
            f"cluster: every worker must run orthanc-bridge {__version__}, like this "
            f"coordinator: {listing}"
        )
    log.info(
        "cluster: %s, %d workers with %d threads, orthanc-bridge %s everywhere",
        client.scheduler.address,
        len(versions),
        sum(client.nthreads().values()),
        __version__,
    )


@dataclass
class _Waiting:
    instance_id: str
    outcome: Future[Entry]


class Batches:
    """Groups instance IDs into Dask tasks and hands each caller its own outcome."""

    def __init__(self, client: Any, job: Job, batch_size: int, stop: threading.Event) -> None:
        self._client = client
        self._job = job
        self._size = batch_size
        self._stop = stop
        self._lock = threading.Condition()
        self._queue: collections.deque[_Waiting] = collections.deque()
        # Halves of a batch that killed its workers, sent before anything else, as they are.
        self._split: collections.deque[list[_Waiting]] = collections.deque()
        # The workers the scheduler has, as last asked: read by /metrics, /readyz and the page.
        found = client.nthreads()
        self.workers, self.threads = len(found), sum(found.values())
        # Batches in flight: enough to keep every worker thread busy with one waiting behind.
        threads = self.threads or 1
        self._room = threading.BoundedSemaphore(max(2, 2 * threads))
        self.limit = max(2, 2 * threads) * batch_size  # instances worth having in flight
        self._closed = False
        self._inflight: dict[int, list[_Waiting]] = {}
        self._keys = itertools.count()
        self._disconnected = False
        self._thread = threading.Thread(target=self._send_batches, name="cluster", daemon=True)
        self._thread.start()
        threading.Thread(target=self._count_workers, name="cluster-workers", daemon=True).start()
        self._warm()

    def _count_workers(self) -> None:
        """Ask the scheduler its workers every few seconds, in a thread of its own: an answer
        that is slow to come holds up nothing else."""
        while not self._closed and not self._stop.wait(_WORKERS_EVERY):
            try:
                if getattr(self._client, "status", "running") != "running":
                    raise ClusterError("not connected")
                found = self._client.nthreads()
            except Exception:  # lost, or reconnecting: no worker to count on
                found = {}
            self.workers, self.threads = len(found), sum(found.values())

    def problem(self) -> str | None:
        """Why the cluster cannot take work now (for /readyz); None when it can."""
        status = getattr(self._client, "status", "running")
        address = getattr(getattr(self._client, "scheduler", None), "address", "the scheduler")
        if status != "running":
            return f"the Dask scheduler {address} is lost ({status}); reconnecting"
        if not self.workers:
            return f"no Dask worker is connected to the scheduler {address}"
        return None

    def _warm(self) -> None:
        """Have every worker start its decoding process now (bridge.engine.remote.warm)."""
        try:
            answers = self._client.run(WARM, self._job, on_error="return")
        except Exception as exc:  # the first batches will say what is wrong
            log.warning("cluster: could not prepare the workers: %s", exc)
            return
        for worker, answer in sorted(answers.items()):
            if isinstance(answer, BaseException):
                log.warning("cluster: worker %s could not prepare: %s", worker, answer)

    def send(self, instance_id: str) -> Future[Entry]:
        """Send `instance_id` with the next batch; its outcome arrives in the future returned
        (Interrupted once the bridge stops: it is then redone on restart)."""
        waiting = _Waiting(instance_id, Future())
        with self._lock:
            if self._stop.is_set() or self._closed:
                _resolve(waiting.outcome, Interrupted("shutting down"))
            else:
                self._queue.append(waiting)
                self._lock.notify()
        return waiting.outcome

    def close(self) -> None:
        """Stop sending; callers still waiting are given Interrupted."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout=5)
        self._interrupt_all()

    def _send_batches(self) -> None:
        while True:
            if self._stop.is_set():
                self._interrupt_all()
            batch = self._next_batch()
            if batch is None:
                return
            self._watch_connection()
            if not batch:
                continue
            while not self._room.acquire(timeout=_POLL):
                if self._closed:
                    return
                self._watch_connection()
            self._submit(batch)

    def _interrupt_all(self) -> None:
        """The bridge stops: every caller still waiting, queued or in flight, is told so at
        once (a batch in flight goes on on its worker; its outcome is ignored)."""
        with self._lock:
            waiting = [*self._queue, *(w for batch in self._split for w in batch)]
            waiting += [w for batch in self._inflight.values() for w in batch]
            self._queue.clear()
            self._split.clear()
        for each in waiting:
            _resolve(each.outcome, Interrupted("shutting down"))

    def _watch_connection(self) -> None:
        """After the client lost its scheduler and reconnected, nothing sent before will ever
        answer (a new scheduler knows none of it): fail those batches so that they are sent
        again. Running one twice is safe; only the first outcome is kept."""
        status = getattr(self._client, "status", "running")
        if status != "running":
            self._disconnected = True
        elif self._disconnected:
            self._disconnected = False
            with self._lock:
                lost = list(self._inflight)
            if lost:
                log.warning(
                    "cluster: reconnected to the scheduler; sending %d batches again", len(lost)
                )
            for key in lost:
                self._settle(key, ClusterError("cluster: the scheduler was lost while it ran"))

    def _next_batch(self) -> list[_Waiting] | None:
        """The next batch to send; [] when none came within a moment, None once closed."""
        with self._lock:
            if self._closed:
                return None
            if not self._queue and not self._split:
                self._lock.wait(_POLL)
                if not self._queue and not self._split:
                    return []
            if self._split:
                return self._split.popleft()
            if len(self._queue) < self._size:
                # A moment for the rest of a burst to arrive: fuller tasks, fewer of them.
                self._lock.wait(_LINGER)
            count = min(self._size, len(self._queue))
            return [self._queue.popleft() for _ in range(count)]

    def _submit(self, batch: list[_Waiting]) -> None:
        ids = [w.instance_id for w in batch]
        key = next(self._keys)
        with self._lock:
            self._inflight[key] = batch
        try:
            future = self._client.submit(TRANSFER_BATCH, self._job, ids, pure=False)
        except Exception as exc:  # the client lost its scheduler
            self._settle(key, ClusterError(f"cluster: cannot send a batch: {exc}"))
            return
        future.add_done_callback(lambda done: self._finished(done, key))

    def _finished(self, done: Any, key: int) -> None:
        try:
            entries: list[Entry] = done.result()
        except (TransientError, AccessDenied) as exc:
            self._settle(key, exc)
        except CancelledError as exc:  # the scheduler was lost, or the client closed
            self._settle(key, ClusterError(f"cluster: a batch was lost: {exc!r}"))
        except Exception as exc:
            if type(exc).__name__ == "KilledWorker":
                batch = self._settle(key, None)
                if batch:
                    self._killed(batch, exc)
            elif type(exc).__name__ == "CommClosedError":
                self._settle(key, ClusterError(f"cluster: a batch was lost: {exc!r}"))
            else:
                self._settle(key, exc)
        else:
            batch = self._settle(key, None)
            for waiting, entry in zip(batch or [], entries, strict=False):
                _resolve(waiting.outcome, entry)

    def _settle(self, key: int, error: BaseException | None) -> list[_Waiting] | None:
        """Take batch `key` out of flight (once: a late answer finds it gone) and give its
        callers `error`, if any; the batch, or None if it was already settled."""
        with self._lock:
            batch = self._inflight.pop(key, None)
        if batch is None:
            return None
        self._room.release()
        if error is not None:
            for waiting in batch:
                _resolve(waiting.outcome, error)
        return batch

    def _killed(self, batch: list[_Waiting], exc: Exception) -> None:
        """A batch killed the workers that ran it: split it to find the instance to blame."""
        if len(batch) == 1:
            waiting = batch[0]
            _resolve(
                waiting.outcome,
                Entry(
                    waiting.instance_id,
                    None,
                    FAILED,
                    error="its transfer killed every cluster worker that ran it (a decoder "
                    "crash or out of memory)",
                ),
            )
            return
        log.warning(
            "cluster: a batch of %d instances killed its workers; splitting it to find which",
            len(batch),
        )
        half = len(batch) // 2
        with self._lock:
            self._split.extend((batch[:half], batch[half:]))
            self._lock.notify()


def _resolve(outcome: Future[Entry], result: Entry | BaseException) -> None:
    """Give a waiting caller its result, unless an earlier one was given already."""
    if outcome.done():
        return
    try:
        if isinstance(result, BaseException):
            outcome.set_exception(result)
        else:
            outcome.set_result(result)
    except InvalidStateError:
        pass  # resolved meanwhile by another thread


class _Later:
    """Runs functions after a delay, in one thread; all of them at once when the bridge stops
    (each then sees the stop and gives up)."""

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="cluster-retry", daemon=True)
        self._thread.start()

    def call(self, delay: float, fn: Callable[[], None]) -> None:
        """Run `fn` in `delay` seconds."""
        with self._changed:
            heapq.heappush(self._due, (time.monotonic() + delay, next(self._order), fn))
            self._changed.notify()

    def close(self) -> None:
        """Run what is still due now, then end."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                ending = self._closed or self._stop.is_set()
                if not self._due and self._closed:
                    return
                if self._due and (ending or self._due[0][0] <= now):
                    fn = heapq.heappop(self._due)[2]
                else:
                    wait = self._due[0][0] - now if self._due else _POLL
                    self._changed.wait(min(wait, _POLL))
                    continue
            try:
                fn()
            except Exception as exc:  # never expected: each fn resolves its own outcome
                log.error("cluster: a retry failed: %s", one_line(exc))


class ClusterTransfer:
    """The coordinator's side of one instance: a worker moves it, this process deletes it.

    Nothing here waits for a worker: `start` queues the instance and returns a future, and the
    worker's answer is handled by a few threads of this class (deleting the original, sending
    it again after a transient failure), however many instances are in flight (thousands for
    a cluster of 64 threads). A thread per instance, each polling its outcome, cost about
    2,000 threads there.
    """

    THREADS = 4  # for the answers: deletions and their ledger rows

    def __init__(
        self,
        batches: Batches,
        source: OrthancClient,
        delete_original: bool,
        retry: RetryPolicy,
        record: Callable[[Entry], None],
    ) -> None:
        self._batches = batches
        self._source = source
        self._delete_original = delete_original
        self._retry = retry
        self._record = record
        self._answers = ThreadPoolExecutor(self.THREADS, thread_name_prefix="cluster-outcome")
        self._later = _Later(retry.stop)

    def start(self, item: NewInstance) -> Future[Entry]:
        """Move one instance on the cluster; its outcome arrives in the future, with what
        Transfer.run would raise (TransientError once the retries give up, Interrupted)."""
        outcome: Future[Entry] = Future()
        self._send(item, outcome, _Tries(time.monotonic()))
        return outcome

    def close(self) -> None:
        """Stop handling answers; outcomes still awaited are given Interrupted."""
        self._later.close()
        self._answers.shutdown(wait=True, cancel_futures=True)

    def _send(self, item: NewInstance, outcome: Future[Entry], tries: _Tries) -> None:
        if self._retry.stop.is_set():
            _resolve(outcome, Interrupted("shutting down"))
            return
        sent = self._batches.send(item.instance_id)
        sent.add_done_callback(lambda done: self._answered(item, done, outcome, tries))

    def _answered(
        self, item: NewInstance, done: Future[Entry], outcome: Future[Entry], tries: _Tries
    ) -> None:
        """A worker's answer (in Dask's callback thread): handled in our threads."""
        try:
            self._answers.submit(self._handle, item, done, outcome, tries)
        except RuntimeError:  # closed: the bridge is stopping
            _resolve(outcome, Interrupted("shutting down"))

    def _handle(
        self, item: NewInstance, done: Future[Entry], outcome: Future[Entry], tries: _Tries
    ) -> None:
        try:
            entry = done.result()
        except TransientError as exc:
            tries.failed += 1
            wait = self._retry.wait_before(tries.failed, tries.failing_since())
            if wait is None:  # stopping, or failing for longer than the policy allows
                stopping = self._retry.stop.is_set()
                _resolve(outcome, Interrupted("shutting down") if stopping else exc)
                return
            note_retry(None, exc, tries.failed, wait)
            self._later.call(wait, lambda: self._send(item, outcome, tries))
            return
        except BaseException as exc:
            _resolve(outcome, exc)
            return
        try:
            _resolve(outcome, self._finish(item, replace(entry, seq=item.seq), tries.started))
        except BaseException as exc:
            _resolve(outcome, exc)

    def _finish(self, item: NewInstance, entry: Entry, started: float) -> Entry:
        """Delete the original once every copy is verified, and log the outcome."""
        iid = item.instance_id
        if entry.deletable and self._delete_original:
            # The worker verified every copy (it always does when originals are deleted).
            self._record(replace(entry, state=DELETING))
            self._source.delete(iid)  # one already gone is not an error
            entry = replace(entry, deleted_original=True)
        fields = outcome_fields(iid, entry.state, entry.source_syntax, started)
        log.info(
            "instance %s: %s on the cluster in %d ms%s",
            iid,
            entry.state,
            fields["ms"],
            f": {entry.error}" if entry.error else "",
            extra=fields,
        )
        return entry


@dataclass
class _Tries:
    """How one instance has fared on the cluster so far."""

    started: float  # time.monotonic() when it was first sent
    failed: int = 0  # transient failures in a row
    first_failure: float | None = None

    def failing_since(self) -> float:
        """When the current run of transient failures began (noted at the first)."""
        if self.first_failure is None:
            self.first_failure = time.monotonic()
        return self.first_failure


class ClusterEngine:
    """The engine on a Dask cluster: workers move the instances, this process deletes them."""

    def __init__(
        self,
        config: Config,
        cluster: ClusterConfig,
        source: OrthancClient,
        record: Callable[[Entry], None],
        stop: threading.Event,
    ) -> None:
        self.budget = ByteBudget(config.max_inflight_mb * MIB, stop)  # nothing held here
        self._scheduler = cluster.scheduler
        self._batches = Batches(
            connect(cluster),
            job(source.server, config.targets, transcode_options(config), config.delete_original),
            cluster.batch_size,
            stop,
        )
        self._transfer = ClusterTransfer(
            self._batches, source, config.delete_original, source.retry, record
        )
        self.threads = ClusterTransfer.THREADS
        self.slots = self._batches.limit + 2
        self.decoders_configured = 0
        batches = self._batches
        metrics.CLUSTER_WORKERS.set_function(lambda: batches.workers)

    def start(self, item: NewInstance) -> Future[Entry]:
        return self._transfer.start(item)

    def decoders_alive(self) -> int:
        return 0

    def decoder_restarts(self) -> int:
        return 0

    def where(self) -> str | None:
        return (
            f"{self._batches.workers} Dask workers with {self._batches.threads} threads, "
            f"at {self._scheduler}"
        )

    def problem(self) -> str | None:
        return self._batches.problem()

    def close(self) -> None:
        self._transfer.close()
        self._batches.close()
