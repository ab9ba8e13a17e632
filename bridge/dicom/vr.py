"""The VRs that Implicit VR leaves open ("OB or OW", "US or SS"...), decided as DCMTK decides them.

The dictionary gives some elements two or three VRs; an Implicit VR file does not say which one
its writer meant, and Explicit VR output must name one. pydicom decides some (and differently
from DCMTK: it looks for PixelRepresentation in every enclosing item) and refuses to write the
others (retired Curve Data, for one). The rules below are DCMTK's (dcmdata's
DcmItem::checkAndUpdateVR and DcmVR::getValidEVR, the same in 3.6.7 and in 2025's sources), so
that the bridge writes what `dcmconv +te` writes; each was checked against it:

- Overlay Data (60xx,3000) and Pixel Data: OW (PS3.5 8.1.2, 8.2).
- Curve Data (50xx,3000): OB (PS3.5-2004 A.1).
- Waveform Data, Waveform Padding Value, Channel Minimum/Maximum Value: OB when the same item's
  WaveformBitsAllocated, read before them, is 8; OW when it is another value; OB without it.
- Twelve "US or SS" elements (PixelPaddingValue, LUTDescriptor...): SS when the same item's
  PixelRepresentation, read before them, is 1; US otherwise.
- Any other "US or SS": US. "OB or OW": OB. "US or OW" and "US or SS or OW" (LUT data): OW.
- A private element pydicom's private dictionaries give an open VR: as DCMTK's private.dic
  says, UN when it does not know it.

Only the VR changes: the value bytes are the same in either VR, little endian.
"""

from __future__ import annotations

import struct

from pydicom.datadict import dictionary_VR, private_dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import AMBIGUOUS_VR

_PIXEL_DATA = 0x7FE00010
_PIXEL_REPRESENTATION = 0x00280103
_WAVEFORM_BITS_ALLOCATED = 0x54001004
# Decided by PixelRepresentation (DCMTK's case 2; PS3.3 C.7.5.1, C.7.6.16, C.11.5).
_BY_PIXEL_REPRESENTATION = frozenset(
    {
        0x00189810,  # ZeroVelocityPixelValue
        0x00280106,  # SmallestImagePixelValue
        0x00280107,  # LargestImagePixelValue
        0x00280108,  # SmallestPixelValueInSeries
        0x00280109,  # LargestPixelValueInSeries
        0x00280120,  # PixelPaddingValue
        0x00280121,  # PixelPaddingRangeLimit
        0x00283002,  # LUTDescriptor
        0x00409211,  # RealWorldValueLastValueMapped
        0x00409216,  # RealWorldValueFirstValueMapped
        0x00603004,  # HistogramFirstBinValue
        0x00603006,  # HistogramLastBinValue
    }
)
# Decided by WaveformBitsAllocated (DCMTK's case 1; PS3.5 8.3).
_BY_WAVEFORM_BITS = frozenset({0x54000110, 0x54000112, 0x5400100A, 0x54001010})
# What DCMTK writes when nothing else decides (getValidEVR of its "xs", "ox" and "lt").
# pydicom's private dictionaries leave two elements open ("US or SS", "OB_OW"). DCMTK's
# private.dic knows the first as SS; it knows nothing of the second, which it writes as UN.
_PRIVATE = {("FDMS 1.0", 0x0027, 0xA3): "SS"}
_DEFAULT = {"US or SS": "US", "OB or OW": "OB", "US or OW": "OW", "US or SS or OW": "OW"}


def resolve(dataset: Dataset) -> None:
    """Give every element of `dataset` (an Implicit VR read, items included) one VR, in place."""
    for tag in sorted(dataset.keys()):
        raw = dataset.get_item(tag)
        if not isinstance(raw, RawDataElement):
            # Read at once (an undefined-length sequence): only its items may hold raw elements.
            if raw.VR == "SQ":
                for item in raw.value:
                    resolve(item)
            continue
        vr = raw.VR or _dictionary_vr(int(tag))
        if vr is None and tag.is_private:
            private = _private_vr(dataset, int(tag))
            if private is not None:
                dataset[tag] = raw._replace(VR=private)
            continue
        if vr == "SQ":
            for item in dataset[tag].value:
                resolve(item)
        elif vr in AMBIGUOUS_VR:
            # Still raw: pydicom converts the value by this VR when it writes it.
            dataset[tag] = raw._replace(VR=_decide(dataset, int(tag), vr))


def _dictionary_vr(tag: int) -> str | None:
    try:
        return str(dictionary_VR(tag))
    except KeyError:  # private or unknown: pydicom reads it as UN, nothing to decide
        return None


def _private_vr(dataset: Dataset, tag: int) -> str | None:
    """The VR DCMTK gives a private element that pydicom's private dictionaries leave open."""
    creator_tag = tag & 0xFFFF0000 | (tag >> 8 & 0xFF)
    if tag & 0xFFFF < 0x1000 or creator_tag not in dataset:
        return None
    creator = dataset.get_item(creator_tag).value
    if isinstance(creator, bytes):
        creator = creator.decode("latin-1")
    creator = str(creator).strip(" \0")
    try:
        vr = str(private_dictionary_VR(tag, creator))
    except KeyError:
        return None
    if len(vr) == 2:
        return None  # not open: pydicom reads it by that VR
    return _PRIVATE.get((creator, tag >> 16, tag & 0xFF), "UN")


def _decide(item: Dataset, tag: int, vr: str) -> str:
    if tag == _PIXEL_DATA or (tag >> 16 & 0xFF01 == 0x6000 and tag & 0xFFFF == 0x3000):
        return "OW"
    # DCMTK looks only at the elements of the same item read so far, that is of lower tags.
    if tag in _BY_PIXEL_REPRESENTATION and tag > _PIXEL_REPRESENTATION:
        return "SS" if _first_us(item, _PIXEL_REPRESENTATION) == 1 else "US"
    if tag in _BY_WAVEFORM_BITS and tag > _WAVEFORM_BITS_ALLOCATED:
        bits = _first_us(item, _WAVEFORM_BITS_ALLOCATED)
        return "OB" if bits is None or bits == 8 else "OW"
    return _DEFAULT.get(vr, "OB")


def _first_us(item: Dataset, tag: int) -> int | None:
    """The first value of an unsigned short element of `item`; None if absent or empty."""
    if tag not in item:
        return None
    value = item.get_item(tag).value
    if isinstance(value, bytes):  # still raw: Implicit VR is little endian
        return int(struct.unpack_from("<H", value)[0]) if len(value) >= 2 else None
    if isinstance(value, int):
        return value
    return int(value[0]) if value else None
