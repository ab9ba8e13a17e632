"""Codestream inspection: was an encoded frame compressed lossily, and by which method."""

from __future__ import annotations

from bridge import uids

# JPEG Baseline/Extended are DCT-based: lossy whatever the quality setting.
_ALWAYS_LOSSY: dict[str, str] = {
    uids.JPEG_BASELINE: "ISO_10918_1",
    uids.JPEG_EXTENDED: "ISO_10918_1",
}
_JPEG_LS = {uids.JPEG_LS_LOSSLESS, uids.JPEG_LS_NEAR_LOSSLESS}
_J2K_METHOD: dict[str, str] = {
    uids.JPEG_2000_LOSSLESS: "ISO_15444_1",
    uids.JPEG_2000: "ISO_15444_1",
    uids.HTJ2K_LOSSLESS: "ISO_15444_15",
    uids.HTJ2K_LOSSLESS_RPCL: "ISO_15444_15",
    uids.HTJ2K: "ISO_15444_15",
}

_SOS = b"\xff\xda"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_J2K_COD = 0xFF52
_J2K_COC = 0xFF53
_J2K_SOT = 0xFF90


def lossy_method(transfer_syntax: str, frame: bytes | memoryview) -> str | None:
    """Return the DICOM Lossy Image Compression Method of `frame`, or None when it is lossless."""
    if transfer_syntax in _ALWAYS_LOSSY:
        return _ALWAYS_LOSSY[transfer_syntax]
    if transfer_syntax in _JPEG_LS:
        return "ISO_14495_1" if jpeg_ls_near(bytes(frame)) > 0 else None
    if transfer_syntax in _J2K_METHOD:
        return _J2K_METHOD[transfer_syntax] if j2k_irreversible(bytes(frame)) else None
    return None


def jpeg_ls_near(frame: bytes) -> int:
    """Return the largest NEAR parameter over the JPEG-LS scans of `frame` (0: lossless)."""
    # JPEG-LS stuffs a zero bit after every 0xFF in scan data, so 0xFF 0xDA can only be a real
    # SOS marker: a plain byte search finds every scan header (one per component when ILV=0).
    near = 0
    pos = frame.find(_SOS)
    while pos >= 0:
        # SOS: marker(2) Ls(2) Ns(1) Ns*(Ci, Tmi) NEAR(1) ILV(1) Al/Ah(1)
        if pos + 5 > len(frame):
            break
        components = frame[pos + 4]
        at = pos + 5 + 2 * components
        if at < len(frame):
            near = max(near, frame[at])
        pos = frame.find(_SOS, pos + 2)
    return near


def j2k_irreversible(frame: bytes) -> bool:
    """Return True when the JPEG 2000 main header of `frame` selects the 9-7 wavelet."""
    # A frame may be a raw codestream or a JP2 file: the codestream starts at SOC followed by SIZ.
    start = frame.find(_J2K_SOC_SIZ)
    if start < 0:
        return False
    pos = start + 2
    components = 0
    while pos + 4 <= len(frame):
        marker = int.from_bytes(frame[pos : pos + 2], "big")
        length = int.from_bytes(frame[pos + 2 : pos + 4], "big")
        seg = frame[pos + 4 : pos + 2 + length]
        if marker == 0xFF51 and len(seg) >= 36:
            # SIZ: Rsiz(2) Xsiz..YTOsiz(8*4) Csiz(2)
            components = int.from_bytes(seg[34:36], "big")
        elif marker == _J2K_COD and len(seg) >= 10:
            # COD: Scod(1) SGcod(4) SPcod: levels, cb w, cb h, cb style, transform (0 = 9-7)
            if seg[9] == 0:
                return True
        elif marker == _J2K_COC:
            # COC: Ccoc is 2 bytes when there are 257 or more components, then Scoc(1), SPcoc.
            at = (2 if components >= 257 else 1) + 1 + 4
            if len(seg) > at and seg[at] == 0:
                return True
        elif marker == _J2K_SOT or length < 2:
            break
        pos += 2 + length
    return False
