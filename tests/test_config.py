"""The configuration loader: every key documented, unknown keys and bad values named."""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

import pytest
import yaml

from bridge.config import (
    Config,
    DicomNodeConfig,
    DicomWebConfig,
    HttpConfig,
    ServerConfig,
    load,
    parse,
)
from bridge.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
BASE = {"source": {"url": "http://a:8042"}, "target": {"url": "http://b:8043"}}


def test_shipped_file_loads_and_documents_every_key() -> None:
    config = load(REPO / "bridge.yaml", env={})
    assert config.source.url == "http://localhost:8042"
    assert config.state_dir == REPO / "state"
    raw = yaml.safe_load((REPO / "bridge.yaml").read_text())
    # Config.http gathers the http_* keys; Config.path is where the file was read from.
    http = {f"http_{f.name}" for f in dataclasses.fields(HttpConfig)}
    # `targets` replaces `target`: documented as a commented example, tested below.
    top = {f.name for f in dataclasses.fields(Config)} - {"http", "path", "targets"} | http
    # ServerConfig.nodes is source.url given as a list.
    server = {f.name for f in dataclasses.fields(ServerConfig)} - {"nodes"}
    assert set(raw) == top
    assert set(raw["source"]) == server
    assert set(raw["target"]) == server | {"syntax", "rules"}


def test_the_shipped_targets_example_is_valid() -> None:
    text = (REPO / "bridge.yaml").read_text()
    example = text[text.index("# targets:\n") :]
    lines = list(itertools.takewhile(lambda line: line.startswith("# "), example.splitlines()))
    lines = [line[2:] for line in lines]
    raw = {**BASE, "targets": yaml.safe_load("\n".join(lines))["targets"]}
    del raw["target"]
    env = {"BRIDGE_TARGET_RESEARCH_USERNAME": "u", "BRIDGE_TARGET_RESEARCH_PASSWORD": "p"}
    config = parse(raw, Path("/etc"), env=env)
    research, archive = config.targets
    assert (research.name, research.syntax, len(research.rules)) == (
        "research",
        "1.2.840.10008.1.2",
        3,
    )
    assert (research.server.username, research.server.password) == ("u", "p")
    assert archive.server.password is None
    assert (archive.name, archive.rules[0].action, archive.rules[0].when) == (
        "archive",
        "forward",
        None,
    )
    assert config.target == research.server


