"""Real Orthanc servers and a DCMTK storescp "workstation" for the tests.

The servers are Debian's /usr/sbin/Orthanc (override with ORTHANC_BINARY, e.g.
`ORTHANC_BINARY=scripts/orthanc-next` for Debian 13's Orthanc 1.12), started on free loopback ports
with a generated configuration that loads no plugin (the DICOMweb one only when asked: `dicomweb`).
A missing binary raises an error instead of skipping: in CI a missing Orthanc must fail the tests,
not hide them.

Every test that runs Orthanc carries the `orthanc` marker (tests/conftest.py adds it to the users
of the fixtures), so that `pytest -m orthanc` is the whole real-server suite: starting a server
from a test without it is an error.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import random
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pydicom
import requests

from tests.polling import wait_for


def _binary_from_env(name: str, default: str) -> Path:
    """An executable named by an environment variable; a relative path is taken from here.

    The servers run in their own working directory, where `scripts/orthanc-next` would not be.
    """
    value = os.environ.get(name, default)
    return Path(value).absolute() if "/" in value else Path(value)


ORTHANC_BINARY = _binary_from_env("ORTHANC_BINARY", "/usr/sbin/Orthanc")
STORESCP_BINARY = Path(os.environ.get("STORESCP_BINARY", "/usr/bin/storescp"))
INSTALL_HINT = "run scripts/setup.sh (apt-get install orthanc dcmtk)"
# Debian's orthanc-dicomweb; the same path in the Debian 13 root of scripts/orthanc-next.
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 30.0

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"

JsonObject = dict[str, Any]


class ProcessFailed(RuntimeError):
    """Raised when a test server does not come up; the message carries its log tail."""


def free_ports(count: int) -> list[int]:
    """Return `count` distinct TCP ports that are free right now on every interface.

    Chosen below the kernel's ephemeral range: a port from that range (what binding to port 0
    gives) may be taken by any outgoing connection before the server binds it, and once was.
    """
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    # Hold every socket open until all are bound, so no port is handed out twice.
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("", random.randrange(10000, ephemeral_low)))
            except OSError:
                sock.close()
                continue
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Tell whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 40) -> str:
    """Return the last lines of a log file, or a note that there is none."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of one process so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def require_binary(binary: Path, what: str) -> None:
    """Raise FileNotFoundError with an install hint when a tool the tests need is missing."""
    if not os.access(binary, os.X_OK):
        raise FileNotFoundError(f"{what} not found at {binary}: {INSTALL_HINT}")


@functools.cache
def orthanc_version(binary: Path | None = None) -> tuple[int, ...]:
    """The version of Orthanc under test (ORTHANC_BINARY by default), e.g. (1, 12, 7)."""
    binary = binary or ORTHANC_BINARY
    require_binary(binary, "Orthanc")
    output = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    # First line: "/usr/sbin/Orthanc 1.12.7" (a development build says "mainline").
    word = output.splitlines()[0].split()[-1]
    return tuple(int(part) for part in word.split(".")) if word[0].isdigit() else (999,)


# Set around each test by tests/conftest.py: whether it carries the `orthanc` marker (None outside
# pytest: the demo and the benchmarks start servers too).
MARKED_FOR_ORTHANC: bool | None = None


def check_marked_for_orthanc() -> None:
    """Raise if the running test starts Orthanc without the `orthanc` marker."""
    if MARKED_FOR_ORTHANC is False:
        raise RuntimeError(
            f"{os.environ.get('PYTEST_CURRENT_TEST', 'this test')} runs Orthanc without "
            "@pytest.mark.orthanc: scripts/test.sh would not run it against every Orthanc version"
        )


