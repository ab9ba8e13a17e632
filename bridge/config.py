"""The configuration: frozen dataclasses and the one loader that validates `bridge.yaml`.

Every key is checked: an unknown key or a bad value is a ConfigError that names the key, so
that a typo never silently falls back to a default. Credentials may come from the environment
(BRIDGE_SOURCE_USERNAME, BRIDGE_SOURCE_PASSWORD, BRIDGE_TARGET_USERNAME, BRIDGE_TARGET_PASSWORD),
which overrides the file, so that secrets need not be written into it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from bridge.decoding.cpus import usable_cpus
from bridge.errors import ConfigError
from bridge.routing import Rule, parse_rules
from bridge.uids import EXPLICIT_VR_LITTLE_ENDIAN, OUTPUT_SYNTAXES

RESET_POLICIES = ("stop", "rewind")
# Kinds of targets: an Orthanc's REST API, a DICOMweb archive, a DICOM node.
ORTHANC, DICOMWEB, DICOM = "orthanc", "dicomweb", "dicom"
KINDS = (ORTHANC, DICOMWEB, DICOM)
# How a dicom target's copy is verified: its C-STORE status, or Storage Commitment.
STATUS, COMMITMENT = "status", "commitment"
DEFAULT_CALLING_AE_TITLE = "ORTHANC-BRIDGE"
# DICOM AE titles: 1 to 16 characters of the default repertoire, no backslash (PS3.5 6.2).
_AE_TITLE = re.compile(r"^[ -\[\]-~]{1,16}$")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
# Next to Orthanc's 8042 (REST) and 4242 (DICOM); no common service listens there by default.
DEFAULT_HTTP_LISTEN = "127.0.0.1:8242"
MIB = 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """How to reach one Orthanc server."""

    url: str  # the first node: the one the feed reads while it answers
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    verify_tls: bool | str = True
    # Every node of an Orthanc cluster (servers sharing one database and storage), `url`
    # first; transfers spread over them. One node, or a load balancer: just (url,).
    nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Normalise once so that every request can append "/path" without doubling slashes.
        nodes = tuple(node.rstrip("/") for node in (self.nodes or (self.url,)))
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "url", nodes[0])


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class TargetConfig:
    """Where instances go: a server, the syntax to convert into, and which instances to take."""

    name: str  # "target" for the single `target:`; the name in metrics, ledger and logs
    # orthanc and dicomweb: the URL (of the REST API, of the DICOMweb service root),
    # credentials, TLS, timeout. dicom: only a name for the node, dicom://AE@host:port.
    server: ServerConfig
    syntax: str = EXPLICIT_VR_LITTLE_ENDIAN
    rules: tuple[Rule, ...] = ()  # first match wins; no match: convert
    kind: str = ORTHANC
    dicomweb: DicomWebConfig | None = None  # kind dicomweb
    dicom: DicomNodeConfig | None = None  # kind dicom

    @property
    def deletion_proof(self) -> str | None:
        """Why this target's verified copy does not prove that it is kept, or None."""
        if self.dicom is not None and self.dicom.verify == STATUS:
            return "a dicom target verified by status: a C-STORE status does not prove it kept"
        return None


@dataclass(frozen=True)
class DicomWebConfig:
    """A DICOMweb archive's own settings: STOW-RS batching, a bearer token."""

    token: str | None = field(default=None, repr=False)  # BRIDGE_TARGET_<NAME>_TOKEN
    batch_size: int = 16  # instances per STOW-RS request, at most
    batch_mb: float = 32.0  # MiB per STOW-RS request, at most (one larger instance goes alone)


@dataclass(frozen=True)
class DicomNodeConfig:
    """How to reach a DICOM node (C-STORE) and how its copies are verified."""

    host: str
    port: int
    ae_title: str  # the node's (called) AE title
    calling_ae_title: str = DEFAULT_CALLING_AE_TITLE  # the bridge's own
    verify: str = STATUS  # or COMMITMENT: Storage Commitment (N-ACTION, N-EVENT-REPORT)
    # Where the bridge listens for the node's N-EVENT-REPORT on an association of its own
    # (Orthanc sends it so); None: only on the association that asked.
    commitment_port: int | None = None
    commitment_timeout: float = 60.0  # no report by then: not verified, retried later
    timeout: float = 60.0  # connection, association and each answer


