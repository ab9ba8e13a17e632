"""The `monitoring` profile of deploy/docker-compose.yml: Prometheus and Grafana, configured by
deploy/monitoring. Every metric the dashboard and the alert rules query is one the bridge or
Orthanc 1.10 really serves, the dashboard shows what an operator needs, each alert fires on a
synthetic failure and stays quiet on a healthy history (promtool), and no secret is written in
a file.

promtool comes from Debian's `prometheus` package (scripts/setup.sh); missing, it fails these
tests instead of skipping them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.orthanc import discard
from tests.test_deploy import DEPLOY, SECRETS, compose_config, deploy_orthanc, host_ips

MONITORING = DEPLOY / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
ALERTS = MONITORING / "alerts.yml"
ALERTS_TEST = MONITORING / "alerts_test.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "orthanc-bridge.json"
DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = MONITORING / "grafana" / "provisioning" / "dashboards" / "orthanc-bridge.yml"
DATASOURCE_UID = "orthanc-bridge-prometheus"
PROMTOOL_HINT = "run scripts/setup.sh (apt-get install prometheus, which provides promtool)"
# Non-default usernames: the test sees that the entrypoint puts them into the configuration.
USERNAMES = {"ORTHANC_SOURCE_USERNAME": "src-user", "ORTHANC_TARGET_USERNAME": "tgt-user"}


# --- the metric names in a PromQL expression ------------------------------------------------

# Words that are PromQL, not series: aggregations, set and matching operators, modifiers,
# literals. (Functions are told apart by the "(" that follows them.)
PROMQL_KEYWORDS = frozenset(
    {
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
        "bottomk", "topk", "quantile", "limitk", "limit_ratio",
        "and", "or", "unless", "atan2", "bool", "offset",
        "by", "without", "on", "ignoring", "group_left", "group_right",
        "inf", "nan",
    }
)  # fmt: skip
# These take a list of label names in parentheses (optional after group_left/group_right).
LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
# Numbers, hexadecimal, and durations such as 5m or 1h30m (after `offset`).
_NUMBER = re.compile(
    r"0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:(?:ms|[smhdwy])\d*)*"
)
_GRAFANA_VARIABLE = re.compile(r"\$(?:\{[^}]*\}|\w+)")
_CLOSING = {"{": "}", "[": "]", "(": ")"}


def _string_end(expr: str, start: int) -> int:
    """The index after the string literal that opens at `start`."""
    quote = expr[start]
    i = start + 1
    while i < len(expr):
        if expr[i] == "\\" and quote != "`":
            i += 2
            continue
        if expr[i] == quote:
            return i + 1
        i += 1
    raise ValueError(f"unterminated string in {expr!r}")


def _group_end(expr: str, start: int) -> int:
    """The index after the bracket that closes the one at `start` (strings inside skipped)."""
    opening, closing = expr[start], _CLOSING[expr[start]]
    depth, i = 0, start
    while i < len(expr):
        char = expr[i]
        if char in "\"'`":
            i = _string_end(expr, i)
            continue
        depth += (char == opening) - (char == closing)
        i += 1
        if depth == 0:
            return i
    raise ValueError(f"unbalanced {opening} in {expr!r}")


def metric_names(expr: str) -> set[str]:
    """The names of the series a PromQL expression selects.

    Skipped: functions (a name followed by "("), keywords, label matchers `{...}`, ranges and
    subqueries `[...]`, label lists after by/without/on/ignoring/group_left/group_right,
    strings, numbers and durations, comments, Grafana's variables ($__rate_interval).
    """
    names: set[str] = set()
    label_list_next = False
    i = 0
    while i < len(expr):
        char = expr[i]
        if char.isspace():
            i += 1
        elif char == "#":
            end = expr.find("\n", i)
            i = len(expr) if end < 0 else end
        elif char in "\"'`":
            i = _string_end(expr, i)
        elif char in "{[" or (char == "(" and label_list_next):
            i = _group_end(expr, i)
            label_list_next = False
        elif (match := _GRAFANA_VARIABLE.match(expr, i)) or (match := _NUMBER.match(expr, i)):
            i = match.end()
        elif match := _IDENTIFIER.match(expr, i):
            word, i = match.group(), match.end()
            followed_by_parenthesis = expr[i:].lstrip().startswith("(")
            if word.lower() in LABEL_LIST_KEYWORDS:
                label_list_next = followed_by_parenthesis
            elif word.lower() not in PROMQL_KEYWORDS and not followed_by_parenthesis:
                names.add(word)
        else:
            i += 1  # operators, commas, parentheses
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("orthanc_bridge_backlog_changes", {"orthanc_bridge_backlog_changes"}),
        (
            'sum by (outcome) (rate(orthanc_bridge_instances_total{outcome=~"failed|x"}'
            "[$__rate_interval]))",
            {"orthanc_bridge_instances_total"},
        ),
        (
            "histogram_quantile(0.95, sum(rate(a_bucket{stage!='decode'}[5m])) by (le, stage))",
            {"a_bucket"},
        ),
        ("deriv(b[15m]) > 0 and b > 0", {"b"}),
        (
            "(time() - c > 600) unless on(job, instance)"
            " (sum by (job, instance) (rate(d[10m])) > 0)",
            {"c", "d"},
        ),
        (
            'e / ignoring(stage) group_left(le) f{job="a}b", x=~"sum(y)"} offset 1h30m',
            {"e", "f"},
        ),
        ("count without (server) (g == bool 0) * -1.5e3 + 0x1F  # a comment h", {"g"}),
        ("max_over_time(i[1h:5m]) @ start() or on() vector(0) + Inf", {"i"}),
        ('up{job="orthanc-bridge"} == 0', {"up"}),
        ("sum(j) by (k) / on (k) group_left sum(l)", {"j", "l"}),
    ],
)
def test_metric_names_extractor(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


# --- what the bridge, Orthanc and Prometheus serve --------------------------------------------

# The samples a metric family of each type prints (prometheus_client's text format).
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "unknown": ("",),
}
# Run apart, so that the series it creates stay out of this process's registry: every
# labelled family gets one child, so that every family prints its samples.
_EXPOSE_BRIDGE = """
import json, sys
from prometheus_client import generate_latest
from bridge import metrics
metrics.INSTANCES.labels("converted", "unknown")
metrics.SERVER_UP.labels(metrics.SERVERS[0]).set(1)
metrics.DELIVERIES.labels("target", "converted")
families = {family.name: family.type for family in metrics.REGISTRY.collect()}
sys.stdout.write(json.dumps(families) + "\\n" + generate_latest(metrics.REGISTRY).decode())
"""


def exposition_names(text: str) -> set[str]:
    """The sample names of a Prometheus text exposition."""
    return {
        re.split(r"[{\s]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    }


@pytest.fixture(scope="module")
def bridge_exposition() -> str:
    """What the bridge's /metrics prints, every labelled family with a series."""
    result = subprocess.run(
        [sys.executable, "-c", _EXPOSE_BRIDGE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=DEPLOY.parent,
    )
    return result.stdout


def bridge_metric_names(exposition: str) -> set[str]:
    families_line, text = exposition.split("\n", 1)
    families: dict[str, str] = json.loads(families_line)
    printed = exposition_names(text)
    expected = {
        name + suffix for name, kind in families.items() for suffix in SAMPLE_SUFFIXES[kind]
    }
    # Every family prints its samples: none was left without a series (add it above). Only
    # collectors of their own (the process's CPU) may omit a counter's _created.
    missing = {name for name in expected - printed if not name.endswith("_created")}
    assert printed <= expected and not missing, f"{missing}, unexpected: {printed - expected}"
    return printed


def orthanc_metric_names(tmp_path: Path) -> set[str]:
    """What Orthanc 1.10, started with deploy/orthanc-source.json, serves to Prometheus."""
    server = deploy_orthanc("source", tmp_path)
    try:
        response = server.request("GET", "/tools/metrics-prometheus")
        response.raise_for_status()
        # Prometheus 3 refuses a scrape whose Content-Type names no format it knows.
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        anonymous = requests.get(f"{server.url}/tools/metrics-prometheus", timeout=5)
        assert anonymous.status_code == 401, "Prometheus must log in (basic_auth)"
    finally:
        discard(server)
    names = exposition_names(response.text)
    assert "orthanc_count_instances" in names, response.text
    return names


def promql_expressions() -> Iterator[tuple[str, str]]:
    """(where, expression) of every query in the dashboard and the alert rules."""
    for title, expr in dashboard_queries():
        yield f"dashboard panel {title!r}", expr
    for rule in alert_rules():
        yield f"alert {rule['alert']}", rule["expr"]


@pytest.mark.orthanc
def test_every_query_names_a_metric_that_is_served(tmp_path: Path, bridge_exposition: str) -> None:
    bridge = bridge_metric_names(bridge_exposition)
    orthanc = orthanc_metric_names(tmp_path)
    prometheus = {"up"}  # the one series Prometheus makes for each target it scrapes
    unknown = {
        f"{where}: {name}"
        for where, expr in promql_expressions()
        for name in metric_names(expr)
        if name not in bridge | orthanc | prometheus
    }
    assert not unknown, sorted(unknown)


def test_the_bridge_exposition_passes_promtool_lint(bridge_exposition: str) -> None:
    text = bridge_exposition.split("\n", 1)[1]
    result = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the dashboard ----------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    board = json.loads(DASHBOARD.read_text())
    assert isinstance(board, dict)
    return board


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside a collapsed row included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of the dashboard."""
    queries = []
    for panel in panels(dashboard()):
        for target in panel.get("targets", []):
            assert target.get("expr"), f"{panel['title']}: a query without expression"
            queries.append((str(panel["title"]), str(target["expr"])))
    return queries


def _squeeze(expr: str) -> str:
    return re.sub(r"\s+", "", expr)


def _queries(board_queries: list[tuple[str, str]], pattern: str) -> list[str]:
    return [expr for _, expr in board_queries if re.search(pattern, _squeeze(expr))]


def test_dashboard_shows_what_an_operator_needs() -> None:
    queries = dashboard_queries()
    required = {
        "backlog": r"^orthanc_bridge_backlog_changes$",
        "rate by outcome": r"sumby\(outcome\)\(rate\(orthanc_bridge_instances_total\[",
        "outcomes in the range": r"increase\(orthanc_bridge_instances_total\[\$__range\]",
        "waiting for a person": r"^orthanc_bridge_ledger_instances$",
        "stage p50": r"^histogram_quantile\(0\.5,sumby\(le,stage\)\(rate\("
        r"orthanc_bridge_stage_seconds_bucket\[",
        "stage p95": r"^histogram_quantile\(0\.95,sumby\(le,stage\)\(rate\("
        r"orthanc_bridge_stage_seconds_bucket\[",
        "servers up": r"^orthanc_bridge_server_up$",
        "bridge scraped": r'^up\{job="orthanc-bridge"\}$',
        "decoder restarts": r"^increase\(orthanc_bridge_decoder_restarts_total\[",
        "decoders alive": r"^orthanc_bridge_decoders$",
        "bytes per second": r"rate\(orthanc_bridge_bytes_total\[",
        "in flight": r"^orthanc_bridge_inflight_(instances|bytes)$",
        "feed": r"time\(\)-orthanc_bridge_last_poll_timestamp_seconds",
        "Orthanc's own": r"^orthanc_count_instances$",
    }
    missing = [what for what, pattern in required.items() if not _queries(queries, pattern)]
    assert not missing, f"the dashboard lacks: {missing}"
    # Rates follow the scrape interval Grafana knows from the datasource.
    for expr in _queries(queries, r"(rate|increase)\("):
        assert "$__rate_interval" in expr or "$__range" in expr, expr


def test_dashboard_layout_and_datasource() -> None:
    board = dashboard()
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert [source["uid"] for source in provisioned] == [DATASOURCE_UID]
    assert provisioned[0]["url"] == "http://prometheus:9090"
    ids: set[int] = set()
    cells: set[tuple[int, int]] = set()
    rows_with_panels = 0
    for panel in panels(board):
        title = panel["title"]
        assert panel["id"] not in ids, f"{title}: duplicate id"
        ids.add(panel["id"])
        if panel["type"] == "row":
            rows_with_panels += bool(panel.get("panels"))
        else:
            assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, title
            assert panel.get("description"), f"{title}: tell the operator what it shows"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == DATASOURCE_UID, title
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, title
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{title} overlaps another panel"
        cells |= mine
    assert rows_with_panels, "the collapsed row's panels were not seen"


# --- the alert rules --------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_cover_the_failures_and_say_what_to_do() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    required = {
        "backlog growing": r"deriv\(orthanc_bridge_backlog_changes\[15m\]\)>0",
        "a server down": r"^orthanc_bridge_server_up==0$",
        "the bridge unreachable": r'^up\{job="orthanc-bridge"\}==0$',
        "failures waiting": r"^orthanc_bridge_ledger_instances>0$",
        "decoders restarting": r"increase\(orthanc_bridge_decoder_restarts_total\[",
        "feed stalled": r"time\(\)-orthanc_bridge_last_poll_timestamp_seconds>",
    }
    exprs = {name: _squeeze(rule["expr"]) for name, rule in rules.items()}
    missing = [w for w, p in required.items() if not any(re.search(p, e) for e in exprs.values())]
    assert not missing, f"no alert for: {missing}"
    for name, rule in rules.items():
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name}: no `for:`"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        annotations = rule["annotations"]
        assert annotations["summary"], name
        assert len(annotations["description"]) > 100, f"{name}: say what to do"


def test_alert_unit_tests_fire_and_stay_quiet_for_each_alert() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert fires == names, f"never seen firing: {names - fires}"
    assert quiet == names, f"never seen quiet: {names - quiet}"


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        raise FileNotFoundError(f"promtool not found: {PROMTOOL_HINT}")
    return binary


def run_promtool(*args: str, cwd: Path = MONITORING) -> None:
    result = subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_rules_and_runs_their_unit_tests() -> None:
    run_promtool("check", "rules", ALERTS.name)
    run_promtool("test", "rules", ALERTS_TEST.name)


# --- the compose services ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def monitoring(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The services of `docker-compose --profile monitoring config`."""
    tmp_path = tmp_path_factory.mktemp("compose")
    result = compose_config(tmp_path, {**SECRETS, **USERNAMES}, "--profile", "monitoring")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert isinstance(services, dict)
    return services


def bind_mounts(service: dict[str, Any]) -> dict[str, tuple[Path, bool]]:
    """target: (host path, read-only) of a service's bind mounts, as either Compose renders."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):  # Compose v2
            if volume["type"] == "bind":
                mounts[volume["target"]] = (Path(volume["source"]), bool(volume.get("read_only")))
            continue
        source, target, *mode = volume.split(":")
        if source.startswith(("/", ".")):
            mounts[target] = (Path(source), mode == ["ro"])
    return mounts


def named_volumes(service: dict[str, Any]) -> set[str]:
    """The named volumes a service mounts, as either Compose renders them."""
    names = set()
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):  # Compose v2
            if volume["type"] == "volume":
                names.add(volume["source"])
        elif not volume.startswith(("/", ".")):
            names.add(volume.split(":")[0])
    return names


def container_port(port: str | dict[str, Any]) -> str:
    """The container's side of a `ports:` entry, as either Compose renders it."""
    if isinstance(port, dict):
        return str(port["target"])
    return port.rsplit(":", 1)[-1].split("/")[0]


def test_monitoring_services_are_pinned_profiled_and_on_loopback(
    monitoring: dict[str, Any],
) -> None:
    assert re.fullmatch(r"prom/prometheus:v3\.\d+\.\d+", monitoring["prometheus"]["image"])
    assert re.fullmatch(r"grafana/grafana:12\.\d+\.\d+", monitoring["grafana"]["image"])
    assert named_volumes(monitoring["prometheus"]) == {"prometheus-data"}
    assert named_volumes(monitoring["grafana"]) == {"grafana-data"}
    for name in ("prometheus", "grafana"):
        assert monitoring[name]["profiles"] == ["monitoring"], name
        assert monitoring[name]["ports"], name
    # Every HTTP port is published on the host's loopback only; DICOM alone faces the network.
    for name, service in monitoring.items():
        for port in service.get("ports", []):
            assert host_ips(port) == "127.0.0.1" or container_port(port) == "4242", (name, port)


def test_monitoring_configuration_is_mounted_read_only_from_the_repository(
    monitoring: dict[str, Any],
) -> None:
    expected = {
        "prometheus": {
            "/etc/prometheus/prometheus.yml": PROMETHEUS_CONFIG,
            "/etc/prometheus/alerts.yml": ALERTS,
        },
        "grafana": {
            "/etc/grafana/provisioning/datasources": DATASOURCES.parent,
            "/etc/grafana/provisioning/dashboards": PROVIDERS.parent,
            "/etc/grafana/dashboards": DASHBOARD.parent,
        },
    }
    for name, mounts in expected.items():
        rendered = bind_mounts(monitoring[name])
        assert {target: source for target, (source, _) in rendered.items()} == mounts, name
        assert all(read_only for _, read_only in rendered.values()), f"{name}: mount them :ro"
        for source in mounts.values():
            files = [source] if source.is_file() else list(source.glob("*.*"))
            assert files and all(f.is_file() for f in files), source
    # What the files name, the compose file provides.
    providers = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == ["/etc/grafana/dashboards"]
    environment = monitoring["grafana"]["environment"]
    home = environment["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"/etc/grafana/dashboards/{DASHBOARD.name}"
    # Read-only for anonymous visitors, and no admin account whose password would be a secret.
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert environment["GF_SECURITY_DISABLE_INITIAL_ADMIN_CREATION"] == "true"
    assert environment["GF_AUTH_DISABLE_LOGIN_FORM"] == "true"
    assert not any("PASSWORD" in key for key in environment), environment


def test_prometheus_scrapes_the_stack_without_a_password_in_its_files() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {
        name: [t for group in job["static_configs"] for t in group["targets"]]
        for name, job in jobs.items()
    }
    assert targets == {
        "orthanc-bridge": ["bridge:8242"],
        "orthanc-source": ["orthanc-source:8042"],
        "orthanc-target": ["orthanc-target:8042"],
    }
    bridge_listen = yaml.safe_load((DEPLOY / "bridge.yaml").read_text())["http_listen"]
    assert bridge_listen.rpartition(":")[2] == "8242"
    for side in ("source", "target"):
        job = jobs[f"orthanc-{side}"]
        assert job["metrics_path"] == "/tools/metrics-prometheus"
        assert job["basic_auth"] == {
            "username": f"@ORTHANC_{side.upper()}_USERNAME@",
            "password_file": f"/run/prometheus/orthanc-{side}.password",
        }
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]


def run_entrypoint(service: dict[str, Any], root: Path) -> None:
    """Run the Prometheus container's entrypoint script with /run/prometheus and /etc/prometheus
    moved under `root`, and `true` in place of Prometheus: what it writes at each start."""
    shell, flags, script, name = service["entrypoint"]
    assert (shell, name) == ("/bin/sh", "prometheus"), service["entrypoint"]
    # `config` keeps the escaped $$ that docker-compose turns into $ when it runs the service.
    script = script.replace("$$", "$")
    assert 'exec /bin/prometheus "$@"' in script, script
    script = (
        script.replace("/run/prometheus/", f"{root}/run/")
        .replace("/etc/prometheus/", f"{root}/etc/")
        .replace("exec /bin/prometheus", "exec true")
    )
    (root / "run").mkdir()
    (root / "etc").mkdir()
    shutil.copy(PROMETHEUS_CONFIG, root / "etc" / "prometheus.yml")
    shutil.copy(ALERTS, root / "etc" / "alerts.yml")
    env = {"PATH": os.environ["PATH"], **service["environment"]}
    subprocess.run(
        ["sh", flags, script, name, *service["command"]], env=env, check=True, timeout=30
    )


def test_prometheus_entrypoint_writes_the_secrets_only_where_prometheus_reads_them(
    monitoring: dict[str, Any], tmp_path: Path
) -> None:
    service = monitoring["prometheus"]
    assert "--config.file=/run/prometheus/prometheus.yml" in service["command"]
    tmpfs = service["tmpfs"]
    tmpfs = [tmpfs] if isinstance(tmpfs, str) else tmpfs
    assert any(t.split(":")[0] == "/run/prometheus" for t in tmpfs), tmpfs
    run_entrypoint(service, tmp_path)
    run = tmp_path / "run"
    for side in ("source", "target"):
        password = run / f"orthanc-{side}.password"
        assert password.read_text() == SECRETS[f"ORTHANC_{side.upper()}_PASSWORD"]
        assert stat.S_IMODE(password.stat().st_mode) == 0o600, "readable by others"
    generated = (run / "prometheus.yml").read_text()
    assert not any(secret in generated for secret in SECRETS.values())
    assert not re.search(r"@\w+@", generated), "a placeholder was left"
    jobs = {job["job_name"]: job for job in yaml.safe_load(generated)["scrape_configs"]}
    assert jobs["orthanc-source"]["basic_auth"]["username"] == "src-user"
    assert jobs["orthanc-target"]["basic_auth"]["username"] == "tgt-user"
    # What Prometheus loads, with its paths moved where the files are, is a valid configuration.
    (run / "prometheus.yml").write_text(
        generated.replace("/run/prometheus/", f"{run}/").replace(
            "/etc/prometheus/", f"{tmp_path}/etc/"
        )
    )
    run_promtool("check", "config", str(run / "prometheus.yml"), cwd=tmp_path)
