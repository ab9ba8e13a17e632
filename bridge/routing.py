"""Which instances go to which target, and how: each target's rules, first match wins.

A rule is `when` (a condition; none means always) and an `action`: `convert` to the target's
output syntax, `forward` the file unchanged, or `skip` it. An instance no rule matches is
converted. Conditions read what Orthanc knows about an instance without downloading it, and
only what some rule asks for: its metadata (one request), its series (modality, labels), its
study and itself (labels, Orthanc 1.12 and later), and single tags (one request each).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.errors import ConfigError, NotFound

CONVERT = "convert"
FORWARD = "forward"
SKIP = "skip"
ACTIONS = (CONVERT, FORWARD, SKIP)

# Condition key -> Orthanc metadata name, for those that are instance metadata.
_METADATA = {
    "transfer_syntax": "TransferSyntax",
    "sop_class": "SopClassUid",
    "remote_aet": "RemoteAET",
    "called_aet": "CalledAET",
    "origin": "Origin",
}
FIELDS = (*_METADATA, "modality", "label", "tag")
_TAG = re.compile(r"^([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})$")


@dataclass(frozen=True)
class Condition:
    """Every key must match (a list matches any of its values); `negated` must not match."""

    fields: tuple[tuple[str, frozenset[str]], ...] = ()
    tags: tuple[tuple[str, frozenset[str]], ...] = ()  # ("0008,103e", values)
    negated: Condition | None = None

    def matches(self, facts: Facts) -> bool:
        for key, values in self.fields:
            if not facts.values(key) & values:
                return False
        for tag, values in self.tags:
            if not facts.tag(tag) & values:
                return False
        return self.negated is None or not self.negated.matches(facts)

    def needs(self) -> set[str]:
        """The fields this condition reads ("tag" for any tag)."""
        found = {key for key, _ in self.fields} | ({"tag"} if self.tags else set())
        return found | (self.negated.needs() if self.negated else set())


@dataclass(frozen=True)
class Rule:
    action: str
    when: Condition | None = None  # None: always


def action_for(rules: tuple[Rule, ...], facts: Facts) -> str:
    """The action of the first rule whose condition matches; `convert` when none does."""
    for rule in rules:
        if rule.when is None or rule.when.matches(facts):
            return rule.action
    return CONVERT


# --- what a condition reads -------------------------------------------------------------------

Fetch = Callable[[str], Any]  # GET a path of the source's REST API, answered as JSON or text


@dataclass
class Facts:
    """What the source knows about one instance, read on first use and kept."""

    instance_id: str
    fetch: Fetch
    # The transfer syntax, once the file was downloaded (saves the metadata request).
    known: dict[str, set[str]] = field(default_factory=dict)
    _tags: dict[str, set[str]] = field(default_factory=dict)

    def values(self, key: str) -> set[str]:
        """The instance's values for a condition key (empty when it has none)."""
        if key not in self.known:
            self.known.update(self._read(key))
        return self.known.get(key, set())

    def tag(self, tag: str) -> set[str]:
        """The values of one DICOM tag of the instance, each one of a multi-valued tag."""
        if tag not in self._tags:
            try:
                raw = self.fetch(f"/instances/{self.instance_id}/content/{tag}")
            except NotFound:
                raw = ""
            text = raw if isinstance(raw, str) else ""
            self._tags[tag] = {_clean(v) for v in text.split("\\")} - {""}
        return self._tags[tag]

    def _read(self, key: str) -> dict[str, set[str]]:
        iid = self.instance_id
        if key in _METADATA:
            metadata = self.fetch(f"/instances/{iid}/metadata?expand")
            metadata = metadata if isinstance(metadata, Mapping) else {}
            return {
                name: {_clean(str(metadata[meta]))} if metadata.get(meta) else set()
                for name, meta in _METADATA.items()
            }
        if key == "modality":
            series = self.fetch(f"/instances/{iid}/series")
            modality = _main_tag(series, "Modality")
            return {"modality": {modality} if modality else set()}
        if key == "label":
            # Labels of the instance, its series and its study: sites label studies mostly.
            labels: set[str] = set()
            for path in (
                f"/instances/{iid}",
                f"/instances/{iid}/series",
                f"/instances/{iid}/study",
            ):
                resource = self.fetch(path)
                if isinstance(resource, Mapping):
                    labels.update(str(label) for label in resource.get("Labels") or ())
            return {"label": labels}
        raise ConfigError(f"rules: unknown condition key {key!r}")  # parse() prevents this


def _main_tag(resource: Any, name: str) -> str:
    tags = resource.get("MainDicomTags") if isinstance(resource, Mapping) else None
    return _clean(str(tags.get(name) or "")) if isinstance(tags, Mapping) else ""


def _clean(value: str) -> str:
    """A DICOM value as rules compare it: without padding (NUL, spaces)."""
    return value.strip("\x00 ")


# --- parsing ----------------------------------------------------------------------------------


def parse_rules(raw: object, where: str) -> tuple[Rule, ...]:
    """The rules of one target from its configuration; errors name the key at fault."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: expected a list of rules, got {type(raw).__name__}")
    rules = []
    for number, item in enumerate(raw):
        name = f"{where}[{number}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{name}: expected a rule (`when` and `action`)")
        unknown = set(item) - {"when", "action"}
        if unknown:
            raise ConfigError(f"{name}.{sorted(unknown)[0]}: unknown key (a rule has when, action)")
        action = item.get("action")
        if action not in ACTIONS:
            raise ConfigError(
                f"{name}.action: expected one of {', '.join(ACTIONS)}, got {action!r}"
            )
        when = item.get("when")
        rules.append(Rule(str(action), None if when is None else _condition(when, f"{name}.when")))
    return tuple(rules)


def _condition(raw: object, where: str) -> Condition:
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(
            f"{where}: expected a mapping of condition keys ({', '.join(FIELDS)}, not)"
        )
    fields: list[tuple[str, frozenset[str]]] = []
    tags: list[tuple[str, frozenset[str]]] = []
    negated = None
    for key, value in raw.items():
        name = f"{where}.{key}"
        if key == "not":
            negated = _condition(value, name)
        elif key == "tag":
            if not isinstance(value, Mapping) or not value:
                raise ConfigError(f'{name}: expected {{"GGGG,EEEE": [values]}}')
            for tag, values in value.items():
                match = _TAG.match(str(tag))
                if not match:
                    raise ConfigError(f"{name}: {tag!r} is not a tag; write it as GGGG,EEEE")
                tags.append((f"{match[1]},{match[2]}".lower(), _values(values, f"{name}.{tag}")))
        elif key in FIELDS:
            fields.append((str(key), _values(value, name)))
        else:
            raise ConfigError(f"{name}: unknown condition key (known: {', '.join(FIELDS)}, not)")
    return Condition(tuple(fields), tuple(tags), negated)


def _values(raw: object, where: str) -> frozenset[str]:
    values = raw if isinstance(raw, list) else [raw]
    if not values or not all(isinstance(v, (str, int, float)) for v in values):
        raise ConfigError(f"{where}: expected a value or a list of values")
    return frozenset(_clean(str(v)) for v in values)


def needs(rules: tuple[Rule, ...]) -> set[str]:
    """Every condition key some rule reads."""
    found: set[str] = set()
    for rule in rules:
        if rule.when is not None:
            found |= rule.when.needs()
    return found
