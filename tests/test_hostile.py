"""Issue 11: each hostile or odd file costs only itself, through the real decoding processes
and through `catch-up` against real Orthanc servers.

The inputs (tests/hostile.py) are pydicom's files with one field, byte or marker segment
changed: codestreams whose header disagrees with the DICOM header (which made GDCM abort or
segfault its process, and OpenJPEG allocate 2 GB), an RLE panic, deflate bombs, nonsense frame
counts, and the vendor quirks that DCMTK and GDCM accept.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.decoding.pool import DecoderPool
from bridge.errors import DecodeError, TooLarge
from bridge.jobs import TranscodeOptions
from tests import bridgectl, hostile
from tests.orthanc import OrthancServer
from tests.test_resilience import assert_all_converted

MIB = 2**20
# What DCMTK and GDCM decode, and so must the bridge, with the same pixels (checked in
# tests/test_codestream.py for the padding; the offset tables here by their decoded size).
ACCEPTED = {
    "rle_rows_smaller",  # pylibjpeg-rle panics; pydicom's decoder reads it as DCMTK does
    "jpeg_lossless_eoi_pad",
    "quirk_j2k_eoc_pad",
    "quirk_jpeg_ls_eoi_pad",
    "quirk_jpeg_baseline_trailing_bytes",
    "quirk_bot_off_fragments",
    "quirk_bot_zeros",
}
REFUSED = sorted(set(hostile.HOSTILE_FILES) - ACCEPTED)
# Proved through the decoding processes only: Orthanc 1.10 inflates a deflated file when it
# stores it (1.5 and 3 GiB), and refuses to store the RGB JPEG-LS under a one-sample header.
NOT_FOR_ORTHANC = {"deflate_bomb", "deflate_bomb_3g", "jpeg_ls_rgb_as_one_sample"}


@pytest.fixture(scope="module")
def pool() -> Iterator[DecoderPool]:
    decoders = DecoderPool(2, TranscodeOptions(), threading.Event())
    yield decoders
    decoders.close()


@pytest.mark.parametrize("name", REFUSED)
def test_a_hostile_file_is_refused_without_losing_a_decoding_process(
    pool: DecoderPool, name: str
) -> None:
    pids = set(pool.pids())
    with pytest.raises((DecodeError, TooLarge)) as info:
        pool.decode(hostile.HOSTILE_FILES[name]())
    reason = str(info.value)
    assert "\n" not in reason and "SOP Instance UID" in reason, reason
    assert "died" not in reason and "crashed" not in reason, reason
    assert set(pool.pids()) == pids


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_a_quirk_the_independent_decoders_accept_is_converted(pool: DecoderPool, name: str) -> None:
    result = pool.decode(hostile.HOSTILE_FILES[name]())
    assert not result.forwarded and len(result.data) > 0


def test_hostile_files_among_good_ones_cost_only_themselves(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    good = {
        str(source.upload(data)["ID"])
        for name in ("693_J2KI.dcm", "SC_rgb_rle.dcm", "JPGExtended.dcm")
        for data in bridgectl.variants(name, 3)
    }
    bad: dict[str, str] = {}
    quirks: set[str] = set()
    for name, build in hostile.HOSTILE_FILES.items():
        if name in NOT_FOR_ORTHANC:
            continue
        answer = source.upload(build())
        assert answer["Status"] == "Success", (name, answer)
        if name in ACCEPTED:
            quirks.add(str(answer["ID"]))
        else:
            bad[name] = str(answer["ID"])
    config = bridgectl.write_config(tmp_path, source, target, delete_original=True)

    result, peak = bridgectl.run_measured("catch-up", config, source, target)
    print(
        f"catch-up of {len(good | quirks)} good and {len(bad)} hostile: peak {peak / MIB:.0f} MiB"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output  # 1: some instances failed
    assert "Traceback" not in output and "panicked" not in output, output
    assert "decoding process died" not in output, output
    # Files of a few KB: the bridge, the zygote and two workers at rest (shared pages counted
    # in each) and a few MiB of work. Measured 222 MiB; OpenJPEG alone took 2.3 GB before.
    assert peak < 400 * MIB, f"peak RSS {peak / MIB:.0f} MiB"
    for name, iid in bad.items():
        lines = [line for line in result.stdout.splitlines() if iid in line]
        assert len(lines) == 1 and lines[0].strip().startswith(f"failed {iid}: "), (name, lines)
    assert f"{len(good | quirks)} converted" in result.stdout, result.stdout
    assert set(source.instances()) == set(bad.values())
    assert_all_converted(target, good | quirks)


def test_a_jpeg_ls_frame_gdcm_loops_on_is_refused_at_once(pool: DecoderPool) -> None:
    # Issue 19: CharLS refused it, GDCM then looped until the 120 s allowance ran out.
    # Refused by the codestream check, before any decoder: not a time allowance run out.
    with pytest.raises(DecodeError, match=r"declares T1 18, outside 1\.\.3") as info:
        pool.decode(hostile.jpeg_ls_preset_maxval_3())
    assert "longer than" not in str(info.value)
    assert pool.alive() == 2 and pool.restarts == 0


def test_a_jpeg_ls_frame_gdcm_loops_on_is_kept_among_good_ones_in_seconds(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    good = {str(source.upload(data)["ID"]) for data in bridgectl.variants("SC_rgb_rle.dcm", 3)}
    bad = str(source.upload(hostile.jpeg_ls_preset_maxval_3())["ID"])
    config = bridgectl.write_config(tmp_path, source, target, delete_original=True)

    started = time.monotonic()
    result = bridgectl.run("catch-up", config, source, target, timeout=60)
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    # The whole run, the bridge's start-up included: 120 s and a lost process before issue 19.
    print(f"catch-up with the hostile file among good ones: {seconds:.1f} s")
    assert seconds < 10, f"catch-up took {seconds:.1f} s"
    assert "decoding process" not in output and "Traceback" not in output, output
    (line,) = [line for line in result.stdout.splitlines() if bad in line]
    assert line.strip().startswith(f"failed {bad}: "), line
    assert "MAXVAL 3" in line and "T1 18" in line, line
    assert set(source.instances()) == {bad}
    assert_all_converted(target, good)
