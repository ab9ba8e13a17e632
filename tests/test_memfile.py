"""Big instances in memory files (bridge.memfile): decoded as the pipe path decodes them, each
byte once, with the decoding processes' limits and crash handling as before."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from pydicom import uid

from bridge import memfile
from bridge.config import ServerConfig
from bridge.decoding.limits import FRAME_COPIES
from bridge.decoding.pool import DecoderPool
from bridge.dicom.frames import threads as frames_threads
from bridge.dicom.transcode import transcode
from bridge.errors import DecodeError
from bridge.jobs import TranscodeOptions
from bridge.peers.orthanc import OrthancClient
from bridge.peers.retry import no_retry
from bridge.uids import EXPLICIT_VR_LITTLE_ENDIAN
from tests import bridgectl, tree_memory
from tests.orthanc import OrthancServer, cpu_seconds
from tests.polling import wait_for
from tests.transcode_support import bundled, j2k_multiframe, read

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
FRAMES = 40  # over a second of decoding: time to kill the worker in the middle


def in_memory_file(data: bytes) -> memoryview:
    """`data` as the bridge holds a big download: a view of a memory file."""
    view = memfile.receive(io.BytesIO(data), len(data))
    assert memfile.descriptor(view) is not None
    return view


def memory_files(pid: int) -> list[str]:
    """The bridge's memory files a process holds open or mapped."""
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile (the listing's own descriptor)
            held.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    held += [line.split(None, 5)[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()]
    kinds = ("download", "output", "empty")  # not the decoders' stderr
    return [name for name in held if any(f"memfd:orthanc-bridge-{kind}" in name for kind in kinds)]


@pytest.fixture(scope="module")
def slow() -> bytes:
    return j2k_multiframe(FRAMES)


@pytest.fixture
def pool() -> Iterator[DecoderPool]:
    decoders = DecoderPool(2, TranscodeOptions(), threading.Event())
    yield decoders
    decoders.close()


@pytest.mark.parametrize(
    "name",
    [
        "threads",  # a multi-frame JPEG 2000 instance, frames decoded in place by threads
        "MR_small_jp2klossless.dcm",  # one frame, by the decoder chain
        "SC_rgb_rle.dcm",
        "MR_small_implicit.dcm",  # native: copied
        "MR_small_bigendian.dcm",  # native, byte-swapped in place
    ],
)
def test_a_memory_file_is_decoded_into_one_as_the_pipe_path_decodes(
    pool: DecoderPool, name: str
) -> None:
    data = j2k_multiframe(6, 256) if name == "threads" else bundled(name).read_bytes()
    expected = pool.decode(data)
    result = pool.decode(in_memory_file(data))
    assert memfile.descriptor(result.data) is not None  # the decoding process's output file
    assert bytes(result.data) == bytes(expected.data) == bytes(transcode(data).data)
    assert (result.source_syntax, result.sop_instance_uid, result.forwarded) == (
        expected.source_syntax,
        expected.sop_instance_uid,
        False,
    )


def test_a_file_passed_on_unchanged_is_the_memory_file_itself(pool: DecoderPool) -> None:
    view = in_memory_file(bundled("CT_small.dcm").read_bytes())  # Explicit VR Little Endian
    result = pool.decode(view)
    assert result.forwarded and result.data is view


def test_a_bad_or_empty_file_raises_its_error_and_the_worker_stays(pool: DecoderPool) -> None:
    pids = set(pool.pids())
    with pytest.raises(DecodeError, match="not a DICOM Part-10 file"):
        pool.decode(in_memory_file(b"not a DICOM file" * 10))
    # An empty file would be an empty message on the pipe, which announces a memory file: it
    # crosses as an empty memory file.
    with pytest.raises(DecodeError, match="not a DICOM Part-10 file"):
        pool.decode(b"")
    assert set(pool.pids()) == pids
    small = in_memory_file(j2k_multiframe(1))
    assert pool.decode(small).source_syntax == uid.JPEG2000Lossless


def test_nothing_of_a_memory_file_is_left_in_either_process(pool: DecoderPool) -> None:
    gc.collect()  # what earlier tests' exceptions (pytest.raises keeps them in cycles) held
    data = j2k_multiframe(6, 256)
    for _ in range(3):
        result = pool.decode(in_memory_file(data))
        assert memory_files(os.getpid())  # the result's mapping, while it is held
        del result
    # Emptied and closed by the bridge's own thread (bridge.memfile), at once.
    wait_for(lambda: memory_files(os.getpid()) == [], 10, "this process's memory files closed")
    for pid in pool.pids():
        assert memory_files(pid) == [], pid


def test_a_worker_killed_on_a_memory_file_costs_one_retry(pool: DecoderPool, slow: bytes) -> None:
    view = in_memory_file(slow)
    before = {pid: cpu_seconds(pid) for pid in pool.pids()}
    with ThreadPoolExecutor(1) as runner:
        future = runner.submit(pool.decode, view)
        victim = wait_for(
            lambda: next((p for p in pool.pids() if cpu_seconds(p) - before[p] > 0.2), None),
            30,
            "a worker to start decoding",
        )
        os.kill(victim, signal.SIGKILL)
        assert bytes(future.result(timeout=60).data) == bytes(transcode(slow).data)
    assert victim not in pool.pids() and pool.alive() == 2


def test_a_memory_file_s_output_beyond_the_allowance_fails_with_the_reason(slow: bytes) -> None:
    # As tests/test_decoding.py checks it for the pipe: the output's mapping counts in the
    # address space. 40 frames decode to 20 MiB, more than the 8 MiB allowed here.
    script = (
        "import functools, os, sys\n"
        "from bridge import memfile\n"
        "from bridge.decoding.limits import address_space_limited\n"
        "from bridge.dicom.transcode import transcode\n"
        "from bridge.errors import DecodeError\n"
        "data = sys.stdin.buffer.read()\n"
        "view = memfile.receive(__import__('io').BytesIO(data), len(data))\n"
        "into = memfile.create('output')\n"
        "with address_space_limited(8 * 2**20):\n"
        "    try:\n"
        "        transcode(view, output=functools.partial(memfile.output, into))\n"
        "        raise SystemExit('decoded past the limit')\n"
        "    except DecodeError as exc:\n"
        "        print(exc)\n"
        "print(len(transcode(view, output=functools.partial(memfile.output, into)).data))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], input=slow, cwd=REPO, capture_output=True, timeout=60
    )
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert "decoding needed more than the " in out and "MiB its process may use for it" in out
    assert int(out.splitlines()[-1]) > FRAMES * 512 * 512 * 2  # the limit is lifted after


def test_a_short_body_is_an_error_of_the_connection() -> None:
    with pytest.raises(ConnectionError, match="ended after 3 of 10 bytes"):
        memfile.receive(io.BytesIO(b"abc"), 10)


# --- against real Orthanc servers -------------------------------------------------------------


def orthanc_client(server: OrthancServer) -> OrthancClient:
    user, password = server.auth or (None, None)
    return OrthancClient(ServerConfig(server.url, user, password), server.name, no_retry())


def big_instance(frames: int, size: int) -> bytes:
    """A JPEG 2000 instance of `frames` frames of size x size noise, over memfile.BIG."""
    data = j2k_multiframe(frames, size)
    assert len(data) >= memfile.BIG
    return data


def test_a_big_download_lands_in_a_memory_file_and_uploads_from_it(
    source: OrthancServer, target: OrthancServer
) -> None:
    data = big_instance(30, 512)
    iid = str(source.upload(data)["ID"])
    client = orthanc_client(source)
    downloaded = client.download(iid)
    assert memfile.descriptor(downloaded) is not None
    assert bytes(downloaded) == data
    small = bundled("CT_small.dcm").read_bytes()
    assert isinstance(client.download(str(source.upload(small)["ID"])), bytes)  # a pipe's
    assert orthanc_client(target).upload(downloaded).status == "Success"
    assert target.file(iid) == data


def test_a_big_instance_is_converted_pixel_equal_with_each_byte_once(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    """The catch-up of a big instance costs its file and its decoded copy once each.

    Peaks of the bridge's whole process tree (a memory cgroup: every page once, memory files
    included), minus the same catch-up's of a small instance: before memory files, the file
    and the decoded copy were each held in the bridge and in the decoding process.
    """
    frames, size = 20, 1024
    data = big_instance(frames, size)
    decoded = frames * size * size * 2
    peaks = []
    for work, instance in (("small", j2k_multiframe(1)), ("big", data)):
        iid = str(source.upload(instance)["ID"])
        folder = tmp_path / work
        folder.mkdir()
        config = bridgectl.write_config(folder, source, target, http_listen="")
        measured = tree_memory.run_measured("catch-up", config, source, target)
        assert measured.done.returncode == 0, measured.done.stdout + measured.done.stderr
        if measured.tree is None:
            pytest.skip("no memory cgroup can be made here (needs root and cgroups)")
        peaks.append(measured.tree)
        source.delete(iid)
    converted = read(target.file(iid))
    assert converted.file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN
    assert np.array_equal(converted.pixel_array, read(data).pixel_array)
    # Each byte once, and the frames being decoded: what bridge.limits allows them (one frame
    # per thread, and the next one).
    in_flight = FRAME_COPIES * size * size * 2 * (frames_threads() + 1)
    grown = peaks[1] - peaks[0]
    print(f"small {peaks[0] / MIB:.0f} MiB, big {peaks[1] / MIB:.0f} MiB: {grown / MIB:.0f} MiB")
    assert grown < len(data) + decoded + in_flight, f"{grown / MIB:.0f} MiB"
