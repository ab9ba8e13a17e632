"""Routing rules: parsing with errors that name the key, and first-match evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.config import parse
from bridge.errors import ConfigError, NotFound
from bridge.routing import CONVERT, FORWARD, SKIP, Facts, action_for, needs, parse_rules

J2K = "1.2.840.10008.1.2.4.90"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
ISSUE_EXAMPLE = [
    {"when": {"transfer_syntax": [JPEG_BASELINE]}, "action": "forward"},
    {"when": {"modality": ["SR", "PR", "KO"]}, "action": "forward"},
    {"when": {"not": {"modality": ["CT", "MR"]}}, "action": "skip"},
]


class FakeSource:
    """What Orthanc answers about instances, and which requests were made."""

    def __init__(self, instances: dict[str, dict[str, Any]]) -> None:
        self.instances = instances
        self.asked: list[str] = []

    def fetch(self, path: str) -> Any:
        self.asked.append(path)
        _, _, iid, *rest = path.split("?")[0].split("/")
        found = self.instances.get(iid)
        if found is None:
            raise NotFound(path)
        what = "/".join(rest)
        if what == "metadata":
            return found.get("metadata", {})
        if what == "series":
            return {"MainDicomTags": {"Modality": found.get("modality")}, "Labels": []}
        if what == "study":
            return {"Labels": found.get("study_labels", [])}
        if what == "":
            return {"Labels": found.get("labels", [])}
        if what.startswith("content/"):
            tag = what.removeprefix("content/")
            if tag not in found.get("tags", {}):
                raise NotFound(path)
            return found["tags"][tag]
        raise AssertionError(path)


def route(rules: list[dict[str, Any]], source: FakeSource, iid: str) -> str:
    return action_for(parse_rules(rules, "rules"), Facts(iid, source.fetch))


@pytest.fixture
def source() -> FakeSource:
    return FakeSource(
        {
            "ct-j2k": {"metadata": {"TransferSyntax": J2K}, "modality": "CT"},
            "ct-jpeg": {"metadata": {"TransferSyntax": JPEG_BASELINE}, "modality": "CT"},
            "sr": {"metadata": {"TransferSyntax": "1.2.840.10008.1.2.1"}, "modality": "SR"},
            "us": {
                "metadata": {"TransferSyntax": J2K, "RemoteAET": "ECHO1 "},
                "modality": "US",
                "study_labels": ["research"],
                "tags": {"0008,103e": "AXIAL\\CORONAL "},
            },
        }
    )


@pytest.mark.parametrize(
    ("iid", "action"),
    [("ct-j2k", CONVERT), ("ct-jpeg", FORWARD), ("sr", FORWARD), ("us", SKIP)],
)
def test_the_issue_example_routes_each_instance(source: FakeSource, iid: str, action: str) -> None:
    assert route(ISSUE_EXAMPLE, source, iid) == action


def test_facts_are_read_once_and_only_when_asked(source: FakeSource) -> None:
    assert route(ISSUE_EXAMPLE, source, "ct-j2k") == CONVERT
    # The syntax rule read the metadata, both modality rules the series: once each.
    assert source.asked == ["/instances/ct-j2k/metadata?expand", "/instances/ct-j2k/series"]
    source.asked.clear()
    assert route([{"action": "skip"}], source, "ct-j2k") == SKIP
    assert source.asked == []  # a rule without `when` reads nothing


def test_labels_tags_and_senders(source: FakeSource) -> None:
    assert route([{"when": {"label": "research"}, "action": "skip"}], source, "us") == SKIP
    assert route([{"when": {"label": "research"}, "action": "skip"}], source, "sr") == CONVERT
    # Values are compared without DICOM padding; a multi-valued tag matches on any value.
    assert route([{"when": {"remote_aet": "ECHO1"}, "action": "skip"}], source, "us") == SKIP
    tag = {"when": {"tag": {"0008,103E": ["coronal", "CORONAL"]}}, "action": "forward"}
    assert route([tag], source, "us") == FORWARD
    assert route([tag], source, "sr") == CONVERT  # the tag is absent: no match
    both = {"when": {"modality": "US", "remote_aet": "OTHER"}, "action": "skip"}
    assert route([both], source, "us") == CONVERT  # every key of a `when` must match


def test_needs_lists_what_the_rules_read() -> None:
    rules = parse_rules(
        [*ISSUE_EXAMPLE, {"when": {"tag": {"00100020": "x"}}, "action": "skip"}], "r"
    )
    assert needs(rules) == {"transfer_syntax", "modality", "tag"}


BASE = {"source": {"url": "http://a:8042"}}


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (
            [{"name": "r", "url": "http://b", "rules": [{"action": "convrt"}]}],
            "targets[0].rules[0].action: expected one of convert, forward, skip, got 'convrt'",
        ),
        (
            [
                {
                    "name": "r",
                    "url": "http://b",
                    "rules": [{"when": {"modalty": "CT"}, "action": "skip"}],
                }
            ],
            "targets[0].rules[0].when.modalty: unknown condition key",
        ),
        (
            [
                {
                    "name": "r",
                    "url": "http://b",
                    "rules": [{"when": {"not": {"lable": "x"}}, "action": "skip"}],
                }
            ],
            "targets[0].rules[0].when.not.lable: unknown condition key",
        ),
        (
            [{"name": "r", "url": "http://b", "rules": [{"wen": {}, "action": "skip"}]}],
            "targets[0].rules[0].wen: unknown key",
        ),
        (
            [
                {
                    "name": "r",
                    "url": "http://b",
                    "rules": [{"when": {"tag": {"PatientID": "x"}}, "action": "skip"}],
                }
            ],
            "targets[0].rules[0].when.tag: 'PatientID' is not a tag",
        ),
        (
            [{"name": "r", "url": "http://b", "syntax": "1.2.840.10008.1.2.4.90"}],
            "targets[0].syntax: expected one of",
        ),
        ([{"name": "r", "url": "http://b", "sintax": "x"}], "targets[0].sintax: unknown key"),
        ([{"url": "http://b"}], "targets[0].name: required key is missing"),
        (
            [{"name": "r", "url": "http://b"}, {"name": "r", "url": "http://c"}],
            "targets[1].name: 'r' names two targets",
        ),
        (
            [{"name": "r", "url": "http://b"}, {"name": "s", "url": "http://b"}],
            "targets[1].url: r has the same URL",
        ),
        ([{"name": "source", "url": "http://b"}], "targets[0].name: expected letters"),
        ([{"name": "r", "url": "http://a:8042"}], "targets[0].url: must differ from source.url"),
        ([], "targets: expected a list of at least one target"),
    ],
)
def test_rule_and_target_errors_name_the_key(targets: list[Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse({**BASE, "targets": targets}, Path("/etc"), env={})
    assert message in str(error.value)


def test_target_and_targets_together_is_an_error() -> None:
    raw = {**BASE, "target": {"url": "http://b"}, "targets": [{"name": "r", "url": "http://c"}]}
    with pytest.raises(ConfigError, match="targets: give either target"):
        parse(raw, Path("/etc"), env={})


def test_the_single_target_takes_rules_and_a_syntax_too() -> None:
    raw = {
        **BASE,
        "target": {"url": "http://b", "syntax": "1.2.840.10008.1.2", "rules": ISSUE_EXAMPLE},
    }
    (target,) = parse(raw, Path("/etc"), env={"BRIDGE_TARGET_USERNAME": "u"}).targets
    assert (target.name, target.syntax, len(target.rules)) == ("target", "1.2.840.10008.1.2", 3)
    assert target.server.username == "u"
