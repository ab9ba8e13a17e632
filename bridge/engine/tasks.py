"""What crosses to a Dask worker: the Job every task carries, the settings both sides apply, and
the worker's functions by name.

The coordinator (bridge.engine.cluster) never imports the worker's module (bridge.engine.remote,
which starts decoding processes): it sends `WORKER.warm` and `WORKER.transfer_batch`, which
Dask pickles as a name and each worker resolves in its own import of the module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import Any

from bridge import __version__
from bridge.config import ServerConfig, TargetConfig
from bridge.jobs import TranscodeOptions

# Dask settings for the scheduler and every worker, as environment variables (deploy/ sets them;
# the coordinator applies the same to its client). Dask's defaults feed its dashboard: a tick
# every 20 ms to detect a blocked event loop, a system monitor every 0.5 s and a statistical
# profiler every 10 ms. On the 2-core test machine they cost a scheduler and two workers 22% of
# a core when idle, and under load took the cluster's CPU per instance from 42 ms to 100 ms
# (600 instances of pydicom's GDCMJ2K_TextGBR.dcm: 59.9 CPU s against 25.0 with these
# settings, the local engine 28.3). The profiler can also deadlock a worker on Python 3.11
# (see _quiet_profiler).
DASK_SETTINGS = {
    "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
    "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "1s",
    "DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL": "5s",
}


@dataclass(frozen=True)
class Job:
    """What every task of one coordinator carries besides its instance IDs: no secrets."""

    version: str
    source: ServerConfig  # without password
    targets: tuple[TargetConfig, ...]  # without passwords
    options: TranscodeOptions
    verify_for_deletion: bool  # delete_original: every copy is verified, never trusted


def job(
    source: ServerConfig,
    targets: tuple[TargetConfig, ...],
    options: TranscodeOptions,
    delete_original: bool,
) -> Job:
    """The Job for these settings, with the passwords left out."""
    return Job(
        __version__,
        replace(source, password=None),
        tuple(_without_secrets(t) for t in targets),
        options,
        delete_original,
    )


def _without_secrets(target: TargetConfig) -> TargetConfig:
    """The target without its password or token: each worker reads its own (see remote)."""
    dicomweb = target.dicomweb and replace(target.dicomweb, token=None)
    return replace(target, server=replace(target.server, password=None), dicomweb=dicomweb)


def version() -> str:
    """The orthanc-bridge version this worker runs (the coordinator refuses a mismatch)."""
    return __version__


@dataclass(frozen=True)
class WorkerFunction:
    """A function of bridge.engine.remote, named here and called on the worker."""

    name: str

    @property
    def __name__(self) -> str:  # Dask names tasks after their function
        return self.name

    def __call__(self, *args: Any) -> Any:
        module = importlib.import_module("bridge.engine.remote")
        return getattr(module, self.name)(*args)


WARM = WorkerFunction("warm")
TRANSFER_BATCH = WorkerFunction("transfer_batch")
