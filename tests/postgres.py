"""A private PostgreSQL 15 for the tests: the shared index of an Orthanc cluster.

Debian's server binaries (/usr/lib/postgresql/15/bin, override with POSTGRES_BIN_DIR) run on a
free loopback port with a throw-away data directory, trusting every loopback connection. initdb
and postgres refuse to run as root, so as root (CI) they run as the `postgres` system user. A
missing PostgreSQL raises an error instead of skipping: in CI it must fail the tests.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.orthanc import ChildProcess, ProcessFailed, free_ports, log_tail
from tests.polling import wait_for

POSTGRES_BIN_DIR = Path(os.environ.get("POSTGRES_BIN_DIR", "/usr/lib/postgresql/15/bin"))
INSTALL_HINT = "run scripts/setup.sh (apt-get install postgresql)"
SUPERUSER = "postgres"
# The system account that owns the cluster when the tests run as root.
SYSTEM_USER = "postgres"

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class PostgresServer:
    """A PostgreSQL on a free loopback port; log under `workdir`, data in a temporary directory.

    The data directory and the unix socket live in their own directory in the system temporary
    directory, removed by stop(), not under `workdir`: pytest makes its directories private to
    their owner, where the `postgres` user (as root) could not reach them, and a unix socket
    path must stay under 108 bytes.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_ports(1)[0]
        self.host = "127.0.0.1"
        self.log_path = workdir / "postgres.log"
        self._as_root = os.geteuid() == 0
        self._root: Path | None = None
        self._process = ChildProcess(self.log_path, stop_signal=signal.SIGINT)

    def __repr__(self) -> str:
        return f"PostgresServer({self.host}:{self.port})"

    @property
    def data_dir(self) -> Path:
        if self._root is None:
            raise RuntimeError("PostgreSQL not started")
        return self._root / "data"

    @property
    def socket_dir(self) -> Path:
        if self._root is None:
            raise RuntimeError("PostgreSQL not started")
        return self._root / "socket"

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process.running

    def _binary(self, name: str) -> str:
        path = POSTGRES_BIN_DIR / name
        if not os.access(path, os.X_OK):
            raise FileNotFoundError(f"PostgreSQL's {name} not found at {path}: {INSTALL_HINT}")
        return str(path)

    def _as_owner(self, argv: Sequence[str]) -> list[str]:
        """argv run as the cluster's owner: as is, or (as root) through setpriv as `postgres`.

        setpriv execs the command in place, so the process id is the server's own.
        """
        if not self._as_root:
            return list(argv)
        return [
            "setpriv",
            f"--reuid={SYSTEM_USER}",
            f"--regid={SYSTEM_USER}",
            "--init-groups",
            "--",
            *argv,
        ]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """initdb a fresh cluster, start the server, and return once it accepts connections."""
        if self.running:
            raise RuntimeError("PostgreSQL already running")
        initdb, postgres = self._binary("initdb"), self._binary("postgres")
        self._binary("pg_isready")
        self.workdir.mkdir(parents=True, exist_ok=True)
        owner = None
        if self._as_root:
            try:
                owner = pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                raise FileNotFoundError(
                    f"no {SYSTEM_USER!r} system user to run PostgreSQL as root: {INSTALL_HINT}"
                ) from None
        self._root = Path(tempfile.mkdtemp(prefix="pytest-pg-"))
        for path in (self.data_dir, self.socket_dir):
            path.mkdir(mode=0o700)
        if owner is not None:
            for path in (self._root, self.data_dir, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        with self.log_path.open("ab") as log:
            initialized = subprocess.run(
                self._as_owner(
                    [
                        initdb,
                        "-D",
                        str(self.data_dir),
                        "-U",
                        SUPERUSER,
                        "-A",
                        "trust",
                        "-E",
                        "UTF8",
                        "--no-sync",
                    ]
                ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._root,
                check=False,
            )
        if initialized.returncode != 0:
            self.stop()
            raise ProcessFailed(
                f"initdb exited with status {initialized.returncode}:\n{log_tail(self.log_path)}"
            )
        # Loopback only; `-A trust` above lets every local user in as any role.
        argv = [
            postgres,
            "-D",
            str(self.data_dir),
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-k",
            str(self.socket_dir),
            "-c",
            "fsync=off",
            "-c",
            "max_connections=100",
        ]
        self._process.spawn(self._as_owner(argv), cwd=self._root)
        try:
            wait_for(self._ready, timeout, f"PostgreSQL on {self.host}:{self.port}")
        except TimeoutError as exc:
            self.stop()
            raise ProcessFailed(f"{exc}\n{log_tail(self.log_path)}") from exc

    def _ready(self) -> bool:
        self._process.check_alive("PostgreSQL")
        probe = subprocess.run(
            [self._binary("pg_isready"), "-q", "-h", self.host, "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        return probe.returncode == 0

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL through psql over TCP as the superuser; return what it printed."""
        result = subprocess.run(
            [
                self._binary("psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str) -> None:
        """CREATE DATABASE `name` (UTF-8), owned by the superuser."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a plain database name: {name!r}")
        self.psql(f"CREATE DATABASE {name} ENCODING 'UTF8' TEMPLATE template0")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Fast shutdown (SIGINT: clients are disconnected), SIGKILL after `timeout`.

        Returns the server's exit status; the data directory is removed.
        """
        status = self._process.stop(timeout)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
        return status
