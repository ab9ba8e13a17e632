"""The time a decoding process may spend on an instance fits the instance's work.

Before issue 19 every instance got at least `decode_timeout` (120 s): a 6 KB JPEG-LS file on
which GDCM loops for ever held a decoder for two minutes, as long as a 100 MiB one.
"""

from __future__ import annotations

from bridge.config import Config
from bridge.decoding.limits import MIB, time_allowance
from bridge.jobs import TranscodeOptions
from tests import hostile
from tests.transcode_support import j2k_multiframe

LIMIT = 2 * 1024**3


def test_a_small_file_gets_a_few_seconds_not_minutes() -> None:
    small = hostile.jpeg_ls_preset_maxval_3()  # 6 KB, 64 x 64 x 16 bits
    seconds = time_allowance(small, TranscodeOptions().decode_timeout, LIMIT)
    assert 3 <= seconds <= 8, seconds
    # The floor is the allowance of 8 MiB of work, whatever decode_timeout says.
    assert time_allowance(small, 120, LIMIT) == 120 * 8 / 100


def test_the_allowance_grows_with_the_decoded_and_the_file_size() -> None:
    data = j2k_multiframe(40)  # 40 frames of 512 x 512 x 2 bytes: 20 MiB decoded
    work = 40 * 512 * 512 * 2 + len(data)
    assert time_allowance(data, 80, LIMIT) == 80 * work / (100 * MIB)
    huge = b"x" * (300 * MIB)  # no readable header: the file's size alone
    assert time_allowance(huge, 80, LIMIT) == 80 * 3


def test_the_declared_size_counts_up_to_the_configured_limit() -> None:
    data = j2k_multiframe(1)
    assert time_allowance(data, 80, 1) == 80 * 8 / 100  # declared size capped at 1 byte


def test_the_default_is_the_same_everywhere() -> None:
    # bridge.yaml's value is checked against Config by tests/test_config.py.
    assert Config.__dataclass_fields__["decode_timeout"].default == 80
    assert TranscodeOptions().decode_timeout == 80
