"""One instance, start to finish: route -> download -> transcode -> upload -> verify -> delete.

Each target's rules (bridge.routing) decide first, from what the source knows, whether the
target takes the instance converted, forwarded unchanged, or not at all; an instance no target
takes is not even downloaded. It is downloaded once and decoded once, whatever the number of
targets, and each target gets its copy in its own syntax.

The target's answer is checked against the transfer syntax it then holds: `AlreadyStored` may
mean it kept an older compressed copy (Orthanc's default `OverwriteInstances: false`), which is
then replaced, and `Success` is checked until one upload shows that the target stores what it
is sent. The original is deleted only when every target that takes it verifiably holds its
copy: that check is never skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bridge.dicom.header import transfer_syntax
from bridge.dicom.implicit import to_implicit
from bridge.engine.budget import ByteBudget
from bridge.engine.destinations import Copy, Destination
from bridge.errors import (
    Interrupted,
    NotFound,
    PermanentError,
    UnsupportedSyntax,
    readable,
)
from bridge.jobs import Transcoded
from bridge.metrics import STAGE
from bridge.outcomes import (
    CONVERTED,
    DELETING,
    FAILED,
    FORWARDED,
    SKIPPED,
    UNSUPPORTED,
    VANISHED,
    Delivery,
    Entry,
    NewInstance,
    outcome_fields,
)
from bridge.peers.orthanc import OrthancClient
from bridge.routing import CONVERT, FORWARD, SKIP, Facts, action_for
from bridge.uids import EXPLICIT_VR_LITTLE_ENDIAN

log = logging.getLogger(__name__)

Decoder = Callable[[bytes | memoryview], Transcoded]


@dataclass
class Transfer:
    """Moves single instances from the source to the targets; shared by all transfer threads."""

    source: OrthancClient
    targets: list[Destination]
    decode: Decoder
    delete_original: bool
    stop: threading.Event
    budget: ByteBudget
    # Writes a ledger entry at once; used to note a verified copy before deleting the original.
    record: Callable[[Entry], None]
    # The bytes a file's decoded copy will take, as far as its header tells (0 when it cannot).
    decoded_size: Callable[[bytes | memoryview], int]
    # False on a cluster worker: it verifies as if it were to delete, and the coordinator, which
    # keeps the ledger, deletes the original (bridge.engine.cluster).
    deletes: bool = True
    _routed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._routed = any(target.config.rules for target in self.targets)

    def run(self, item: NewInstance) -> Entry:
        """Move one instance; permanent problems come back as a FAILED/UNSUPPORTED entry.

        TransientError (a server still down when the retry policy gives up) and Interrupted
        (shutdown) propagate: the instance is then not finished and will be redone.
        """
        started = time.monotonic()
        iid = item.instance_id
        try:
            actions = self._route(iid)
        except NotFound:
            return self._vanished(item, started)
        except PermanentError as exc:
            return self._problem(item, FAILED, None, f"its rules: {_one_line(exc)}", started)
        takers = [t for t in self.targets if actions[t.name] != SKIP]
        skipped = tuple(Delivery(t.name, SKIPPED) for t in self.targets if t not in takers)
        if not takers:
            log.info(
                "instance %s: skipped, no target's rules take it",
                iid,
                extra=outcome_fields(iid, SKIPPED, None, started),
            )
            return Entry(iid, item.seq, SKIPPED, None, None, _since(started), deliveries=skipped)
        self.budget.wait_for_room()
        try:
            with STAGE["download"].time():
                data = self.source.download(iid)
        except NotFound:
            return self._vanished(item, started)
        # What the file says, until the decoder reads it properly: failures are counted and
        # recorded by syntax too.
        syntax = transfer_syntax(data)
        converting = any(actions[t.name] == CONVERT for t in takers)
        delivered: list[Delivery] = list(skipped)
        copies: list[Copy] = []
        with self.budget.holding() as holding:
            # Room for the decoded copy is taken now, while waiting holds nothing up; once a
            # worker has decoded it, its transfer thread must read it whatever the budget says.
            holding.set(len(data) + (self.decoded_size(data) if converting else 0))
            result: Transcoded | None = None
            problem: tuple[str, str] | None = None  # (state, reason) of a failed conversion
            if converting:
                try:
                    with STAGE["decode"].time():
                        result = self.decode(data)
                    syntax = result.source_syntax
                except UnsupportedSyntax as exc:
                    problem = (UNSUPPORTED, _one_line(exc))
                except PermanentError as exc:
                    problem = (FAILED, _one_line(exc))
            if result is not None and not any(actions[t.name] == FORWARD for t in takers):
                # Only the converted copy is needed from here: free the original's share.
                data = b""
                holding.set(len(result.data))
            converted: dict[str, Copy] = {}  # by output syntax: each one written once
            for target in takers:
                self._checkpoint()
                try:
                    if actions[target.name] == FORWARD:
                        copy = Copy(data, syntax or "", FORWARDED, passed_through=False)
                    elif problem is not None:
                        delivered.append(Delivery(target.name, *problem))
                        continue
                    else:
                        assert result is not None
                        wanted = target.config.syntax
                        if wanted not in converted:
                            converted[wanted] = _converted(result, wanted)
                        copy = converted[wanted]
                    target.store(iid, copy, verify=self.delete_original)
                except PermanentError as exc:
                    delivered.append(Delivery(target.name, FAILED, _one_line(exc)))
                    continue
                copies.append(copy)
                delivered.append(Delivery(target.name, copy.state))
            passed_through = any(copy.passed_through for copy in copies)
            del result, data, copies, converted
        return self._finish(item, syntax, tuple(delivered), passed_through, started)

    def _route(self, iid: str) -> dict[str, str]:
        """Each target's action for this instance (every one converts when none has rules)."""
        if not self._routed:
            return {target.name: CONVERT for target in self.targets}
        facts = Facts(iid, self.source.read)
        return {target.name: action_for(target.config.rules, facts) for target in self.targets}

    def _finish(
        self,
        item: NewInstance,
        syntax: str | None,
        delivered: tuple[Delivery, ...],
        passed_through: bool,
        started: float,
    ) -> Entry:
        """The instance's overall outcome from its targets'; the original deleted if it may be."""
        iid = item.instance_id
        states = {d.state for d in delivered if d.state != SKIPPED}
        for state in (FAILED, UNSUPPORTED):
            if state in states:
                reasons = [d for d in delivered if d.state == state]
                single = len(self.targets) == 1
                reason = "; ".join(
                    d.error or "" if single else f"{d.target}: {d.error}" for d in reasons
                )
                return self._problem(item, state, syntax, reason, started, delivered)
        state = FORWARDED if states == {FORWARDED} else CONVERTED
        # Every target that takes it holds a verified copy; one passed through in a syntax the
        # bridge cannot decode (forward_unchanged) is not a reason to delete the original.
        deletable = not passed_through
        deleted = False
        if self.delete_original and self.deletes and deletable:
            # Deleting the original also deletes its change row: if the bridge dies right
            # after, nothing would ever bring the instance back to the ledger. Note it first.
            self.record(
                Entry(iid, item.seq, DELETING, syntax, None, _since(started), deliveries=delivered)
            )
            with STAGE["delete"].time():
                self.source.delete(iid)
            deleted = True
        seconds = _since(started)
        log.info(
            "instance %s: %s from %s in %.0f ms%s%s",
            iid,
            state,
            syntax,
            seconds * 1000,
            "" if len(self.targets) == 1 else f" ({_listing(delivered)})",
            ", original deleted" if deleted else "",
            extra=outcome_fields(iid, state, syntax, started),
        )
        return Entry(
            iid,
            item.seq,
            state,
            syntax,
            None,
            seconds,
            deleted,
            deliveries=delivered,
            deletable=deletable,
        )

    def _problem(
        self,
        item: NewInstance,
        state: str,
        syntax: str | None,
        reason: str,
        started: float,
        delivered: tuple[Delivery, ...] = (),
    ) -> Entry:
        iid = item.instance_id
        if not delivered:
            delivered = tuple(Delivery(t.name, state, reason) for t in self.targets)
        log.error(
            "instance %s: kept in the source, %s: %s",
            iid,
            state,
            reason,
            extra=outcome_fields(iid, state, syntax, started),
        )
        return Entry(iid, item.seq, state, syntax, reason, _since(started), deliveries=delivered)

    def _vanished(self, item: NewInstance, started: float) -> Entry:
        iid = item.instance_id
        log.warning(
            "instance %s: deleted from the source before it was converted",
            iid,
            extra=outcome_fields(iid, VANISHED, None, started),
        )
        return Entry(iid, item.seq, VANISHED, error="deleted from the source before transfer")

    def _checkpoint(self) -> None:
        """Abandon the instance here when shutting down; nothing of it is recorded."""
        if self.stop.is_set():
            raise Interrupted("shutting down")


def _converted(result: Transcoded, syntax: str) -> Copy:
    """What a target that converts into `syntax` is sent."""
    if result.forwarded and result.source_syntax != EXPLICIT_VR_LITTLE_ENDIAN:
        # forward_unchanged: a syntax no decoder here reads, passed on as it is.
        return Copy(result.data, result.source_syntax, FORWARDED, passed_through=True)
    # Converted, or already Explicit VR Little Endian (then sent as it came, and counted as
    # converted: the target holds what it must).
    data = result.data if syntax == EXPLICIT_VR_LITTLE_ENDIAN else to_implicit(result.data)
    return Copy(data, syntax, CONVERTED, passed_through=False)


def _listing(delivered: tuple[Delivery, ...]) -> str:
    return ", ".join(f"{d.target} {d.state}" for d in delivered)


def _since(started: float) -> float:
    return time.monotonic() - started


def _one_line(exc: Exception) -> str:
    """The error message without any traceback, every run of whitespace made one space."""
    # Decoders' messages span several lines; the summary and `status` print one instance per
    # line, its reason after the ID, so a multi-line reason would break them. A traceback some
    # library put into the message (pydicom does) is no reason: the DEBUG log has it.
    return readable(str(exc))
