"""The cluster engine's deployments: the compose `cluster` profile and the Kubernetes example
agree with each other and with what tests/test_cluster.py proves on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bridge.config import load, parse
from bridge.engine.tasks import DASK_SETTINGS
from tests.test_deploy import DEPLOY, SECRETS, compose_config

KUBERNETES = DEPLOY / "kubernetes"


def test_compose_cluster_profile_runs_scheduler_and_workers_in_the_bridge_image(
    tmp_path: Path,
) -> None:
    secrets = SECRETS | {"BRIDGE_CONFIG": "bridge-cluster.yaml"}
    result = compose_config(tmp_path, secrets, "--profile", "cluster")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    scheduler, worker, bridge = (
        services["dask-scheduler"],
        services["dask-worker"],
        services["bridge"],
    )
    assert scheduler["image"] == worker["image"] == bridge["image"]  # one version everywhere
    assert "ports" not in scheduler  # the scheduler unpickles what it is sent: not published
    assert worker["entrypoint"][:3] == ["dask", "worker", "tcp://dask-scheduler:8786"]
    assert worker["entrypoint"][3:5] == ["--nthreads", "1"]
    assert bridge["command"] == ["run", "-c", "/etc/orthanc-bridge/bridge-cluster.yaml"]
    config = load(DEPLOY / "bridge-cluster.yaml", env={})
    assert config.cluster is not None
    assert config.cluster.scheduler == "tcp://dask-scheduler:8786"
    # The same as bridge.yaml but for the cluster.
    plain = yaml.safe_load((DEPLOY / "bridge.yaml").read_text())
    clustered = yaml.safe_load((DEPLOY / "bridge-cluster.yaml").read_text())
    assert {k: v for k, v in clustered.items() if k != "cluster"} == {
        k: v for k, v in plain.items() if k != "workers"
    }


def _documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBERNETES / name).read_text()) if d]


def test_kubernetes_example_coordinator_finds_the_dask_cluster() -> None:
    (cluster,) = _documents("dask-cluster.yaml")
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1" and cluster["kind"] == "DaskCluster"
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    assert worker["command"] == ["dask", "worker"]
    assert worker["args"][2:4] == ["--nthreads", "1"]
    assert worker["envFrom"] == [{"secretRef": {"name": "orthanc-bridge-credentials"}}]
    service_port = cluster["spec"]["scheduler"]["service"]["ports"][0]["port"]

    by_kind = {d["kind"]: d for d in _documents("coordinator.yaml")}
    raw = yaml.safe_load(by_kind["ConfigMap"]["data"]["bridge.yaml"])
    config = parse(raw, Path("/etc/orthanc-bridge"), env={})
    assert config.cluster is not None
    assert config.cluster.scheduler == (
        f"tcp://{cluster['metadata']['name']}-scheduler:{service_port}"
    )
    deployment = by_kind["Deployment"]["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"]["type"] == "Recreate"
    pod = deployment["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert Path(mounts["state"]) == config.state_dir
    claims = {v["name"]: v.get("persistentVolumeClaim", {}) for v in pod["volumes"]}
    assert claims["state"]["claimName"] == by_kind["PersistentVolumeClaim"]["metadata"]["name"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["envFrom"] == worker["envFrom"]
    for path in KUBERNETES.iterdir():
        assert "PASSWORD=" not in path.read_text().replace("PASSWORD=...", "")


def test_the_image_quiets_dasks_dashboard_feeds() -> None:
    """Scheduler and workers run with bridge.engine.tasks.DASK_SETTINGS, as the tests' cluster."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for name, value in DASK_SETTINGS.items():
        assert f"{name}={value}" in dockerfile, name


def test_workers_import_the_decoders_as_they_start(tmp_path: Path) -> None:
    """`--preload bridge.engine.remote` on every worker, as tests/dask_cluster.py runs them."""
    secrets = SECRETS | {"BRIDGE_CONFIG": "bridge-cluster.yaml"}
    result = compose_config(tmp_path, secrets, "--profile", "cluster")
    assert result.returncode == 0, result.stderr
    entrypoint = yaml.safe_load(result.stdout)["services"]["dask-worker"]["entrypoint"]
    assert entrypoint[entrypoint.index("--preload") + 1] == "bridge.engine.remote"
    resource = yaml.safe_load((KUBERNETES / "dask-cluster.yaml").read_text())
    args = resource["spec"]["worker"]["spec"]["containers"][0]["args"]
    assert args[args.index("--preload") + 1] == "bridge.engine.remote"
