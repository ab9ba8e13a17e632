"""Transfer syntax UIDs, named once: what the header reader, the codestream checks, the
configuration and the metrics' labels speak of. No pydicom here: the main process reads these.
"""

from __future__ import annotations

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
ENCAPSULATED_UNCOMPRESSED = "1.2.840.10008.1.2.1.98"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_LOSSLESS_RPCL = "1.2.840.10008.1.2.4.202"
HTJ2K = "1.2.840.10008.1.2.4.203"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"

# What a target may receive converted instances in.
OUTPUT_SYNTAXES = {
    EXPLICIT_VR_LITTLE_ENDIAN: "Explicit VR Little Endian",
    IMPLICIT_VR_LITTLE_ENDIAN: "Implicit VR Little Endian",
}

# Every transfer syntax of PS3.6 a metric's label may name; any other UID a file declares is
# counted as "other", so that a hostile file cannot make a series of its own.
KNOWN_SYNTAXES = {
    IMPLICIT_VR_LITTLE_ENDIAN: "Implicit VR Little Endian",
    EXPLICIT_VR_LITTLE_ENDIAN: "Explicit VR Little Endian",
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: "Deflated Explicit VR Little Endian",
    EXPLICIT_VR_BIG_ENDIAN: "Explicit VR Big Endian",
    JPEG_BASELINE: "JPEG Baseline",
    JPEG_EXTENDED: "JPEG Extended",
    JPEG_LOSSLESS: "JPEG Lossless",
    JPEG_LOSSLESS_SV1: "JPEG Lossless SV1",
    JPEG_LS_LOSSLESS: "JPEG-LS Lossless",
    JPEG_LS_NEAR_LOSSLESS: "JPEG-LS Near-Lossless",
    JPEG_2000_LOSSLESS: "JPEG 2000 Lossless",
    JPEG_2000: "JPEG 2000",
    "1.2.840.10008.1.2.4.92": "JPEG 2000 Part 2 Lossless",
    "1.2.840.10008.1.2.4.93": "JPEG 2000 Part 2",
    "1.2.840.10008.1.2.4.94": "JPIP Referenced",
    "1.2.840.10008.1.2.4.95": "JPIP Referenced Deflate",
    "1.2.840.10008.1.2.4.100": "MPEG2 Main Profile",
    "1.2.840.10008.1.2.4.101": "MPEG2 High Profile",
    "1.2.840.10008.1.2.4.102": "MPEG-4 AVC/H.264",
    "1.2.840.10008.1.2.4.103": "MPEG-4 AVC/H.264 BD-compatible",
    "1.2.840.10008.1.2.4.104": "MPEG-4 AVC/H.264 2D video",
    "1.2.840.10008.1.2.4.105": "MPEG-4 AVC/H.264 3D video",
    "1.2.840.10008.1.2.4.106": "MPEG-4 AVC/H.264 Stereo",
    "1.2.840.10008.1.2.4.107": "HEVC/H.265 Main",
    "1.2.840.10008.1.2.4.108": "HEVC/H.265 Main 10",
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
    HTJ2K_LOSSLESS: "HTJ2K Lossless",
    HTJ2K_LOSSLESS_RPCL: "HTJ2K Lossless RPCL",
    HTJ2K: "HTJ2K",
    RLE_LOSSLESS: "RLE Lossless",
}