class ChildProcess:
    """One child process in its own session, logging to a file, stopped by pid.

    `stop_signal` asks it to stop (SIGTERM for Orthanc; PostgreSQL's fast shutdown is SIGINT).
    """

    def __init__(self, log_path: Path, stop_signal: int = signal.SIGTERM) -> None:
        self.log_path = log_path
        self.stop_signal = stop_signal
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._terminated = False

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def spawn(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None) -> None:
        if self.running:
            raise RuntimeError(f"already running: {argv[0]}")
        # Append: a restarted server keeps the log of its previous life for post-mortems.
        self._log = self.log_path.open("ab")
        self._terminated = False
        self._proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Own session: a Ctrl-C on pytest does not reach it, and stop() signals only this pid.
            start_new_session=True,
        )
        _LIVE.add(self)

    def check_alive(self, what: str) -> None:
        """Raise ProcessFailed with the log tail if the process has already exited."""
        if self._proc is not None and self._proc.poll() is not None:
            raise ProcessFailed(
                f"{what} exited with status {self._proc.returncode}:\n{log_tail(self.log_path)}"
            )

    def terminate(self) -> None:
        """Send SIGTERM without waiting, so that several processes shut down in parallel."""
        # Once only: a second SIGTERM makes Orthanc exit at once, skipping its clean shutdown.
        if self._proc is not None and self._proc.poll() is None and not self._terminated:
            self._proc.send_signal(self.stop_signal)
            self._terminated = True

    def kill(self, what: str) -> ProcessFailed | None:
        """SIGKILL now; return (not raise) a ProcessFailed if it had already exited by itself."""
        proc = self._proc
        crashed = None
        if proc is not None and proc.poll() is not None:
            crashed = ProcessFailed(
                f"{what} exited by itself with status {proc.returncode}:\n{log_tail(self.log_path)}"
            )
        if proc is not None and proc.poll() is None:
            proc.kill()
            self._terminated = True  # nothing left to ask politely
        self.stop()
        return crashed

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL; return the exit status."""
        self.terminate()
        proc, self._proc = self._proc, None
        status = None
        if proc is not None:
            if proc.poll() is None:
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
            status = proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        _LIVE.discard(self)
        return status


# Safety net for an interrupted session: no test server outlives the pytest process.
_LIVE: weakref.WeakSet[ChildProcess] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for process in list(_LIVE):
        process.kill("leftover")


def stop_all(*servers: OrthancServer | StoreSCP) -> None:
    """Stop several servers cleanly and at once: each Orthanc takes about 3.5 s to shut down."""
    for server in servers:
        server.terminate()
    for server in servers:
        server.stop()


def discard(*servers: OrthancServer | StoreSCP) -> None:
    """End servers whose data is thrown away (test teardown): SIGKILL, no 3.5 s shutdown.

    Raises ProcessFailed, after killing them all, if one had already exited by itself: a crash
    during the test must not go unnoticed.
    """
    crashed = [server.kill() for server in servers]
    for failure in crashed:
        if failure is not None:
            raise failure


class OrthancServer:
    """A real Orthanc on free loopback ports, with its data and log under `workdir`."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        users: Mapping[str, str] | None = None,
        modalities: Mapping[str, Sequence[str | int]] | None = None,
        extra_config: Mapping[str, Any] | None = None,
        aet: str | None = None,
        env: Mapping[str, str] | None = None,
        verbose: bool = False,
        dicomweb: bool = False,
    ) -> None:
        self.name = name
        self.workdir = workdir
        # DICOM AE titles are at most 16 characters.
        self.aet = (aet or name.upper())[:16]
        self.users = dict(users or {})
        self.modalities = {key: list(value) for key, value in (modalities or {}).items()}
        self.extra_config = dict(extra_config or {})
        # Added to Orthanc's environment: its configuration may say "${NAME}".
        self.env = dict(env or {})
        self.verbose = verbose
        self.dicomweb = dicomweb  # load the DICOMweb plugin, its root at dicomweb_url
        # Chosen once: restart() must come back on the same ports, as a real server would.
        self.http_port, self.dicom_port = free_ports(2)
        self.config_path = workdir / "orthanc.json"
        self.log_path = workdir / "orthanc.log"
        self._process = ChildProcess(self.log_path)
        self.session = requests.Session()
        if self.users:
            self.session.auth = next(iter(self.users.items()))

    def __repr__(self) -> str:
        return f"OrthancServer({self.name!r}, {self.url})"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb service root (with `dicomweb=True`)."""
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str] | None:
        """The (username, password) the helper methods use, or None without authentication."""
        return next(iter(self.users.items()), None)

    @property
    def running(self) -> bool:
        return self._process.running

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def config(self) -> JsonObject:
        """The configuration written to `config_path` at start."""
        config: JsonObject = {
            "Name": self.name,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            # Not Debian's default plugin folder: the tests prove what plain Orthanc does.
            "Plugins": [],
            "HttpTimeout": 10,
            "DicomScuTimeout": 10,
            "SaveJobs": False,
            "StableAge": 2,
            "DicomModalities": self.modalities,
            # Otherwise every C-STORE to a modality leaves its association open for 5 s.
            "DicomAssociationCloseDelay": 0,
        }
        if self.dicomweb:
            config["Plugins"] = [DICOMWEB_PLUGIN]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        config.update(self.extra_config)
        return config

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Write the configuration, launch Orthanc, and return once its REST API answers."""
        require_binary(ORTHANC_BINARY, "Orthanc")
        check_marked_for_orthanc()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        argv = [str(ORTHANC_BINARY), str(self.config_path)]
        if self.verbose:
            argv.append("--verbose")
        self._process.spawn(argv, cwd=self.workdir, env=self.env)
        try:
            wait_for(self._ready, timeout, f"Orthanc {self.name} on {self.url}")
        except TimeoutError as exc:
            self.stop()
            raise ProcessFailed(f"{exc}\n{log_tail(self.log_path)}") from exc

    def _ready(self) -> bool:
        self._process.check_alive(f"Orthanc {self.name}")
        try:
            response = self.session.get(f"{self.url}/system", timeout=1.0)
        except requests.RequestException:
            return False
        if response.status_code != 200:
            return False
        # The DICOM server opens before the HTTP one; checked anyway, tests use both at once.
        return not self.config().get("DicomServerEnabled", True) or port_accepts(self.dicom_port)

    def terminate(self) -> None:
        """Ask Orthanc to stop (SIGTERM) without waiting; stop() then waits."""
        self._process.terminate()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Stop Orthanc (SIGTERM, then SIGKILL after `timeout`); return its exit status."""
        self.session.close()
        return self._process.stop(timeout)

    def kill(self) -> ProcessFailed | None:
        """SIGKILL, for teardown; return a ProcessFailed if Orthanc had died by itself."""
        self.session.close()
        return self._process.kill(f"Orthanc {self.name}")

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, optionally stay down for `down_for` seconds, start again on the same ports."""
        self.stop()
        if down_for > 0:
            # The outage itself is the point of the test here, not a wait for some condition.
            time.sleep(down_for)
        self.start()

    # REST conveniences -----------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Send one request to this server; the caller checks the status."""
        kwargs.setdefault("timeout", HTTP_TIMEOUT)
        return self.session.request(method, f"{self.url}{path}", **kwargs)

    def get_json(self, path: str) -> Any:
        """GET a JSON document, raising on an HTTP error."""
        response = self.request("GET", path)
        response.raise_for_status()
        return response.json()

    def upload(self, dicom: bytes | Path) -> JsonObject:
        """POST /instances; return Orthanc's answer (ID, Status, ...)."""
        body = dicom.read_bytes() if isinstance(dicom, Path) else dicom
        response = self.request("POST", "/instances", data=body)
        response.raise_for_status()
        return _json_object(response)

    def instances(self) -> list[str]:
        """Orthanc IDs of every stored instance."""
        return [str(item) for item in self.get_json("/instances")]

    def transfer_syntax(self, instance_id: str) -> str:
        """The transfer syntax UID of the stored file, from Orthanc's metadata."""
        response = self.request("GET", f"/instances/{instance_id}/metadata/TransferSyntax")
        response.raise_for_status()
        return response.text.strip()

    def file(self, instance_id: str) -> bytes:
        """The stored DICOM file, byte for byte."""
        response = self.request("GET", f"/instances/{instance_id}/file")
        response.raise_for_status()
        return response.content

    def delete(self, instance_id: str) -> None:
        """DELETE /instances/{id}."""
        self.request("DELETE", f"/instances/{instance_id}").raise_for_status()

    def changes(self, since: int = 0, limit: int = 100) -> JsonObject:
        """One page of /changes."""
        response = self.request("GET", "/changes", params={"since": since, "limit": limit})
        response.raise_for_status()
        return _json_object(response)

    def changes_last(self) -> int:
        """The sequence number of the latest change (0 on an empty server)."""
        response = self.request("GET", "/changes", params={"last": ""})
        response.raise_for_status()
        return int(_json_object(response)["Last"])

    def store_to_modality(self, modality: str, instance_ids: Sequence[str]) -> requests.Response:
        """C-STORE instances to a configured modality, synchronously; the caller checks status."""
        return self.request(
            "POST",
            f"/modalities/{modality}/store",
            json={"Resources": list(instance_ids), "Synchronous": True},
        )