@dataclass(frozen=True)
class ClusterConfig:
    """A Dask scheduler to send the transfers to (bridge.engine.cluster)."""

    scheduler: str  # tcp://host:8786 or tls://host:8786
    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # Instances per task: Dask's cost per task spread thin (measured: 16 took the cluster's
    # CPU per CT slice from 64 to 60 ms against 8), still small enough to balance the tail.
    batch_size: int = 16


@dataclass(frozen=True)
class HttpConfig:
    """The read-only HTTP server: metrics, health and the status page."""

    listen: str  # "host:port"; "" when disabled
    allow_anonymous: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to bind, or None when the server is disabled."""
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def loopback(self) -> bool:
        """True when only this machine can connect."""
        address = self.address
        if address is None:
            return True
        try:
            return ipaddress.ip_address(address[0]).is_loopback
        except ValueError:
            return address[0] == "localhost"


@dataclass(frozen=True)
class Config:
    """Everything the bridge needs to run; built only by `load`."""

    source: ServerConfig
    target: ServerConfig  # the first of `targets`
    state_dir: Path
    delete_original: bool = False
    workers: int = 0
    poll_interval: float = 1.0
    page_size: int = 1000
    recheck_changes: int = 0
    max_decoded_mb: int = 2048
    max_inflight_mb: int = 1024
    decode_timeout: float = 80.0
    forward_unchanged: frozenset[str] = frozenset()
    on_source_reset: str = "stop"
    catch_up_retry_seconds: float = 300.0
    log_level: str = "INFO"
    log_format: str = "text"
    progress_interval: float = 10.0
    ledger_retention_days: float = 90.0  # 0: keep every row
    http: HttpConfig = field(default_factory=lambda: HttpConfig(DEFAULT_HTTP_LISTEN))
    cluster: ClusterConfig | None = None  # None: every transfer runs on this machine
    # Every target, with its rules; () is the single `target` above, converting everything.
    targets: tuple[TargetConfig, ...] = ()
    # The file it was read from, for the commands the status page suggests.
    path: Path | None = None

    def __post_init__(self) -> None:
        if not self.targets:
            object.__setattr__(self, "targets", (TargetConfig("target", self.target),))

    @property
    def worker_count(self) -> int:
        """Decoding processes to start: the configured number, or one per CPU it may use."""
        return self.workers or usable_cpus()


T = TypeVar("T")


class _Section:
    """A mapping being read key by key; whatever is left unread at the end is an unknown key."""

    def __init__(self, raw: object, path: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path or 'the file'}: expected a mapping of keys, got {_kind(raw)}")
        self._raw = dict(raw)
        self._path = path

    def _name(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def take(self, key: str, kind: type[T], default: T | None = None, required: bool = False) -> T:
        """Remove `key` and return its value checked against `kind`."""
        if key not in self._raw or self._raw[key] is None:
            self._raw.pop(key, None)
            if required:
                raise ConfigError(f"{self._name(key)}: required key is missing")
            return default  # type: ignore[return-value]
        value = self._raw.pop(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
            raise ConfigError(f"{self._name(key)}: expected {kind.__name__}, got {_kind(value)}")
        return value

    @property
    def empty(self) -> bool:
        """True when nothing is left to read (an absent or empty section)."""
        return not self._raw

    def has(self, key: str) -> bool:
        """True when `key` is given (and not empty)."""
        return self._raw.get(key) is not None

    def section(self, key: str) -> _Section:
        """Remove `key` and return it as a nested section."""
        return _Section(self._raw.pop(key, None), self._name(key))

    def finish(self) -> None:
        """Fail on the first key that nothing asked for."""
        for key in self._raw:
            raise ConfigError(f"{self._name(str(key))}: unknown key")


def _kind(value: object) -> str:
    return type(value).__name__ if value is not None else "nothing"


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name}: must be greater than 0, got {value}")


def _server(
    section: _Section, role: str, env: Mapping[str, str], env_prefix: str | None = None
) -> ServerConfig:
    """One server's keys; `role` names them in errors, credentials come from BRIDGE_<ROLE>_*."""
    urls = section.take("url", object, required=True)
    # Several URLs: the nodes of one Orthanc cluster (see ServerConfig.nodes).
    nodes: list[str] = []
    if urls == []:
        raise ConfigError(f"{role}.url: expected a URL or a list of URLs, got an empty list")
    for url in urls if isinstance(urls, list) else [urls]:
        if not isinstance(url, str):
            raise ConfigError(f"{role}.url: expected a URL or a list of URLs, got {_kind(url)}")
        nodes.append(url)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"{role}.url: expected http://host:port or https://..., got {url!r}")
        if parts.username or parts.password:
            # URLs end up in logs; credentials belong in username/password or the environment.
            raise ConfigError(
                f"{role}.url: must not contain credentials; use {role}.username/password"
            )
    if len({node.rstrip("/") for node in nodes}) != len(nodes):
        raise ConfigError(f"{role}.url: a node is listed twice")
    username = section.take("username", str)
    password = section.take("password", str)
    timeout = section.take("timeout", float, 60.0)
    _positive(f"{role}.timeout", timeout)
    verify = section.take("verify_tls", object, True)
    if not isinstance(verify, (bool, str)):
        raise ConfigError(f"{role}.verify_tls: expected true, false or a CA bundle path")
    section.finish()
    prefix = env_prefix or f"BRIDGE_{role.upper()}_"
    username = env.get(prefix + "USERNAME") or username
    password = env.get(prefix + "PASSWORD") or password
    if password and not username:
        raise ConfigError(f"{role}.username: a password is set but no username")
    return ServerConfig(nodes[0], username, password, timeout, verify, tuple(nodes))


