"""A real Dask cluster on loopback for the tests: `dask scheduler` and `dask worker` processes,
started with the servers' credentials in the workers' environment, stopped by process id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from bridge.engine.tasks import DASK_SETTINGS
from tests.orthanc import ProcessFailed, free_ports, log_tail, port_accepts
from tests.polling import wait_for

REPO = Path(__file__).resolve().parent.parent
DASK = Path(sys.executable).parent / "dask"
START_TIMEOUT = 60.0


class DaskProcess:
    """One `dask ...` command in its own session, its output in a log file."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.argv = argv
        self.log = log
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if not DASK.exists():
            raise FileNotFoundError(f"{DASK} not found: run scripts/setup.sh")
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole session (a worker's nanny and its process alike)."""
        if self.running:
            assert self.process is not None
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.running:
            self.kill(signal.SIGTERM)


class DaskCluster:
    """A scheduler and `workers` single-threaded workers on loopback."""

    def __init__(self, workdir: Path, workers: int, env: dict[str, str]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_ports(1)[0]
        self.address = f"tcp://127.0.0.1:{self.port}"
        # The settings deploy/ gives the scheduler and workers (bridge.engine.tasks.DASK_SETTINGS).
        self.env = env | DASK_SETTINGS | {"PYTHONPATH": str(REPO)}
        self.env["DASK_DISTRIBUTED__WORKER__DAEMON"] = "False"
        self.scheduler = DaskProcess(
            [
                str(DASK),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-dashboard",
            ],
            workdir / "scheduler.log",
            self.env,
        )
        self.workers = [self._worker(n) for n in range(workers)]

    def _worker(self, number: int) -> DaskProcess:
        argv = [
            str(DASK),
            "worker",
            self.address,
            "--name",
            f"w{number}",
            "--nthreads",
            "1",
            "--nworkers",
            "1",
            "--no-dashboard",
            "--memory-limit",
            "0",
            # As deploy/ runs them: the decoders' parent starts with the worker.
            "--preload",
            "bridge.engine.remote",
        ]
        return DaskProcess(argv, self.workdir / f"worker-{number}.log", self.env)

    def start(self) -> None:
        self.scheduler.start()
        wait_for(lambda: port_accepts(self.port), START_TIMEOUT, "the Dask scheduler")
        for worker in self.workers:
            worker.start()
        if self.workers:
            self.wait_for_workers(len(self.workers))

    def wait_for_workers(self, count: int) -> None:
        """Until `count` workers have joined the scheduler."""
        from distributed import Client

        with Client(self.address, timeout=30, set_as_default=False) as client:  # type: ignore[no-untyped-call]
            try:
                client.wait_for_workers(count, timeout=START_TIMEOUT)
            except TimeoutError:
                logs = "\n".join(log_tail(w.log) for w in self.workers)
                raise ProcessFailed(f"{count} Dask workers did not join:\n{logs}") from None

    def stop(self) -> None:
        for process in (*self.workers, self.scheduler):
            process.kill()
