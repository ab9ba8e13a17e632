"""The compose stack is valid, keeps its secrets out of the files, and its Orthanc
configurations do, on the Orthancs the other tests use (1.10 and 1.12), what the design says."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from bridge.config import load
from tests.orthanc import (
    INSTALL_HINT,
    JPEG_2000_LOSSLESS,
    ORTHANC_BINARY,
    OrthancServer,
    discard,
    orthanc_version,
    require_binary,
)
from tests.polling import wait_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
SERVICES = {"orthanc-source", "orthanc-target", "bridge"}
# Started only with `--profile monitoring` (tests/test_monitoring.py checks them).
PROFILED = {
    "prometheus": ["monitoring"],
    "grafana": ["monitoring"],
    "dask-scheduler": ["cluster"],
    "dask-worker": ["cluster"],
}
# Services that run the bridge's own image, built by the stack.
OWN_IMAGE = {"bridge", "dask-scheduler", "dask-worker"}
VOLUMES = {"bridge-state", "orthanc-source-db", "orthanc-target-db"}
MONITORING_VOLUMES = {"prometheus-data", "grafana-data"}
SECRETS = {"ORTHANC_SOURCE_PASSWORD": "pw-source-7f3a", "ORTHANC_TARGET_PASSWORD": "pw-target-91c2"}
# The keys of bridge.yaml that deploy/bridge.yaml may use (the configuration contract).
BRIDGE_KEYS = {
    "source",
    "target",
    "state_dir",
    "delete_original",
    "workers",
    "poll_interval",
    "log_level",
    "http_listen",
    "http_allow_anonymous",
}
SERVER_KEYS = {"url", "timeout", "verify_tls"}
# Orthanc's paths and ports in the container; the tests put their own in their place.
CONTAINER_ONLY = ("StorageDirectory", "IndexDirectory", "HttpPort", "DicomPort")


# The variables deploy/.env may set: a developer's own must not reach these tests.
OUR_VARIABLES = ("ORTHANC_", "SOURCE_", "TARGET_", "BRIDGE_", "PROMETHEUS_", "GRAFANA_")


def compose_config(
    tmp_path: Path, secrets: dict[str, str], *options: str
) -> subprocess.CompletedProcess[str]:
    """`docker-compose [options] config` with only `secrets` set: no deploy/.env, no variable of
    ours. `options`: global ones, such as "--profile", "monitoring"."""
    binary = shutil.which("docker-compose")
    if binary is None:
        raise FileNotFoundError(f"docker-compose not found: {INSTALL_HINT}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(OUR_VARIABLES)}
    env.update(secrets)
    # An empty env file: a developer's deploy/.env must not make these tests pass or fail.
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    argv = [binary, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *options, "config"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


def host_ips(port: str | dict[str, Any]) -> str:
    """The host address a `ports:` entry publishes on, as `config` renders it: "ip:host:container"
    (docker-compose 1.29) or a mapping (Compose v2); "" when it publishes on every address."""
    if isinstance(port, dict):
        return str(port.get("host_ip", ""))
    parts = port.split(":")
    return parts[0] if len(parts) == 3 else ""


@pytest.fixture
def rendered(tmp_path: Path) -> dict[str, Any]:
    result = compose_config(tmp_path, SECRETS)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict)
    return config


def test_compose_has_the_three_services_with_health_checks(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    # Without --profile, docker-compose 1.29's `config` still lists the profiled services (with
    # their `profiles`), Compose v2's leaves them out: `up` starts only the three either way.
    assert {name for name, s in services.items() if not s.get("profiles")} == SERVICES
    profiled = {name: s["profiles"] for name, s in services.items() if s.get("profiles")}
    assert profiled.items() <= PROFILED.items()
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
        assert service["restart"] == "unless-stopped", name
    for name in set(services) - OWN_IMAGE:
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d[\w.-]*", image), f"{name}: pin a version, not {image}"
    bridge = services["bridge"]
    assert bridge["command"] == ["run", "-c", "/etc/orthanc-bridge/bridge.yaml"]
    assert {dep: cond["condition"] for dep, cond in bridge["depends_on"].items()} == {
        "orthanc-source": "service_healthy",
        "orthanc-target": "service_healthy",
    }


def test_bridge_health_check_and_http_port(rendered: dict[str, Any]) -> None:
    bridge = rendered["services"]["bridge"]
    # The image's python asks /readyz: a 503 (not ready, with the reason) raises, exit code 1.
    test = bridge["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    assert "urlopen('http://127.0.0.1:8242/readyz'" in test[3], test
    compile(test[3], "healthcheck", "exec")
    # Published for the host's administrators only; the network has it as bridge:8242.
    assert bridge["ports"], "the bridge's HTTP port is not published"
    assert all(host_ips(port) == "127.0.0.1" for port in bridge["ports"]), bridge["ports"]


def test_compose_keeps_state_and_storage_in_named_volumes(rendered: dict[str, Any]) -> None:
    assert VOLUMES <= set(rendered["volumes"]) <= VOLUMES | MONITORING_VOLUMES
    bridge_volumes = rendered["services"]["bridge"]["volumes"]
    assert any(v.startswith("bridge-state:/var/lib/orthanc-bridge") for v in bridge_volumes)
    for name in ("orthanc-source", "orthanc-target"):
        volumes = rendered["services"][name]["volumes"]
        assert any(v.startswith(f"{name}-db:/var/lib/orthanc/db") for v in volumes), name


def test_compose_takes_every_password_from_the_environment(rendered: dict[str, Any]) -> None:
    environments = {name: s.get("environment", {}) for name, s in rendered["services"].items()}
    assert environments["bridge"]["BRIDGE_SOURCE_PASSWORD"] == SECRETS["ORTHANC_SOURCE_PASSWORD"]
    assert environments["bridge"]["BRIDGE_TARGET_PASSWORD"] == SECRETS["ORTHANC_TARGET_PASSWORD"]
    assert environments["orthanc-source"]["ORTHANC_PASSWORD"] == SECRETS["ORTHANC_SOURCE_PASSWORD"]
    assert environments["orthanc-target"]["ORTHANC_PASSWORD"] == SECRETS["ORTHANC_TARGET_PASSWORD"]
    # Dask workers read the servers' credentials from their own environment.
    worker = environments["dask-worker"]
    assert worker["BRIDGE_SOURCE_PASSWORD"] == SECRETS["ORTHANC_SOURCE_PASSWORD"]
    assert worker["BRIDGE_TARGET_PASSWORD"] == SECRETS["ORTHANC_TARGET_PASSWORD"]
    # In the files themselves, every password is a required variable, never a value.
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key:
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", value), f"{name}.{key} = {value!r}"
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != ".env":
            assert not any(secret in path.read_text() for secret in SECRETS.values()), path


def test_env_example_lists_every_variable_of_the_compose_file() -> None:
    lines = COMPOSE_FILE.read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    listed = set(re.findall(r"^(\w+)=", (DEPLOY / ".env.example").read_text(), re.MULTILINE))
    assert used, "no variable found"
    assert used <= listed, f"not in deploy/.env.example: {sorted(used - listed)}"
    assert all(name.startswith(OUR_VARIABLES) for name in used), used


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_a_missing_password(tmp_path: Path, missing: str) -> None:
    secrets = {k: v for k, v in SECRETS.items() if k != missing}
    result = compose_config(tmp_path, secrets)
    assert result.returncode != 0
    assert missing in result.stderr


def test_bridge_yaml_uses_only_the_contract_keys() -> None:
    raw = yaml.safe_load((DEPLOY / "bridge.yaml").read_text())
    assert set(raw) <= BRIDGE_KEYS
    for side in ("source", "target"):
        # No credentials in the file: the container's environment brings them.
        assert set(raw[side]) <= SERVER_KEYS, side
    env = {
        "BRIDGE_SOURCE_USERNAME": "bridge",
        "BRIDGE_SOURCE_PASSWORD": "s",
        "BRIDGE_TARGET_USERNAME": "bridge",
        "BRIDGE_TARGET_PASSWORD": "t",
    }
    config = load(DEPLOY / "bridge.yaml", env=env)
    assert str(config.state_dir) == "/var/lib/orthanc-bridge"
    assert config.source.url == "http://orthanc-source:8042"
    assert config.target.url == "http://orthanc-target:8042"
    assert config.source.password == "s"
    assert config.target.password == "t"
    # Reachable on the compose network (Prometheus, the health check), without a password: the
    # port is published on the host's loopback only (test_bridge_health_check_and_http_port).
    assert config.http.address == ("0.0.0.0", 8242)
    assert config.http.allow_anonymous and not config.http.username


def orthanc_known_keys(tmp_path: Path) -> set[str]:
    """Every option named in the default configuration this Orthanc writes (comments included)."""
    require_binary(ORTHANC_BINARY, "Orthanc")
    dump = tmp_path / "default.json"
    subprocess.run([str(ORTHANC_BINARY), f"--config={dump}"], check=True, timeout=30)
    return set(re.findall(r'"(\w+)"\s*:', dump.read_text()))


@pytest.mark.orthanc
@pytest.mark.parametrize("side", ["source", "target"])
def test_orthanc_json_uses_only_known_options(tmp_path: Path, side: str) -> None:
    config = json.loads((DEPLOY / f"orthanc-{side}.json").read_text())
    # Orthanc 1.10 ignores an unknown option silently: a typo would go unnoticed.
    unknown = set(config) - orthanc_known_keys(tmp_path)
    version = ".".join(map(str, orthanc_version()))
    assert not unknown, f"orthanc-{side}.json: not options of Orthanc {version}: {sorted(unknown)}"


def deploy_orthanc(side: str, tmp_path: Path) -> OrthancServer:
    """Orthanc started with deploy/orthanc-<side>.json, only its paths and ports replaced."""
    config = json.loads((DEPLOY / f"orthanc-{side}.json").read_text())
    for key in CONTAINER_ONLY:
        del config[key]
    aet = config.pop("DicomAet")
    user, password = "bridge", f"{side}-password"
    server = OrthancServer(
        f"deploy-{side}",
        tmp_path / side,
        aet=aet,
        users={user: password},  # what the helpers log in with
        extra_config=config,  # RegisteredUsers: {"${ORTHANC_USERNAME}": "${ORTHANC_PASSWORD}"}
        env={"ORTHANC_USERNAME": user, "ORTHANC_PASSWORD": password},
    )
    server.start()
    return server


@pytest.mark.orthanc
@pytest.mark.parametrize("side", ["source", "target"])
def test_orthanc_json_runs_with_credentials_from_the_environment(tmp_path: Path, side: str) -> None:
    server = deploy_orthanc(side, tmp_path)
    try:
        system = server.get_json("/system")
        assert system["Name"] == f"orthanc-{side}"
        assert system["DicomAet"] == f"ORTHANC_{side.upper()}"
        assert requests.get(f"{server.url}/system", timeout=5).status_code == 401
        wrong = requests.get(f"{server.url}/system", auth=("bridge", "x"), timeout=5)
        assert wrong.status_code == 401
    finally:
        discard(server)


@pytest.mark.orthanc
def test_source_json_accepts_jpeg2000_over_dicom(
    tmp_path: Path, pydicom_samples: dict[str, Path]
) -> None:
    """What the PACS does: a C-STORE in JPEG 2000, stored as it came."""
    server = deploy_orthanc("source", tmp_path)
    try:
        storescu = [
            # DCMTK's, by its path: pynetdicom puts a storescu of its own into .venv/bin.
            "/usr/bin/storescu",
            "--propose-j2k-lossless",  # what a PACS holding JPEG 2000 does
            "--aetitle", "PACS",
            "--call", server.aet,
            "127.0.0.1",
            str(server.dicom_port),
            str(pydicom_samples["j2k_lossless"]),
        ]  # fmt: skip
        result = subprocess.run(storescu, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        (instance_id,) = server.instances()
        assert server.transfer_syntax(instance_id) == JPEG_2000_LOSSLESS
    finally:
        discard(server)


def test_the_installed_command_is_the_image_entrypoint(tmp_path: Path) -> None:
    """`orthanc-bridge`, as the Dockerfile and systemd unit call it, starts and fails cleanly."""
    command = Path(sys.executable).parent / "orthanc-bridge"
    assert command.exists(), f"{command}: the package is not installed (pip install -e .)"
    version = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("orthanc-bridge "), version
    # A decoding command starts the decoding server first; a bad configuration must still end
    # in one line and exit code 2, with nothing left running.
    missing = tmp_path / "missing.yaml"
    process = subprocess.Popen(
        [command, "catch-up", "-c", str(missing)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the decoding server's too
    )
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2, stderr
    assert stderr.strip().splitlines() == [
        f"orthanc-bridge: error: cannot read configuration {missing}: No such file or directory"
    ]
    wait_for(lambda: not _group_members(process.pid), 10, "the decoding server to exit")


def _group_members(pgid: int) -> list[int]:
    """The live processes of a process group."""
    members = []
    for proc in Path("/proc").iterdir():
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if proc.name.isdigit() and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(proc.name))
    return members