def parse(raw: object, base_dir: Path, env: Mapping[str, str] | None = None) -> Config:
    """Build a Config from parsed YAML; relative paths are taken from `base_dir`."""
    env = os.environ if env is None else env
    top = _Section(raw, "")
    source = _server(top.section("source"), "source", env)
    targets = _targets(top, source, env)
    state_dir = Path(top.take("state_dir", str, "./state")).expanduser()
    defaults = Config(source, targets[0].server, state_dir)
    config = Config(
        source=source,
        target=targets[0].server,
        targets=targets,
        state_dir=state_dir if state_dir.is_absolute() else base_dir / state_dir,
        delete_original=top.take("delete_original", bool, defaults.delete_original),
        workers=top.take("workers", int, defaults.workers),
        poll_interval=top.take("poll_interval", float, defaults.poll_interval),
        page_size=top.take("page_size", int, defaults.page_size),
        recheck_changes=top.take("recheck_changes", int, defaults.recheck_changes),
        max_decoded_mb=top.take("max_decoded_mb", int, defaults.max_decoded_mb),
        max_inflight_mb=top.take("max_inflight_mb", int, defaults.max_inflight_mb),
        decode_timeout=top.take("decode_timeout", float, defaults.decode_timeout),
        forward_unchanged=frozenset(_uid_list(top, "forward_unchanged")),
        on_source_reset=top.take("on_source_reset", str, defaults.on_source_reset),
        catch_up_retry_seconds=top.take(
            "catch_up_retry_seconds", float, defaults.catch_up_retry_seconds
        ),
        log_level=top.take("log_level", str, defaults.log_level).upper(),
        log_format=top.take("log_format", str, defaults.log_format),
        progress_interval=top.take("progress_interval", float, defaults.progress_interval),
        ledger_retention_days=top.take(
            "ledger_retention_days", float, defaults.ledger_retention_days
        ),
        http=_http(top, env),
        cluster=_cluster(top.section("cluster"), base_dir),
    )
    top.finish()
    _check_ranges(config)
    return config


def _targets(
    top: _Section, source: ServerConfig, env: Mapping[str, str]
) -> tuple[TargetConfig, ...]:
    """`target:` (one, named "target") or `targets:` (a list of named targets)."""
    if top.has("target") and top.has("targets"):
        raise ConfigError("targets: give either target (one) or targets (a list), not both")
    if not top.has("targets"):
        return (_target(top.section("target"), "target", "target", source, env),)
    raw = top.take("targets", list)
    if not raw:
        raise ConfigError("targets: expected a list of at least one target")
    targets: list[TargetConfig] = []
    for number, item in enumerate(raw):
        where = f"targets[{number}]"
        section = _Section(item, where)
        name = section.take("name", str, required=True)
        if not _NAME.match(name) or name in ("source", "target"):
            raise ConfigError(
                f"{where}.name: expected letters, digits, - and _ (not source or target), "
                f"got {name!r}"
            )
        if any(t.name == name for t in targets):
            raise ConfigError(f"{where}.name: {name!r} names two targets")
        target = _target(section, where, name, source, env)
        for other in targets:
            if set(other.server.nodes) & set(target.server.nodes):
                raise ConfigError(f"{where}.url: {other.name} has the same URL")
        targets.append(target)
    return tuple(targets)


