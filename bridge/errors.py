"""One error tree: transient errors are retried, permanent ones are recorded and skipped.

Every class takes a single message string so that instances survive pickling across the
decoding worker processes unchanged.
"""

import re


class BridgeError(Exception):
    """Root of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    """Raised when the configuration file is missing, malformed, or has an unknown or bad key."""


class StateError(BridgeError):
    """Raised when the state directory cannot be opened or written."""


class AccessDenied(BridgeError):
    """Raised when a server refuses the configured credentials (401/403): fatal, fix the config."""


class FeedResetError(BridgeError):
    """Raised when the source's change log ends below the saved cursor (database reset)."""


class TransientError(BridgeError):
    """Raised for failures that may pass by themselves; the operation is retried."""


class ServerUnavailable(TransientError):
    """Raised when an Orthanc server cannot be reached, times out, or answers 5xx."""


class PermanentError(BridgeError):
    """Raised for failures that retrying cannot fix; the instance is recorded as failed."""


class Rejected(PermanentError):
    """Raised when an Orthanc server refuses a request with a 4xx answer."""


class NotFound(Rejected):
    """Raised when an Orthanc server answers 404 (e.g. the instance was deleted meanwhile)."""


class StoreFailed(Rejected):
    """Raised when a target answers that it did not store an instance, with the code and its
    meaning: a STOW-RS Failure Reason or an answer that does not list it, a C-STORE failure
    status, or no presentation context the DICOM node accepts for it."""


class DecodeError(PermanentError):
    """Raised when an instance cannot be parsed or its pixel data cannot be decoded."""


class UnsupportedSyntax(PermanentError):
    """Raised when an instance's transfer syntax cannot become native pixels (video, JPIP...)."""


class TooLarge(PermanentError):
    """Raised when an instance's declared decoded size exceeds the configured limit."""


class VerificationFailed(PermanentError):
    """Raised when the target does not hold the converted instance after upload."""


class DicomUnavailable(ServerUnavailable):
    """Raised when a DICOM node cannot be reached, does not answer in time, aborts an
    association, rejects one for now, or is out of resources (C-STORE status A7xx)."""


class AssociationRejected(AccessDenied):
    """Raised when a DICOM node rejects the association permanently (e.g. an AE title it does
    not know): fatal, as refused credentials are; fix the configuration."""


class NotCommitted(TransientError):
    """Raised when a DICOM node's storage commitment report does not come by its deadline:
    the instance is retried, never deleted."""


class Interrupted(BridgeError):
    """Raised inside in-flight work when shutdown abandons it; it is redone on restart."""


# The BaseExceptions that end a process on purpose. Every other one is an error of the input:
# pyo3's PanicException (pylibjpeg-rle on a bad frame) derives from BaseException, not Exception.
PROCESS_EXITS = (KeyboardInterrupt, SystemExit, GeneratorExit)


def one_line(exc: BaseException) -> str:
    """`exc` as one line for a reason, a log line or `status`: its type and message, no traceback.

    Some libraries put a whole traceback into their messages (pydicom's `tag_in_exception`
    appends `traceback.format_exc()`): that part is dropped. The lines of the message before it
    are joined (pydicom gives each decoder's own words on a line of their own).
    """
    text = readable(str(exc))
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


# Longest reason kept: a few lines of `status`. Longer ones quoted a whole value of the file.
REASON_CHARS = 500
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]")


def readable(text: str, limit: int = REASON_CHARS) -> str:
    """`text` fit for a reason: no traceback, one line, control bytes shown as escapes (a value
    of a hostile file quoted in a message would put NULs into the ledger and the page), and cut
    at `limit` characters."""
    text = " ".join(without_traceback(text).split())
    text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters in all)"
    return text


def without_traceback(text: str) -> str:
    """`text` up to a traceback that a library wrote into it, if any."""
    cut = text.find("Traceback (most recent call last)")
    return text if cut < 0 else text[:cut]
