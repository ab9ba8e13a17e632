"""What a Dask worker runs: a batch of instance IDs in, their outcomes out (bridge.engine.cluster).

A worker is a plain `dask worker` process with orthanc-bridge installed. Everything it needs
besides the IDs comes in the `Job` sent with each task, except credentials: those it reads
from its own environment (BRIDGE_SOURCE_USERNAME, BRIDGE_SOURCE_PASSWORD, BRIDGE_TARGET_...),
so that no password crosses the scheduler. Pixel data goes from the source to the worker to
the target: never through the scheduler or the coordinator, which get only `Entry` outcomes.

The worker downloads, transcodes, uploads and verifies, exactly as bridge.engine.transfer does on
one machine; it never deletes an original. The coordinator keeps the ledger and decides that.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import sys
import threading
from dataclasses import replace

from bridge import __version__
from bridge.config import ServerConfig, TargetConfig, target_env_prefix
from bridge.decoding import zygote
from bridge.decoding.pool import DecoderPool
from bridge.dicom.header import decoded_size
from bridge.engine.budget import ByteBudget
from bridge.engine.destinations import destination_for, peer_for
from bridge.engine.tasks import Job
from bridge.engine.transfer import Transfer
from bridge.outcomes import Entry, NewInstance
from bridge.peers.orthanc import OrthancClient
from bridge.peers.retry import RetryPolicy

log = logging.getLogger(__name__)

# Instances one task moves at once: one downloading, one decoding, one uploading.
OVERLAP = 3

# What Dask's nanny sets for its workers (distributed.nanny.pre-spawn-environ).
_DASK_TRIM_THRESHOLD = "65536"

# A worker gives up on a server after this long and lets the coordinator decide (it retries
# the batch for ever in `run`): a worker never blocks a slot of the cluster indefinitely.
WORKER_RETRY_SECONDS = 60.0


def dask_setup(worker: object) -> None:
    """`dask worker --preload bridge.engine.remote`: start the decoders' parent with the worker.

    It imports the decoders (0.5 s) long before the first batch arrives, instead of when the
    coordinator connects (`warm`); the decoding processes are then forked from it at once.
    """
    _keep_decoders_memory()
    zygote.start()


def warm(job: Job) -> None:
    """Get ready for `job`'s tasks: connections set up, decoding process started.

    Run on every worker when the coordinator connects (bridge.engine.cluster), as one machine forks
    its decoding processes at start: they import the decoders while the feed reads its first
    page, instead of when the first batch arrives.
    """
    _transfer(job)


def transfer_batch(job: Job, instance_ids: list[str]) -> list[Entry]:
    """Move each instance to its targets; permanent problems come back as entries.

    A server that stays down raises TransientError: the coordinator sends the batch again.
    """
    transfer = _transfer(job)
    threads = _threads()
    _leave_the_slot()
    # A few at a time: one's download and upload overlap another's decoding, which runs in a
    # process of its own, so that a worker's core decodes while its network waits.
    return list(threads.map(lambda iid: transfer.run(NewInstance(-1, iid)), instance_ids))


def _leave_the_slot() -> None:
    """Let Dask start the worker's next batch now; this one's instances still queue here.

    Without it, a worker's core idles at the end of each batch, while its last instance
    uploads and the next batch has not begun. (Its own effect was within this machine's noise:
    0.82 of the local engine before, 0.80 after, in runs minutes apart.) The worker's own
    threads (_threads) bound what runs at once, and the coordinator bounds the batches in
    flight, so a worker never takes on more than those.
    """
    try:
        from distributed import secede
    except ImportError:
        return
    with contextlib.suppress(ValueError):  # not in a Dask worker (unit tests)
        secede()  # type: ignore[no-untyped-call]


def _slots() -> int:
    """The tasks this Dask worker runs at once (1 outside a worker, as in unit tests)."""
    try:
        from distributed import get_worker

        return max(1, get_worker().state.nthreads)
    except (ImportError, ValueError):
        return 1


@functools.lru_cache(maxsize=1)
def _threads() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that move instances, kept for the worker's life (see _quiet_profiler)."""
    _quiet_profiler()
    return concurrent.futures.ThreadPoolExecutor(
        OVERLAP * _slots(), thread_name_prefix="orthanc-bridge"
    )


