"""The decoding processes: results and errors cross the pipes, a dead worker costs one retry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydicom import uid

from bridge.decoding import pool as decoding
from bridge.decoding import zygote
from bridge.decoding.limits import memory_allowance
from bridge.decoding.pool import DecoderPool
from bridge.dicom.transcode import transcode
from bridge.errors import DecodeError, Interrupted
from bridge.jobs import Transcoded, TranscodeOptions
from bridge.uids import EXPLICIT_VR_LITTLE_ENDIAN
from tests.orthanc import cpu_seconds
from tests.polling import wait_for
from tests.transcode_support import j2k_multiframe

REPO = Path(__file__).resolve().parent.parent
FRAMES = 40  # over a second of decoding: time to kill the worker in the middle


@pytest.fixture(scope="module")
def small() -> bytes:
    return j2k_multiframe(1)


@pytest.fixture(scope="module")
def slow() -> bytes:
    return j2k_multiframe(FRAMES)


@pytest.fixture
def stop() -> threading.Event:
    return threading.Event()


@pytest.fixture
def pool(stop: threading.Event) -> Iterator[DecoderPool]:
    decoders = DecoderPool(2, TranscodeOptions(), stop)
    yield decoders
    decoders.close()


def python(script: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    """Run `script` in a new interpreter in the repository, its output captured as text."""
    done = subprocess.run(
        [sys.executable, "-c", script], input=stdin, cwd=REPO, capture_output=True, timeout=60
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def busy_worker(pool: DecoderPool, before: dict[int, float], dead: Sequence[int] = ()) -> int:
    """Wait until a worker has used 0.2 s more CPU than in `before`: the one decoding."""

    def busy() -> int | None:
        for pid in pool.pids():
            if pid not in dead and cpu_seconds(pid) - before.get(pid, 0.0) > 0.2:
                return pid
        return None

    return wait_for(busy, 30, "a worker to start decoding")


def in_background(pool: DecoderPool, data: bytes) -> tuple[ThreadPoolExecutor, Future[Transcoded]]:
    runner = ThreadPoolExecutor(1)
    return runner, runner.submit(pool.decode, data)


def test_the_workers_return_what_transcode_returns(pool: DecoderPool, small: bytes) -> None:
    expected = transcode(small, TranscodeOptions())
    results = [pool.decode(small) for _ in range(3)]
    for result in results:
        assert bytes(result.data) == bytes(expected.data)
        assert result.source_syntax == uid.JPEG2000Lossless
        assert result.sop_instance_uid == expected.sop_instance_uid
        assert not result.forwarded
    assert EXPLICIT_VR_LITTLE_ENDIAN.encode() in bytes(results[0].data[:400])


def test_a_bad_file_raises_its_error_and_the_worker_stays(pool: DecoderPool, small: bytes) -> None:
    pids = set(pool.pids())
    with pytest.raises(DecodeError):
        pool.decode(b"not a DICOM file" * 10)
    assert set(pool.pids()) == pids
    assert pool.decode(small).source_syntax == uid.JPEG2000Lossless


def test_a_killed_worker_costs_its_instance_one_retry(
    pool: DecoderPool, small: bytes, slow: bytes
) -> None:
    before = {pid: cpu_seconds(pid) for pid in pool.pids()}
    runner, future = in_background(pool, slow)
    victim = busy_worker(pool, before)
    # The other worker keeps serving meanwhile.
    assert pool.decode(small).source_syntax == uid.JPEG2000Lossless
    os.kill(victim, signal.SIGKILL)
    result = future.result(timeout=60)
    runner.shutdown()
    assert len(result.data) > FRAMES * 512 * 512 * 2
    pids = pool.pids()
    assert len(pids) == 2 and victim not in pids


def test_a_worker_killed_twice_on_one_instance_fails_it_and_the_pool_recovers(
    pool: DecoderPool, small: bytes, slow: bytes
) -> None:
    runner, future = in_background(pool, slow)
    killed: list[int] = []
    for _ in range(2):
        before = {pid: cpu_seconds(pid) for pid in pool.pids() if pid not in killed}
        victim = busy_worker(pool, before, dead=killed)
        killed.append(victim)
        os.kill(victim, signal.SIGKILL)
    with pytest.raises(DecodeError, match="died twice"):
        future.result(timeout=60)
    runner.shutdown()
    pids = pool.pids()
    assert len(pids) == 2 and not set(killed) & set(pids)
    assert pool.decode(small).source_syntax == uid.JPEG2000Lossless


def test_stop_interrupts_a_decode_in_progress(
    pool: DecoderPool, stop: threading.Event, slow: bytes
) -> None:
    before = {pid: cpu_seconds(pid) for pid in pool.pids()}
    runner, future = in_background(pool, slow)
    busy_worker(pool, before)
    stop.set()
    started = time.monotonic()
    with pytest.raises(Interrupted):
        future.result(timeout=10)
    assert time.monotonic() - started < 1.0
    runner.shutdown()


def test_an_instance_queued_behind_a_crashing_one_is_not_blamed(
    stop: threading.Event, small: bytes, slow: bytes
) -> None:
    pool = DecoderPool(1, TranscodeOptions(), stop)
    try:
        runner = ThreadPoolExecutor(2)
        doomed = runner.submit(pool.decode, slow)
        busy_worker(pool, {pid: cpu_seconds(pid) for pid in pool.pids()})
        queued = runner.submit(pool.decode, small)  # waits in the same worker's pipe
        killed: list[int] = []
        for _ in range(2):
            before = {pid: cpu_seconds(pid) for pid in pool.pids() if pid not in killed}
            killed.append(busy_worker(pool, before, dead=killed))
            os.kill(killed[-1], signal.SIGKILL)
        with pytest.raises(DecodeError, match="died twice"):
            doomed.result(timeout=60)
        assert queued.result(timeout=60).source_syntax == uid.JPEG2000Lossless
        runner.shutdown()
    finally:
        pool.close()


def test_the_decoding_server_imports_the_transcoder_without_requests() -> None:
    # Hidden only while pydicom is imported (a faster start); importable again afterwards.
    script = (
        "import sys, bridge.decoding.preload\n"
        "assert 'bridge.dicom.transcode' in sys.modules\n"
        "assert 'requests' not in sys.modules, 'pydicom imported requests'\n"
        "import requests\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)


def test_the_main_process_never_loads_pydicom() -> None:
    # Its 0.2 s of imports belong to the decoding server, which runs them while this starts.
    script = (
        "import sys, bridge.cli, bridge.engine.pipeline\n"
        "assert 'pydicom' not in sys.modules and 'numpy' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)


def test_decoders_that_cannot_be_loaded_fail_each_instance_with_the_reason() -> None:
    # A broken installation (here numpy made unimportable before the decoders' parent is
    # forked): each instance fails with the import error, and nothing loops or hangs.
    script = (
        "import sys, threading\n"
        "sys.modules['numpy'] = None\n"
        "from bridge.decoding.pool import DecoderPool\nfrom bridge.jobs import TranscodeOptions\n"
        "from bridge.errors import DecodeError\n"
        "pool = DecoderPool(1, TranscodeOptions(), threading.Event())\n"
        "for _ in range(2):\n"
        "    try:\n"
        "        pool.decode(b'DICM')\n"
        "        raise SystemExit('decoded')\n"
        "    except DecodeError as exc:\n"
        "        assert 'cannot be loaded: ModuleNotFoundError: import of numpy' in str(exc)\n"
        "pool.close()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=60)


def test_workers_that_cannot_be_started_fail_the_instance_without_looping() -> None:
    # The decoders' parent cannot fork (its os.fork fails after the fork that made it).
    script = (
        "import os, sys, threading\n"
        "real_fork, forks = os.fork, []\n"
        "def failing_fork():\n"
        "    forks.append(1)\n"
        "    if len(forks) > 1:\n"
        "        raise BlockingIOError(11, 'Resource temporarily unavailable')\n"
        "    return real_fork()\n"
        "os.fork = failing_fork\n"
        "from bridge.decoding.pool import DecoderPool\nfrom bridge.jobs import TranscodeOptions\n"
        "from bridge.errors import DecodeError\n"
        "pool = DecoderPool(1, TranscodeOptions(), threading.Event())\n"
        "try:\n"
        "    pool.decode(b'DICM')\n"
        "    raise SystemExit('decoded')\n"
        "except DecodeError as exc:\n"
        "    print(exc)\n"
        "pool.close()\n"
    )
    done = python(script)
    assert done.returncode == 0, done.stderr
    assert "died twice" in done.stdout or "in a row" in done.stdout, done.stdout


def test_a_decode_over_its_time_allowance_fails_and_its_process_is_replaced(
    stop: threading.Event, small: bytes, slow: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # 40 frames of JPEG 2000 take over a second; this pool allows 0.8 s per 100 MiB of work,
    # 0.3 s for their 20 MiB decoded and 16 MiB of file.
    pool = DecoderPool(1, TranscodeOptions(decode_timeout=0.8), stop)
    try:
        (stuck,) = pool.pids()
        with pytest.raises(DecodeError, match=r"decoding took longer than 0\.3 s"):
            pool.decode(slow)
        assert "a decoding process was stopped: decoding took longer than 0.3 s" in caplog.text
        pids = pool.pids()
        assert len(pids) == 1 and stuck not in pids
        wait_for(lambda: not os.path.exists(f"/proc/{stuck}/stat"), 10, "the stuck process gone")
        assert pool.decode(small).source_syntax == uid.JPEG2000Lossless
    finally:
        pool.close()


def test_memory_beyond_an_instance_allowance_fails_it_with_the_reason(slow: bytes) -> None:
    # In a child process: the limit is the process's own. 40 frames decode to 20 MiB, more
    # than the 8 MiB this instance is allowed here.
    script = (
        "import numpy, sys\n"
        "from bridge.decoding.limits import address_space_limited\n"
        "from bridge.dicom.transcode import transcode\n"
        "from bridge.errors import DecodeError\n"
        "data = sys.stdin.buffer.read()\n"
        "with address_space_limited(8 * 2**20):\n"
        "    try:\n"
        "        numpy.ones(64 * 2**20, dtype=numpy.uint8)\n"
        "        raise SystemExit('allocated past the limit')\n"
        "    except MemoryError:\n"
        "        pass\n"
        "    try:\n"
        "        transcode(data)\n"
        "        raise SystemExit('decoded past the limit')\n"
        "    except DecodeError as exc:\n"
        "        print(exc)\n"
        "numpy.ones(64 * 2**20, dtype=numpy.uint8)  # the limit is lifted after the instance\n"
    )
    done = python(script, stdin=slow)
    assert done.returncode == 0, done.stderr
    assert "decoding needed more than the " in done.stdout
    assert "MiB its process may use for it" in done.stdout


def test_the_memory_allowance_follows_the_declared_size(slow: bytes) -> None:
    decoded, frame = 40 * 512 * 512 * 2, 512 * 512 * 2
    # The frames being decoded at once: one per thread of bridge.dicom.frames, and the next one.
    at_once = min(40, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1) + 1)
    expected = 256 * 2**20 + 2 * len(slow) + 2 * decoded + 6 * frame * at_once
    assert memory_allowance(slow, 2 * 1024**3) == expected
    # A header that cannot be read: the largest instance allowed.
    assert memory_allowance(b"garbage", 2**20) == 256 * 2**20 + 2 * 7 + 2 * 2**20 + 6 * 2**20


def test_a_decoder_that_crashes_its_process_fails_the_instance_at_once(
    pool: DecoderPool, small: bytes, slow: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # SIGSEGV while a decoder runs, as GDCM does on some damaged frames: the crash would
    # recur, so the instance fails without a second process's death, naming the decoder.
    before = {pid: cpu_seconds(pid) for pid in pool.pids()}
    runner, future = in_background(pool, slow)
    victim = busy_worker(pool, before)
    os.kill(victim, signal.SIGSEGV)
    # A multi-frame JPEG 2000 instance's frames are decoded by threads (bridge.dicom.frames).
    crashed = r"the decoder (pylibjpeg on frame \d+|imagecodecs on frames \d+-\d+) crashed its "
    with pytest.raises(DecodeError, match=crashed):
        future.result(timeout=60)
    runner.shutdown()
    assert "(SIGSEGV)" in caplog.text and "exit code -11" in caplog.text
    pids = pool.pids()
    assert len(pids) == 2 and victim not in pids
    assert pool.decode(small).source_syntax == uid.JPEG2000Lossless


def test_what_decoders_print_stays_out_of_the_output() -> None:
    # pylibjpeg-rle panics on an RLE frame taller than Rows (pydicom's decoder then reads it,
    # as DCMTK and GDCM do) and Rust prints the panic and a backtrace hint on stderr; pydicom
    # warns there too. None of it may reach the bridge's log.
    script = (
        "import io, threading, pydicom\n"
        "from bridge.decoding.pool import DecoderPool\nfrom bridge.jobs import TranscodeOptions\n"
        "from tests.transcode_support import bundled\n"
        "ds = pydicom.dcmread(bundled('MR_small_RLE.dcm'))\n"
        "ds.Rows = 32\n"
        "out = io.BytesIO()\n"
        "ds.save_as(out)\n"
        "pool = DecoderPool(1, TranscodeOptions(), threading.Event())\n"
        "print(len(pool.decode(out.getvalue()).data) > 32 * 64 * 2)\n"
        "pool.close()\n"
    )
    done = python(script)
    assert done.returncode == 0 and done.stdout == "True\n", done.stdout + done.stderr
    assert done.stderr == ""


# --- issue 19: replacing a worker holds up nobody, and happens once --------------------------


def test_other_callers_go_on_while_a_dead_worker_is_killed_and_replaced(
    pool: DecoderPool, small: bytes, slow: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kill waits up to 5 s for the process to end: not with the pool's lock held."""
    released = threading.Event()
    killing = threading.Event()
    real_kill = decoding._Worker.kill

    def slow_kill(worker: decoding._Worker) -> None:
        killing.set()
        released.wait(30)
        real_kill(worker)

    monkeypatch.setattr(decoding._Worker, "kill", slow_kill)
    before = {pid: cpu_seconds(pid) for pid in pool.pids()}
    runner, future = in_background(pool, slow)
    victim = busy_worker(pool, before)
    os.kill(victim, signal.SIGKILL)
    assert killing.wait(30)
    # Meanwhile the pool answers, and the other worker decodes.
    helper = ThreadPoolExecutor(1)
    try:
        answered = helper.submit(pool.alive)
        wait_for(answered.done, 5, "the pool to answer while a worker is being replaced")
        decoded = helper.submit(pool.decode, small)
        wait_for(decoded.done, 30, "another instance to be decoded meanwhile")
        assert decoded.result().source_syntax == uid.JPEG2000Lossless
    finally:
        released.set()
        helper.shutdown()
    assert len(future.result(timeout=60).data) > FRAMES * 512 * 512 * 2
    runner.shutdown()
    assert victim not in pool.pids() and pool.alive() == 2


