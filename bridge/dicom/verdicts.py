"""Whether a decoder refused a frame because its data is invalid, or because it lacks a feature.

The decoder chains (bridge.dicom.codecs) fall back to the next decoder when one fails. That is right
when the first lacks a feature (pydicom's GDCM plugin refuses 12-bit JPEG, which the direct GDCM
call reads), and wrong when the first found the data invalid: the next may be GDCM, which
aborts, segfaults or loops for ever on such frames (a JPEG-LS frame CharLS calls invalid kept
GDCM busy until it was killed), or libjpeg, which decoded every corrupted JPEG-LS scan CharLS
rejected, to wrong pixels that would then replace the original. So a verdict of invalid data
ends the chain: the instance fails with the reason and is kept. Each decoder's verdict is read
from its own words, measured on
corrupted pydicom files (benchmarks/decode_rates.py runs the chains; the corruptions: truncated
scans, flipped bits, overwritten bytes):

- pyjpegls (CharLS): "Invalid JPEG-LS stream" for bad data; "Unsupported JPEG-LS stream" and
  "not supported by the CharLS decoder" for what it lacks.
- pylibjpeg on JPEG and JPEG-LS (libjpeg): its error codes for a stream that ran out of data;
  the others are not verdicts on the data: it gives -1038 (a misplaced marker) on a valid file.
- pylibjpeg on JPEG 2000 (OpenJPEG): "failed to read the header", "failed to decode image";
  GDCM decodes JPEG 2000 with OpenJPEG too, so it would only fail again, or worse.

An error that is none of these (pydicom's own checks, a wrong output size) is no verdict: the
chain goes on as before.
"""

from __future__ import annotations

# Not -1038 ("a misplaced marker segment"): libjpeg gives it on pydicom's own JPEG-lossy.dcm,
# a valid 12-bit file (its scan's Ss/Se), which GDCM then decodes.
_LIBJPEG_INVALID = (
    "-1025",  # the stream ran out of data
    "-1026",  # a code block ran out of data
)
_INVALID: dict[str, tuple[str, ...]] = {
    "pyjpegls": ("pyjpegls: Decoding error: Invalid JPEG-LS stream", "Invalid JPEG-LS stream"),
    "pylibjpeg": (
        *(f"libjpeg error code '{code}'" for code in _LIBJPEG_INVALID),
        "Error decoding the J2K data: failed to read the header",
        "Error decoding the J2K data: failed to decode image",
    ),
}


def invalid_data(decoder: str, exc: BaseException) -> bool:
    """Whether `decoder` raised `exc` because the frame's data is invalid."""
    text = str(exc)
    return any(words in text for words in _INVALID.get(decoder, ()))