def _quiet_profiler() -> None:
    """Stop Dask's statistical profiler in this worker when Python is older than 3.12.

    It calls sys._current_frames() every 10 ms, which on 3.11 deadlocks the whole process if
    the garbage collector frees a threading.local meanwhile (CPython gh-106883, fixed in 3.12
    only; dask/distributed#8616). The bridge no longer leaves such garbage, but libraries it
    uses might; the profile only feeds Dask's dashboard. Deployments set
    DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False as well.
    """
    if sys.version_info >= (3, 12):
        return
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return
    profiler = worker.periodic_callbacks.get("profile")
    if profiler is not None and profiler.is_running():
        worker.loop.add_callback(profiler.stop)  # the loop's own thread stops it
        log.warning(
            "Dask's profiler stopped in this worker: on Python %d.%d it can deadlock the "
            "process (CPython gh-106883); set DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False",
            *sys.version_info[:2],
        )


@functools.lru_cache(maxsize=4)
def _transfer(job: Job) -> Transfer:
    """One Transfer per Job in this worker process: its connections are kept between tasks."""
    if job.version != __version__:  # the coordinator checked at connect; a worker may change
        raise RuntimeError(f"this worker runs orthanc-bridge {__version__}, not {job.version}")
    never = threading.Event()
    retry = RetryPolicy(never, max_wait=WORKER_RETRY_SECONDS)
    source = OrthancClient(_with_credentials(job.source, "BRIDGE_SOURCE_"), "source", retry)
    targets = [destination_for(t, peer_for(_with_secrets(t), retry), never) for t in job.targets]
    limit = job.options.max_decoded_bytes
    # Decoding in decoding processes of the worker's own, one per Dask thread, as on one
    # machine: the same memory and time limits, a decoder crash costs that process, not the
    # Dask worker, and no decoder holds the GIL in a thread beside Dask's.
    _keep_decoders_memory()
    decoder = DecoderPool(_slots(), job.options, never)
    return Transfer(
        source,
        targets,
        decoder.decode,
        job.verify_for_deletion,
        never,
        ByteBudget(1 << 62, never),  # a worker's memory is bounded by its threads
        lambda entry: None,  # the coordinator keeps the ledger
        lambda data: decoded_size(data, limit) or 0,
        deletes=False,
    )


def _keep_decoders_memory() -> None:
    """Let the decoding processes keep freed memory, as they do outside Dask.

    Dask's nanny starts its worker with MALLOC_TRIM_THRESHOLD_=65536, so that a worker hands
    memory back between tasks; the decoding processes inherited it and gave their buffers back
    after every instance, to page them in again for the next (bridge.decoding.zygote keeps 32 MiB
    instead, and honours a variable the user set). Measured: 20.6 against 18.6 to 19.1 CPU s
    of decoding for 400 CT slices (8 to 10% more). A value of the user's own is left alone.
    """
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") == _DASK_TRIM_THRESHOLD:
        del os.environ["MALLOC_TRIM_THRESHOLD_"]


def _with_secrets(target: TargetConfig) -> TargetConfig:
    """The target with this worker's secrets from its environment, if it has them."""
    prefix = target_env_prefix(target.name)
    server = _with_credentials(target.server, prefix)
    dicomweb = target.dicomweb
    if dicomweb is not None:
        dicomweb = replace(dicomweb, token=os.environ.get(f"{prefix}TOKEN") or None)
    return replace(target, server=server, dicomweb=dicomweb)


def _with_credentials(server: ServerConfig, prefix: str) -> ServerConfig:
    """The server with this worker's credentials from its environment, if it has them."""
    username = os.environ.get(f"{prefix}USERNAME") or server.username
    password = os.environ.get(f"{prefix}PASSWORD")
    return replace(server, username=username, password=password)