def _target(
    section: _Section, where: str, name: str, source: ServerConfig, env: Mapping[str, str]
) -> TargetConfig:
    kind = section.take("kind", str, ORTHANC)
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    syntax = section.take("syntax", str, EXPLICIT_VR_LITTLE_ENDIAN).strip()
    if syntax not in OUTPUT_SYNTAXES:
        known = ", ".join(f"{uid} ({what})" for uid, what in OUTPUT_SYNTAXES.items())
        raise ConfigError(f"{where}.syntax: expected one of {known}, got {syntax!r}")
    rules = parse_rules(section.take("rules", object), f"{where}.rules")
    prefix = target_env_prefix(name)
    if kind == DICOM:
        dicom = _dicom_node(section, where)
        server = ServerConfig(f"dicom://{dicom.ae_title}@{dicom.host}:{dicom.port}")
        return TargetConfig(name, server, syntax, rules, kind, dicom=dicom)
    dicomweb = _dicomweb(section, where, env, prefix) if kind == DICOMWEB else None
    server = _server(section, where, env, prefix)
    if set(source.nodes) & set(server.nodes):
        raise ConfigError(f"{where}.url: must differ from source.url")
    if dicomweb is not None and dicomweb.token and server.username:
        raise ConfigError(
            f"{where}: give a bearer token ({prefix}TOKEN) or a username and password, not both"
        )
    return TargetConfig(name, server, syntax, rules, kind, dicomweb=dicomweb)


def _dicomweb(section: _Section, where: str, env: Mapping[str, str], prefix: str) -> DicomWebConfig:
    """A dicomweb target's own keys; its token only from the environment (a secret)."""
    defaults = DicomWebConfig()
    batch_size = section.take("batch_size", int, defaults.batch_size)
    if not 1 <= batch_size <= 1000:
        raise ConfigError(f"{where}.batch_size: must be between 1 and 1000, got {batch_size}")
    batch_mb = section.take("batch_mb", float, defaults.batch_mb)
    _positive(f"{where}.batch_mb", batch_mb)
    return DicomWebConfig(env.get(prefix + "TOKEN") or None, batch_size, batch_mb)


def _dicom_node(section: _Section, where: str) -> DicomNodeConfig:
    """A dicom target's keys: the node's address and AE title, the bridge's, verification."""
    host = section.take("host", str, required=True).strip()
    if not host:
        raise ConfigError(f"{where}.host: expected a host name or address")
    port = _port(section.take("port", int, required=True), f"{where}.port")
    titles = {}
    for key, default in (("ae_title", None), ("calling_ae_title", DEFAULT_CALLING_AE_TITLE)):
        title = section.take(key, str, default, required=default is None).strip()
        if not _AE_TITLE.match(title):
            raise ConfigError(
                f"{where}.{key}: expected 1 to 16 printable ASCII characters without a "
                f"backslash, got {title!r}"
            )
        titles[key] = title
    verify = section.take("verify", str, STATUS)
    if verify not in (STATUS, COMMITMENT):
        raise ConfigError(f"{where}.verify: expected {STATUS} or {COMMITMENT}, got {verify!r}")
    commitment_port = section.take("commitment_port", int)
    if commitment_port is not None:
        _port(commitment_port, f"{where}.commitment_port")
        if verify != COMMITMENT:
            raise ConfigError(f"{where}.commitment_port: set, but verify is not {COMMITMENT}")
    defaults = DicomNodeConfig(host, port, titles["ae_title"])
    commitment_timeout = section.take("commitment_timeout", float, defaults.commitment_timeout)
    _positive(f"{where}.commitment_timeout", commitment_timeout)
    timeout = section.take("timeout", float, defaults.timeout)
    _positive(f"{where}.timeout", timeout)
    section.finish()
    return DicomNodeConfig(
        host,
        port,
        titles["ae_title"],
        titles["calling_ae_title"],
        verify,
        commitment_port,
        commitment_timeout,
        timeout,
    )


def _port(port: int, key: str) -> int:
    if not 1 <= port <= 65535:
        raise ConfigError(f"{key}: expected a port between 1 and 65535, got {port}")
    return port


def target_env_prefix(name: str) -> str:
    """How a target's credentials' variables begin: BRIDGE_TARGET_ for the single `target`,
    BRIDGE_TARGET_<NAME>_ for a named one (upper case, - as _)."""
    if name == "target":
        return "BRIDGE_TARGET_"
    return f"BRIDGE_TARGET_{name.upper().replace('-', '_')}_"