def _json_object(response: requests.Response) -> JsonObject:
    body = response.json()
    if not isinstance(body, dict):
        raise TypeError(f"expected a JSON object from {response.url}, got {body!r}")
    return body


class StoreSCP:
    """DCMTK storescp with its default options: it accepts only uncompressed transfer syntaxes.

    That makes it the research workstation of the problem: it refuses what Orthanc A holds.
    """

    def __init__(
        self,
        workdir: Path,
        aet: str = "STORESCP",
        options: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.aet = aet
        self.options = list(options)  # e.g. ["--implicit"]: a workstation that reads only that
        self.env = dict(env or {})  # added to its environment, e.g. TCP_NODELAY=1
        self.output_dir = workdir / "received"
        self.log_path = workdir / "storescp.log"
        (self.port,) = free_ports(1)
        self._process = ChildProcess(self.log_path)

    def __repr__(self) -> str:
        return f"StoreSCP({self.aet}@127.0.0.1:{self.port})"

    @property
    def modality(self) -> list[str | int]:
        """This SCP as an Orthanc `DicomModalities` entry."""
        return [self.aet, "127.0.0.1", self.port]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Launch storescp and return once it accepts TCP connections."""
        require_binary(STORESCP_BINARY, "storescp")
        # Also creates workdir, where the log goes.
        self.output_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(STORESCP_BINARY),
            "--verbose",
            "--aetitle",
            self.aet,
            "--output-directory",
            str(self.output_dir),
            *self.options,
            str(self.port),
        ]
        self._process.spawn(argv, cwd=self.workdir, env=self.env)
        try:
            wait_for(self._ready, timeout, f"storescp on port {self.port}")
        except TimeoutError as exc:
            self.stop()
            raise ProcessFailed(f"{exc}\n{log_tail(self.log_path)}") from exc

    def _ready(self) -> bool:
        self._process.check_alive("storescp")
        return port_accepts(self.port)

    def terminate(self) -> None:
        """Ask storescp to stop (SIGTERM) without waiting; stop() then waits."""
        self._process.terminate()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Stop storescp (SIGTERM, then SIGKILL after `timeout`)."""
        return self._process.stop(timeout)

    def kill(self) -> ProcessFailed | None:
        """SIGKILL, for teardown; return a ProcessFailed if storescp had died by itself."""
        return self._process.kill("storescp")

    def associations(self) -> int:
        """How many associations storescp has accepted so far (its log says each one; a bare
        TCP connection, such as the check that it is up, is "Received" but not acknowledged)."""
        try:
            return self.log_path.read_text(errors="replace").count("Association Acknowledged")
        except FileNotFoundError:
            return 0

    def received(self) -> list[Path]:
        """The files storescp has written, sorted by name."""
        if not self.output_dir.is_dir():
            return []
        return sorted(path for path in self.output_dir.iterdir() if path.is_file())


# Test data -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """A DICOM file bundled with pydicom, and the transfer syntax it is stored in."""

    filename: str
    transfer_syntax: str
    lossy: bool


# Each is accepted by Orthanc 1.10.1 (tests/test_fixtures.py proves it). Beware: several are
# one instance in different syntaxes (same UIDs, so the same Orthanc ID): the MR_small_* files,
# and SC_rgb_rle.dcm with SC_rgb_jpeg_gdcm.dcm. Upload only one of a kind per server at a time.
PYDICOM_SAMPLES: dict[str, Sample] = {
    "j2k_lossless": Sample("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90", False),
    "j2k": Sample("JPEG2000.dcm", "1.2.840.10008.1.2.4.91", False),
    "jpegls_lossless": Sample("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80", False),
    "rle": Sample("MR_small_RLE.dcm", "1.2.840.10008.1.2.5", False),
    "rle_rgb": Sample("SC_rgb_rle.dcm", "1.2.840.10008.1.2.5", False),
    "jpeg_baseline": Sample("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50", True),
    "jpeg_extended": Sample("JPGExtended.dcm", "1.2.840.10008.1.2.4.51", True),
    "jpeg_lossless": Sample("SC_rgb_jpeg_gdcm.dcm", "1.2.840.10008.1.2.4.70", False),
    "explicit_le": Sample("CT_small.dcm", EXPLICIT_VR_LITTLE_ENDIAN, False),
}


def pydicom_test_files() -> Path:
    """The folder of test files inside the installed pydicom wheel."""
    # Not pydicom.data.get_testdata_file(): for a file it lacks, it tries to download one.
    return Path(pydicom.__file__).parent / "data" / "test_files"


def pydicom_sample_paths() -> dict[str, Path]:
    """Map each PYDICOM_SAMPLES key to its file; raise FileNotFoundError if any is missing."""
    folder = pydicom_test_files()
    paths = {key: folder / sample.filename for key, sample in PYDICOM_SAMPLES.items()}
    missing = sorted(path.name for path in paths.values() if not path.is_file())
    if missing:
        raise FileNotFoundError(f"pydicom {pydicom.__version__} lacks {missing} in {folder}")
    return paths


# The pair the bridge is tested against ---------------------------------------------------------

# Authentication is on, with different credentials on each side, as in production: a bridge that
# sends the source's password to the target fails its tests.
SOURCE_USERS = {"bridge-source": "source-secret"}
TARGET_USERS = {"bridge-target": "target-secret"}


@dataclass(frozen=True)
class OrthancPair:
    """Orthanc A (what the PACS sends) and Orthanc B (uncompressed, for the workstations)."""

    source: OrthancServer
    target: OrthancServer

    @classmethod
    def create(cls, workdir: Path) -> OrthancPair:
        """Two servers under workdir/source and workdir/target, not yet started."""
        return cls(
            source=OrthancServer("source", workdir / "source", users=SOURCE_USERS),
            target=OrthancServer("target", workdir / "target", users=TARGET_USERS),
        )

    def start(self) -> None:
        """Start both; if the second fails, the first is stopped before raising."""
        self.source.start()
        try:
            self.target.start()
        except BaseException:
            self.source.kill()
            raise

    def stop(self) -> None:
        """Stop both cleanly, in parallel."""
        stop_all(self.source, self.target)

    def discard(self) -> None:
        """Kill both at once (teardown), raising if one had crashed."""
        discard(self.source, self.target)
