"""What crosses the pipes to a decoding process and back: the job's options and its result.

Neither side owns these: bridge.dicom.transcode does the work they describe, bridge.decoding
carries them between processes, and the engines (here and on Dask workers) read the results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# A worker notes each decoder call in its stderr before making it (see bridge.dicom.codecs), so
# that a crash can be pinned on the decoder and frame that caused it.
DECODER_STEP = "orthanc-bridge decoding step:"


# Where a decoding process writes an output of the given length: a writable buffer of it
# (a memory file's view, bridge.memfile), instead of a new bytearray.
Output = Callable[[int], memoryview]


@dataclass(frozen=True)
class TranscodeOptions:
    """Limits and pass-through rules for one transcoding call."""

    max_decoded_bytes: int = 2 * 1024**3  # refuse bigger instances before allocating
    forward_unchanged: frozenset[str] = frozenset()  # undecodable syntaxes to pass through as-is
    decode_timeout: float = (
        80.0  # seconds per 100 MiB of work (bridge.decoding.limits.time_allowance)
    )


@dataclass(frozen=True)
class Transcoded:
    """The result of transcoding one instance."""

    data: bytes | bytearray | memoryview  # a complete DICOM Part-10 file (or a memory file's)
    source_syntax: str  # transfer syntax UID of the input
    sop_instance_uid: str
    forwarded: bool  # True when `data` is the input unchanged (already EVRLE, or forward_unchanged)