def test_a_url_list_names_the_nodes_of_a_cluster() -> None:
    raw = {**BASE, "source": {"url": ["http://a:8042/", "http://c:8042"]}}
    config = parse(raw, Path("/etc"), env={})
    assert config.source.nodes == ("http://a:8042", "http://c:8042")
    assert config.source.url == "http://a:8042"  # the node the feed reads first
    assert config.target.nodes == ("http://b:8043",)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({**BASE, "delete_orignal": True}, "delete_orignal: unknown key"),
        ({**BASE, "source": {"url": "http://a", "passwd": "x"}}, "source.passwd: unknown key"),
        ({**BASE, "workers": "four"}, "workers: expected int, got str"),
        ({**BASE, "workers": -1}, "workers: must be 0"),
        ({**BASE, "delete_original": "yes"}, "delete_original: expected bool, got str"),
        ({**BASE, "poll_interval": 0}, "poll_interval: must be greater than 0"),
        ({**BASE, "on_source_reset": "skip"}, "on_source_reset: expected one of stop, rewind"),
        ({"target": {"url": "http://b"}}, "source.url: required key is missing"),
        ({**BASE, "target": {"url": "ftp://b"}}, "target.url: expected http://"),
        ({**BASE, "source": {"url": "http://u:p@a"}}, "source.url: must not contain credentials"),
        ({**BASE, "target": {"url": "http://a:8042"}}, "target.url: must differ"),
        ({**BASE, "target": {"url": ["http://c", "http://a:8042"]}}, "target.url: must differ"),
        ({**BASE, "source": {"url": []}}, "source.url: expected a URL or a list of URLs, got an"),
        ({**BASE, "source": {"url": ["http://a", 2]}}, "source.url: expected a URL or a list"),
        ({**BASE, "source": {"url": ["http://a", "ftp://b"]}}, "source.url: expected http://"),
        ({**BASE, "source": {"url": ["http://a", "http://a/"]}}, "source.url: a node is listed"),
        ({**BASE, "forward_unchanged": ["mpeg"]}, "forward_unchanged: expected transfer syntax"),
        ([1, 2], "expected a mapping"),
        ({**BASE, "log_format": "xml"}, "log_format: expected one of text, json"),
        ({**BASE, "http_listen": "8242"}, "http_listen: expected host:port"),
        ({**BASE, "http_listen": "0.0.0.0:8242"}, "http_listen: 0.0.0.0:8242 is reachable"),
        ({**BASE, "http_password": "x"}, "http_username: set both"),
        ({**BASE, "progress_interval": 0}, "progress_interval: must be greater than 0"),
        ({**BASE, "ledger_retention_days": -1}, "ledger_retention_days: must be 0"),
        ({**BASE, "ledger_retention_days": "90d"}, "ledger_retention_days: expected float"),
        ({**BASE, "cluster": {"scheduler": "h:8786"}}, "cluster.scheduler: expected tcp://"),
        ({**BASE, "cluster": {"batch_size": 2}}, "cluster.scheduler: required key is missing"),
        (
            {**BASE, "cluster": {"scheduler": "tls://h:8786"}},
            "cluster.tls_ca_file: a tls:// scheduler needs",
        ),
        (
            {**BASE, "cluster": {"scheduler": "tcp://h:1", "batch_size": 0}},
            "cluster.batch_size: must be between 1 and 1000",
        ),
        ({**BASE, "cluster": {"scheduler": "tcp://h:1", "workers": 2}}, "cluster.workers: unknown"),
    ],
)
def test_bad_values_name_the_key(raw: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse(raw, Path("/etc"), env={})


def test_secrets_from_environment_override_and_stay_out_of_repr() -> None:
    env = {"BRIDGE_SOURCE_USERNAME": "bridge", "BRIDGE_SOURCE_PASSWORD": "s3cret"}
    config = parse(BASE, Path("/etc"), env=env)
    assert (config.source.username, config.source.password) == ("bridge", "s3cret")
    assert "s3cret" not in repr(config)
    assert config.target.username is None


def test_http_server_beyond_loopback_needs_credentials_or_consent() -> None:
    wide = {**BASE, "http_listen": "0.0.0.0:9000"}
    with_auth = parse(wide, REPO, env={"BRIDGE_HTTP_USERNAME": "u", "BRIDGE_HTTP_PASSWORD": "p"})
    assert with_auth.http.address == ("0.0.0.0", 9000)
    assert with_auth.http.password == "p" and "'p'" not in repr(with_auth)
    anonymous = parse({**wide, "http_allow_anonymous": True}, REPO, env={})
    assert anonymous.http.username is None
    assert parse({**BASE, "http_listen": "[::1]:9000"}, REPO, env={}).http.loopback
    assert parse({**BASE, "http_listen": ""}, REPO, env={}).http.address is None


def test_relative_state_dir_is_taken_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "bridge.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({**BASE, "state_dir": "st"}))
    assert load(path, env={}).state_dir == path.parent / "st"


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(bad)


def _kinds_example() -> list[dict[str, object]]:
    """The commented `kind` example of the shipped bridge.yaml, as YAML."""
    text = (REPO / "bridge.yaml").read_text()
    example = text[text.index("#   - name: pacs-archive\n") :]
    lines = list(itertools.takewhile(lambda line: line.startswith("# "), example.splitlines()))
    targets: list[dict[str, object]] = yaml.safe_load("\n".join(line[2:] for line in lines))
    return targets


def test_the_shipped_kinds_example_is_valid() -> None:
    raw = {"source": BASE["source"], "targets": _kinds_example(), "delete_original": True}
    env = {"BRIDGE_TARGET_PACS_ARCHIVE_TOKEN": "s3cret"}
    archive, workstation = parse(raw, Path("/etc"), env=env).targets
    assert (archive.kind, archive.server.url) == (
        "dicomweb",
        "https://archive.example.org/dcm4chee-arc/aets/DCM4CHEE/rs",
    )
    assert archive.dicomweb == DicomWebConfig(token="s3cret")
    assert "s3cret" not in repr(archive)
    assert workstation.kind == "dicom"
    assert workstation.dicom == DicomNodeConfig(
        "10.0.0.5", 104, "WORKSTATION", "ORTHANC-BRIDGE", "commitment", 11113
    )
    assert workstation.server.url == "dicom://WORKSTATION@10.0.0.5:104"


def _one(target: dict[str, object], **top: object) -> dict[str, object]:
    return {"source": BASE["source"], "targets": [{"name": "t", **target}], **top}


DICOM = {"kind": "dicom", "host": "node", "port": 104, "ae_title": "NODE"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_one({"kind": "dimse", "url": "http://b"}), "targets[0].kind: expected one of orthanc"),
        (_one({**DICOM, "host": None}), "targets[0].host"),
        (_one({**DICOM, "port": 0}), "targets[0].port: expected a port between 1 and 65535"),
        (_one({**DICOM, "ae_title": "A" * 17}), "targets[0].ae_title: expected 1 to 16"),
        (_one({**DICOM, "calling_ae_title": "A\\B"}), "targets[0].calling_ae_title"),
        (_one({**DICOM, "verify": "echo"}), "targets[0].verify: expected status or commitment"),
        (_one({**DICOM, "commitment_port": 11113}), "commitment_port: set, but verify is not"),
        (_one({**DICOM, "url": "http://b"}), "targets[0].url: unknown key"),
        (_one({**DICOM}, delete_original=True), "delete_original: t is a dicom target verified"),
        (_one({"kind": "dicomweb", "url": "http://b", "batch_size": 0}), "batch_size: must be"),
        (_one({"kind": "dicomweb", "url": "http://b", "batch_mb": 0}), "batch_mb: must be"),
        (_one({"kind": "orthanc", "url": "http://b", "batch_size": 4}), "batch_size: unknown key"),
    ],
)
def test_a_bad_target_kind_is_refused_with_its_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(raw, Path("/etc"), env={})


def test_a_dicomweb_token_comes_from_the_environment_and_excludes_basic_auth() -> None:
    raw = _one({"kind": "dicomweb", "url": "http://b/dicom-web"})
    config = parse(raw, Path("/etc"), env={"BRIDGE_TARGET_T_TOKEN": "tok"})
    assert config.targets[0].dicomweb == DicomWebConfig(token="tok")
    env = {"BRIDGE_TARGET_T_TOKEN": "tok", "BRIDGE_TARGET_T_USERNAME": "u"}
    with pytest.raises(ConfigError, match=r"BRIDGE_TARGET_T_TOKEN.*not both"):
        parse(raw, Path("/etc"), env=env)


def test_a_dicom_target_verified_by_commitment_may_delete_originals() -> None:
    raw = _one({**DICOM, "verify": "commitment"}, delete_original=True)
    config = parse(raw, Path("/etc"), env={})
    assert config.delete_original
    assert config.targets[0].dicom is not None
    assert config.targets[0].dicom.commitment_port is None
