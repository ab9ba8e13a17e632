"""One instance, start to finish: download -> transcode -> upload -> verify -> delete.

The target's answer is checked against the transfer syntax it then holds: `AlreadyStored` may
mean it kept an older compressed copy (Orthanc's default `OverwriteInstances: false`), which is
then replaced, and `Success` is checked until one upload shows that the target stores what it
is sent. The original is deleted only when the target verifiably holds the instance in
Explicit VR Little Endian: that check is never skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bridge.budget import ByteBudget
from bridge.decoding import EXPLICIT_VR_LITTLE_ENDIAN, Transcoded
from bridge.errors import (
    Interrupted,
    NotFound,
    PermanentError,
    UnsupportedSyntax,
    VerificationFailed,
)
from bridge.feed import NewInstance
from bridge.header import transfer_syntax
from bridge.metrics import STAGE
from bridge.orthanc import OrthancClient
from bridge.state import (
    CONVERTED,
    DELETING,
    FAILED,
    FORWARDED,
    UNSUPPORTED,
    VANISHED,
    Entry,
)

log = logging.getLogger(__name__)

Decoder = Callable[[bytes], Transcoded]


@dataclass
class Transfer:
    """Moves single instances from source to target; shared by all transfer threads."""

    source: OrthancClient
    target: OrthancClient
    decode: Decoder
    delete_original: bool
    stop: threading.Event
    budget: ByteBudget
    # Writes a ledger entry at once; used to note a verified copy before deleting the original.
    record: Callable[[Entry], None]
    # The bytes a file's decoded copy will take, as far as its header tells (0 when it cannot).
    decoded_size: Callable[[bytes], int]
    # False on a cluster worker: it verifies as if it were to delete, and the coordinator, which
    # keeps the ledger, deletes the original (bridge.cluster).
    deletes: bool = True
    # Whether an upload answered Success was found stored as sent. Until then every upload is
    # checked: a target that transcodes what arrives (IngestTranscoding, a Lua filter) says
    # Success too. Once one was, Success is trusted, saving a request per instance (2% of
    # the throughput), except before deleting an original: that copy is always checked.
    _keeps_what_it_gets: bool = field(default=False, init=False)

    def run(self, item: NewInstance) -> Entry:
        """Move one instance; permanent problems come back as a FAILED/UNSUPPORTED entry.

        TransientError (a server still down when the retry policy gives up) and Interrupted
        (shutdown) propagate: the instance is then not finished and will be redone.
        """
        started = time.monotonic()
        iid = item.instance_id
        self.budget.wait_for_room()
        try:
            with STAGE["download"].time():
                data = self.source.download(iid)
        except NotFound:
            log.warning(
                "instance %s: deleted from the source before it was converted",
                iid,
                extra=outcome_fields(iid, VANISHED, None, started),
            )
            return Entry(iid, item.seq, VANISHED, error="deleted from the source before transfer")
        # What the file says, until the decoder reads it properly: failures are counted and
        # recorded by syntax too.
        syntax = transfer_syntax(data)
        with self.budget.holding() as holding:
            # Room for the decoded copy is taken now, while waiting holds nothing up; once a
            # worker has decoded it, its transfer thread must read it whatever the budget says.
            holding.set(len(data) + self.decoded_size(data))
            try:
                with STAGE["decode"].time():
                    result = self.decode(data)
                syntax = result.source_syntax
                # Only the converted copy is needed from here: free the original's share.
                del data
                holding.set(len(result.data))
                self._checkpoint()
                expected = result.source_syntax if result.forwarded else EXPLICIT_VR_LITTLE_ENDIAN
                self._store(iid, result, expected)
            except UnsupportedSyntax as exc:
                reason = _one_line(exc)
                log.error(
                    "instance %s: kept in the source, unsupported: %s",
                    iid,
                    reason,
                    extra=outcome_fields(iid, UNSUPPORTED, syntax, started),
                )
                return Entry(iid, item.seq, UNSUPPORTED, syntax, reason, _since(started))
            except PermanentError as exc:
                reason = _one_line(exc)
                log.error(
                    "instance %s: kept in the source, failed: %s",
                    iid,
                    reason,
                    extra=outcome_fields(iid, FAILED, syntax, started),
                )
                return Entry(iid, item.seq, FAILED, syntax, reason, _since(started))
        del result  # the target holds it now
        deleted = False
        if self.delete_original and self.deletes and expected == EXPLICIT_VR_LITTLE_ENDIAN:
            # Deleting the original also deletes its change row: if the bridge dies right
            # after, nothing would ever bring the instance back to the ledger. Note it first.
            self.record(Entry(iid, item.seq, DELETING, syntax, None, _since(started)))
            with STAGE["delete"].time():
                self.source.delete(iid)
            deleted = True
        state = FORWARDED if expected != EXPLICIT_VR_LITTLE_ENDIAN else CONVERTED
        seconds = _since(started)
        log.info(
            "instance %s: %s from %s in %.0f ms%s",
            iid,
            state,
            syntax,
            seconds * 1000,
            ", original deleted" if deleted else "",
            extra=outcome_fields(iid, state, syntax, started),
        )
        return Entry(iid, item.seq, state, syntax, None, seconds, deleted)

    def _store(self, iid: str, result: Transcoded, expected: str) -> None:
        with STAGE["upload"].time():
            stored = self.target.upload(result.data)
        if stored.instance_id != iid:
            # Same UIDs, yet another ID: Orthanc read an identifier differently in the two
            # files (e.g. a PatientID stored with VR UN in the original). Verify that copy.
            log.warning("instance %s: the target files it as %s", iid, stored.instance_id)
        if stored.status == "Success" and self._keeps_what_it_gets and not self.delete_original:
            return
        with STAGE["verify"].time():
            held = self.target.transfer_syntax(stored.instance_id)
        if held == expected and stored.status == "Success":
            self._keeps_what_it_gets = True
        if held != expected and stored.status == "AlreadyStored":
            # The target kept an older copy (compressed, or sent by something else): replace it.
            log.info("instance %s: target held it as %s; replacing that copy", iid, held)
            self._checkpoint()
            self.target.delete(stored.instance_id)
            self.target.upload(result.data)
            held = self.target.transfer_syntax(stored.instance_id)
        if held != expected:
            raise VerificationFailed(
                f"after upload the target holds it as {held or 'nothing'}, expected {expected}"
            )

    def _checkpoint(self) -> None:
        """Abandon the instance here when shutting down; nothing of it is recorded."""
        if self.stop.is_set():
            raise Interrupted("shutting down")


def _since(started: float) -> float:
    return time.monotonic() - started


def outcome_fields(iid: str, outcome: str, syntax: str | None, started: float) -> dict[str, object]:
    """The fields of an instance's outcome that JSON logs carry (bridge.logs.EVENT_FIELDS)."""
    return {
        "instance": iid,
        "outcome": outcome,
        "source_syntax": syntax,
        "ms": round(_since(started) * 1000),
    }


def _one_line(exc: Exception) -> str:
    """The error message with every run of whitespace, newlines included, made one space."""
    # Decoders' messages span several lines; the summary and `status` print one instance per
    # line, its reason after the ID, so a multi-line reason would break them.
    return " ".join(str(exc).split())
