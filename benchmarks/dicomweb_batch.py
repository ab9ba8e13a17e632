"""STOW-RS throughput into Orthanc's DICOMweb plugin by batch size, to choose Batcher's default.

Run as `python benchmarks/dicomweb_batch.py [--count N] [--threads T] [--sizes 1,4,8,16,32]
[--posts 1,2] [--repeat R] [--json out.json]`; `ORTHANC_BINARY=scripts/orthanc-next` runs it
against Orthanc 1.12 (plugin 1.20) instead of Debian 12's 1.10 (plugin 1.7).

The corpus: N CT-like 512x512 16-bit slices in Explicit VR Little Endian (0.5 MiB each, what the
bridge uploads after decoding), in memory. T transfer threads each take the next instance and
call `Batcher.store` on it, as the bridge's transfer threads will; a variant is one batch size
(`batch_size`, with `batch_mb` out of the way) and one number of concurrent POSTs. For
reference, `rest` uploads the same instances with `OrthancClient.upload` (POST /instances, one
instance per request, T threads): the Orthanc target's path. Every variant writes into a fresh,
empty Orthanc on loopback, checked to hold all N afterwards. Shown: instances/s and MiB/s (the
best of R rounds, variants interleaved within each round), the median of the rounds, and the
CPU seconds per 100 instances of this process (the bridge's side) and of Orthanc.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from benchmarks.throughput import CT_IMAGE_STORAGE, SIZE, ct_slice  # noqa: E402
from bridge.config import ServerConfig  # noqa: E402
from bridge.peers.batcher import Batcher  # noqa: E402
from bridge.peers.dicomweb import DicomWebClient  # noqa: E402
from bridge.peers.orthanc import OrthancClient  # noqa: E402
from bridge.peers.retry import RetryPolicy  # noqa: E402
from tests.orthanc import OrthancServer, cpu_seconds, orthanc_version  # noqa: E402

MIB = 2**20


def ct_instance(index: int, study: str, series: str) -> bytes:
    """One CT-like slice as an Explicit VR Little Endian file (0.5 MiB of pixels)."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.UID(CT_IMAGE_STORAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.Modality = "BENCH", "Stow^Benchmark", "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, index + 1
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    ds.PixelData = ct_slice(index).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass
class Run:
    """One variant's run."""

    variant: str
    seconds: float
    client_cpu: float
    orthanc_cpu: float
    requests: int


def run_variant(
    name: str,
    files: list[bytes],
    workdir: Path,
    threads: int,
    store_with: Callable[[OrthancServer], tuple[Callable[[bytes], object], Callable[[], int]]],
) -> Run:
    """Start a fresh Orthanc, store every file from `threads` threads with the function
    `store_with` makes for it, and time it."""
    server = OrthancServer("archive", workdir / name.replace(" ", "-"), dicomweb=True)
    server.start()
    try:
        store, requests = store_with(server)
        work: Iterator[bytes] = iter(files)
        lock = threading.Lock()
        failures: list[BaseException] = []

        def transfer() -> None:
            while True:
                with lock:
                    data = next(work, None)
                if data is None:
                    return
                try:
                    store(data)
                except BaseException as exc:
                    failures.append(exc)
                    return

        pool = [threading.Thread(target=transfer) for _ in range(threads)]
        assert server.pid is not None
        orthanc_before, client_before = cpu_seconds(server.pid), time.process_time()
        started = time.perf_counter()
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        seconds = time.perf_counter() - started
        client_cpu = time.process_time() - client_before
        orthanc_cpu = cpu_seconds(server.pid) - orthanc_before
        if failures:
            raise RuntimeError(f"{name}: {failures[0]}")
        held = server.get_json("/statistics")["CountInstances"]
        if held != len(files):
            raise RuntimeError(f"{name}: Orthanc holds {held} of {len(files)} instances")
        return Run(name, seconds, client_cpu, orthanc_cpu, requests())
    finally:
        server.kill()


def rest(
    threads: int,
) -> Callable[[OrthancServer], tuple[Callable[[bytes], object], Callable[[], int]]]:
    """POST /instances with OrthancClient, one instance per request."""

    def make(server: OrthancServer) -> tuple[Callable[[bytes], object], Callable[[], int]]:
        client = OrthancClient(ServerConfig(server.url, timeout=60), "target", _retry())
        client.keep_connections(threads)
        calls = []

        def upload(data: bytes) -> object:
            calls.append(1)
            return client.upload(data)

        return upload, lambda: len(calls)

    return make


def stow(
    threads: int, batch_size: int, posts: int
) -> Callable[[OrthancServer], tuple[Callable[[bytes], object], Callable[[], int]]]:
    """STOW-RS through a Batcher of `batch_size` instances and `posts` concurrent requests."""

    def make(server: OrthancServer) -> tuple[Callable[[bytes], object], Callable[[], int]]:
        client = DicomWebClient(ServerConfig(server.dicomweb_url, timeout=60), "archive", _retry())
        client.keep_connections(threads)
        calls = []
        store_batch = client.store_batch

        def counted(instances: list[bytes]) -> object:
            calls.append(len(instances))
            return store_batch(instances)

        client.store_batch = counted  # type: ignore[assignment,method-assign]
        batcher = Batcher(client, batch_size=batch_size, batch_mb=1024, posts=posts)
        return batcher.store, lambda: len(calls)

    return make


def _retry() -> RetryPolicy:
    return RetryPolicy(threading.Event(), max_wait=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--sizes", default="1,4,8,16,32")
    parser.add_argument("--posts", default="1,2")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    study, series = generate_uid(), generate_uid()
    files = [ct_instance(index, study, series) for index in range(args.count)]
    megabytes = sum(map(len, files)) / MIB
    version = ".".join(map(str, orthanc_version()))
    print(
        f"Orthanc {version}: {args.count} instances of {megabytes / args.count:.2f} MiB, "
        f"{args.threads} transfer threads, {args.repeat} rounds"
    )
    variants = {"rest (POST /instances)": rest(args.threads)}
    for posts in map(int, args.posts.split(",")):
        for size in map(int, args.sizes.split(",")):
            variants[f"stow batch {size:>2} posts {posts}"] = stow(args.threads, size, posts)
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="dicomweb-bench-") as tmp:
        for round_ in range(args.repeat):
            for name, make in variants.items():
                run = run_variant(name, files, Path(tmp) / str(round_), args.threads, make)
                runs[name].append(run)
                print(f"  round {round_ + 1}: {name:<24} {args.count / run.seconds:7.1f}/s")
    print(
        f"\n{'variant':<24} {'best/s':>8} {'MiB/s':>7} {'median/s':>9} {'requests':>9}"
        f" {'client cpu':>11} {'orthanc cpu':>12}   (cpu: seconds per 100 instances)"
    )
    for name, found in runs.items():
        best = min(found, key=lambda run: run.seconds)
        median = statistics.median(args.count / run.seconds for run in found)
        per100 = 100 / args.count
        print(
            f"{name:<24} {args.count / best.seconds:8.1f} {megabytes / best.seconds:7.1f}"
            f" {median:9.1f} {best.requests:9d} {best.client_cpu * per100:11.2f}"
            f" {best.orthanc_cpu * per100:12.2f}"
        )
    if args.json:
        report = {"orthanc": version, "count": args.count, "threads": args.threads}
        report["runs"] = {name: [asdict(run) for run in found] for name, found in runs.items()}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
