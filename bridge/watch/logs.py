"""Logging set-up: readable lines, or one JSON object per line for Loki and Elasticsearch.

A JSON line carries timestamp (ISO 8601, UTC), level, logger and message, and for an
instance's outcome also instance, outcome, source_syntax and ms: the fields bridge.engine.transfer
passes as `extra`, so a log query can filter on them without parsing the message.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import TextIO

# The `extra` fields of an instance event, in the order JSON lines give them.
EVENT_FIELDS = ("instance", "outcome", "source_syntax", "ms")
_HANDLER = "orthanc-bridge"
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in EVENT_FIELDS:
            if key in record.__dict__:
                line[key] = record.__dict__[key]
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def setup(level: str, form: str = "text", stream: TextIO | None = None) -> None:
    """Send every record at `level` and above to `stream` (stderr), in `form` (text or json)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if form == "json" else logging.Formatter(TEXT_FORMAT))
    handler.name = _HANDLER
    root = logging.getLogger()
    for old in root.handlers[:]:
        if old.name == _HANDLER:  # ours from an earlier call; others (pytest's) stay
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # urllib3 logs every retry and connection at DEBUG/WARNING; our own messages say more.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