def _cluster(section: _Section, base_dir: Path) -> ClusterConfig | None:
    if section.empty:
        return None
    scheduler = section.take("scheduler", str, required=True)
    if not scheduler.startswith(("tcp://", "tls://")) or ":" not in scheduler[6:]:
        raise ConfigError(
            f"cluster.scheduler: expected tcp://host:port or tls://host:port, got {scheduler!r}"
        )
    files = {}
    for key in ("tls_ca_file", "tls_cert", "tls_key"):
        value = section.take(key, str)
        files[key] = str(base_dir / Path(value).expanduser()) if value else None
    batch_size = section.take("batch_size", int, ClusterConfig.batch_size)
    section.finish()
    if not 1 <= batch_size <= 1000:
        raise ConfigError(f"cluster.batch_size: must be between 1 and 1000, got {batch_size}")
    tls = [key for key, value in files.items() if value]
    if scheduler.startswith("tls://") and len(tls) != 3:
        raise ConfigError(
            "cluster.tls_ca_file: a tls:// scheduler needs tls_ca_file, tls_cert and tls_key"
        )
    if tls and scheduler.startswith("tcp://"):
        raise ConfigError(f"cluster.{tls[0]}: TLS files need a tls:// scheduler address")
    return ClusterConfig(scheduler, batch_size=batch_size, **files)


def _http(top: _Section, env: Mapping[str, str]) -> HttpConfig:
    listen = top.take("http_listen", str, DEFAULT_HTTP_LISTEN).strip()
    username = top.take("http_username", str)
    password = top.take("http_password", str)
    http = HttpConfig(
        listen,
        allow_anonymous=top.take("http_allow_anonymous", bool, False),
        username=env.get("BRIDGE_HTTP_USERNAME") or username,
        password=env.get("BRIDGE_HTTP_PASSWORD") or password,
    )
    if listen:
        host, colon, port = listen.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"http_listen: expected host:port such as {DEFAULT_HTTP_LISTEN}, or empty to "
                f"disable the server, got {listen!r}"
            )
    if bool(http.username) != bool(http.password):
        raise ConfigError(
            "http_username: set both a user name and a password for the HTTP server, or neither"
        )
    if not http.loopback and not http.username and not http.allow_anonymous:
        raise ConfigError(
            f"http_listen: {listen} is reachable from other machines: set BRIDGE_HTTP_USERNAME "
            "and BRIDGE_HTTP_PASSWORD (basic auth), or http_allow_anonymous: true"
        )
    return http


def _uid_list(top: _Section, key: str) -> list[str]:
    values: list[Any] = top.take(key, list, [])
    for value in values:
        if not isinstance(value, str) or not all(p.isdigit() for p in value.split(".")):
            raise ConfigError(f"{key}: expected transfer syntax UIDs like 1.2.840.10008.1.2.4.100")
    return values


def _check_ranges(config: Config) -> None:
    if config.workers < 0:
        raise ConfigError(f"workers: must be 0 (one per CPU) or more, got {config.workers}")
    _positive("poll_interval", config.poll_interval)
    if not 1 <= config.page_size <= 10000:
        raise ConfigError(f"page_size: must be between 1 and 10000, got {config.page_size}")
    if not 0 <= config.recheck_changes <= 10000:
        raise ConfigError(
            f"recheck_changes: must be between 0 and 10000, got {config.recheck_changes}"
        )
    _positive("max_decoded_mb", config.max_decoded_mb)
    _positive("max_inflight_mb", config.max_inflight_mb)
    _positive("decode_timeout", config.decode_timeout)
    _positive("catch_up_retry_seconds", config.catch_up_retry_seconds)
    if config.on_source_reset not in RESET_POLICIES:
        raise ConfigError(
            f"on_source_reset: expected one of {', '.join(RESET_POLICIES)}, "
            f"got {config.on_source_reset!r}"
        )
    _positive("progress_interval", config.progress_interval)
    if config.delete_original:
        for target in config.targets:
            why = target.deletion_proof
            if why:
                raise ConfigError(
                    f"delete_original: {target.name} is {why}; set its verify: {COMMITMENT}, "
                    "or delete_original: false"
                )
    if config.ledger_retention_days < 0:
        raise ConfigError(
            "ledger_retention_days: must be 0 (keep everything) or more, "
            f"got {config.ledger_retention_days:g}"
        )
    if config.log_format not in LOG_FORMATS:
        raise ConfigError(
            f"log_format: expected one of {', '.join(LOG_FORMATS)}, got {config.log_format!r}"
        )
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(
            f"log_level: expected one of {', '.join(LOG_LEVELS)}, got {config.log_level!r}"
        )


def load(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the YAML file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return replace(parse(raw, path.resolve().parent, env), path=path.resolve())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
