"""The JPEG-LS preset coding parameters (T.87 C.2.4.1.1), checked before any decoder sees them.

An LSE marker segment of id 1 replaces MAXVAL, the gradient thresholds T1, T2, T3 and RESET,
the value at which the context counters are halved. Decoders trust them: GDCM's JPEG-LS decoder
looped for ever on a 6 KB frame whose segment said MAXVAL 3 and RESET 32768 (fuzzer input
34115), while CharLS refuses the same segment. The ranges are those of Table C.1; a parameter of
0 means its default (C.2.4.1.1.1), and the thresholds are compared with the defaults of those
left at 0, as the standard's bounds refer to the values in force.
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.errors import DecodeError

# Table C.3: the thresholds for MAXVAL 255 and NEAR 0, scaled for other values.
_BASIC_T1, _BASIC_T2, _BASIC_T3 = 3, 7, 21


@dataclass(frozen=True)
class Presets:
    """The five values of an LSE id 1 segment, each 0 when its default applies."""

    maxval: int
    t1: int
    t2: int
    t3: int
    reset: int

    @classmethod
    def parse(cls, segment: bytes, pos: int) -> Presets:
        """Read the segment's payload after its length: id (1), then five 16-bit values."""
        if len(segment) != 11:
            raise DecodeError(
                f"the JPEG-LS preset parameters segment at byte {pos} is {len(segment) + 2} "
                "bytes long, not 13"
            )
        values = [int.from_bytes(segment[i : i + 2], "big") for i in range(1, 11, 2)]
        return cls(*values)


def default_thresholds(maxval: int, near: int) -> tuple[int, int, int]:
    """T1, T2, T3 by default for `maxval` and `near` (C.2.4.1.1.1)."""

    def clamp(value: int, low: int) -> int:
        return low if value > maxval or value < low else value

    if maxval >= 128:
        factor = (min(maxval, 4095) + 128) // 256
        t1 = clamp(factor * (_BASIC_T1 - 2) + 2 + 3 * near, near + 1)
        t2 = clamp(factor * (_BASIC_T2 - 3) + 3 + 5 * near, t1)
        t3 = clamp(factor * (_BASIC_T3 - 4) + 4 + 7 * near, t2)
    else:
        factor = 256 // (maxval + 1)
        t1 = clamp(max(2, _BASIC_T1 // factor + 3 * near), near + 1)
        t2 = clamp(max(3, _BASIC_T2 // factor + 5 * near), t1)
        t3 = clamp(max(4, _BASIC_T3 // factor + 7 * near), t2)
    return t1, t2, t3


def check_presets(presets: Presets, precision: int, near: int, pos: int) -> None:
    """Refuse preset parameters outside Table C.1 for a scan of `precision` bits with `near`."""
    # The bounds hold only for precisions 2-16, which the frame header walk has checked.
    maxval = presets.maxval or (1 << precision) - 1

    def refuse(name: str, value: int, low: int, high: int) -> None:
        raise DecodeError(
            f"the JPEG-LS preset parameters segment at byte {pos} declares {name} {value}, "
            f"outside {low}..{high} (precision {precision} bits, MAXVAL {maxval}, NEAR {near})"
        )

    if presets.maxval and not 1 <= presets.maxval <= (1 << precision) - 1:
        refuse("MAXVAL", presets.maxval, 1, (1 << precision) - 1)
    defaults = default_thresholds(maxval, near)
    low = near + 1
    for name, value, default in zip(
        ("T1", "T2", "T3"), (presets.t1, presets.t2, presets.t3), defaults, strict=True
    ):
        if value and not low <= value <= maxval:
            refuse(name, value, low, maxval)
        low = value or default  # the next threshold may not be below this one
    if presets.reset and not 3 <= presets.reset <= max(255, maxval):
        refuse("RESET", presets.reset, 3, max(255, maxval))
