"""The engine on one machine: transfer threads, and decoding processes on every core.

Transfer threads download and upload (network I/O releases the GIL) while a pool of worker
processes decodes (no JPEG 2000 decoder releases the GIL, so threads would not help).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from bridge.config import MIB, Config
from bridge.decoding.pool import DecoderPool
from bridge.dicom.header import decoded_size
from bridge.engine.budget import ByteBudget
from bridge.engine.destinations import destination_for
from bridge.engine.transfer import Transfer
from bridge.jobs import TranscodeOptions
from bridge.outcomes import Entry, NewInstance
from bridge.peers.orthanc import OrthancClient
from bridge.peers.peer import Peer


def transcode_options(config: Config) -> TranscodeOptions:
    """What each decoding is allowed and asked, from the configuration."""
    return TranscodeOptions(
        max_decoded_bytes=config.max_decoded_mb * MIB,
        forward_unchanged=config.forward_unchanged,
        decode_timeout=config.decode_timeout,
    )


class LocalEngine:
    """Transfer.run in a pool of threads: each one downloads, waits for its decode, uploads."""

    def __init__(
        self,
        config: Config,
        source: OrthancClient,
        targets: Sequence[Peer],  # one per config.targets, in that order
        record: Callable[[Entry], None],
        stop: threading.Event,
    ) -> None:
        workers = config.worker_count
        options = transcode_options(config)
        self.budget = ByteBudget(config.max_inflight_mb * MIB, stop)
        self._decoder = DecoderPool(workers, options, stop)
        max_decoded = options.max_decoded_bytes  # larger ones are refused
        self._transfer = Transfer(
            source,
            [
                destination_for(target, peer, stop)
                for target, peer in zip(config.targets, targets, strict=True)
            ],
            self._decoder.decode,
            config.delete_original,
            stop,
            self.budget,
            record,
            lambda data: decoded_size(data, max_decoded) or 0,
        )
        # Enough threads that every decoding process has the next instance downloaded and the
        # previous one uploading.
        self.threads = workers * 2 + 2
        self.slots = workers * 3 + 2
        self.decoders_configured = workers
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="transfer")

    def start(self, item: NewInstance) -> Future[Entry]:
        return self._pool.submit(self._transfer.run, item)

    def decoders_alive(self) -> int:
        return self._decoder.alive()

    def decoder_restarts(self) -> int:
        return self._decoder.restarts

    def where(self) -> str | None:
        return None

    def problem(self) -> str | None:
        return None

    def close(self) -> None:
        """Stop the threads, then the decoding processes, without waiting for abandoned decodes."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._decoder.close()