def test_a_failed_fork_of_a_replacement_is_tried_again_and_the_dead_worker_is_not_kept(
    pool: DecoderPool, slow: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fork = zygote.fork
    failures = [OSError(11, "Resource temporarily unavailable")]

    def fork_failing_once(*args: Any) -> Any:
        if failures:
            raise failures.pop()
        return real_fork(*args)

    monkeypatch.setattr(zygote, "fork", fork_failing_once)
    before = {pid: cpu_seconds(pid) for pid in pool.pids()}
    runner, future = in_background(pool, slow)
    victim = busy_worker(pool, before)
    os.kill(victim, signal.SIGKILL)
    assert len(future.result(timeout=60).data) > FRAMES * 512 * 512 * 2
    runner.shutdown()
    assert not failures, "the fork never failed"
    assert victim not in pool.pids() and pool.alive() == 2
    assert not any(worker.broken for worker in pool._load)


def test_a_worker_killed_twice_closes_its_descriptors_once(
    stop: threading.Event, tmp_path: Path
) -> None:
    pool = DecoderPool(1, TranscodeOptions(), stop)
    try:
        (worker,) = pool._load
        worker.kill()
        # Files opened now take the numbers the worker's pipes and stderr had.
        others = [os.open(tmp_path / f"other{n}", os.O_CREAT | os.O_RDWR) for n in range(16)]
        try:
            worker.kill()
            for fd in others:
                os.fstat(fd)  # still open
        finally:
            for fd in others:
                os.close(fd)
    finally:
        pool.close()
