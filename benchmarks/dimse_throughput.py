"""C-STORE throughput of bridge.peers.dimse against DCMTK's storescu, to storescp and to Orthanc.

    python benchmarks/dimse_throughput.py [--count 300] [--threads 8] [--associations A]
                                          [--rounds 3] [--nagle]

The corpus: `count` CT-like 512x512 16-bit slices (benchmarks/throughput.ct_slice) in Explicit
VR Little Endian, 0.5 MiB each, written once to a temporary directory. Each round measures, on
each peer:

  bridge       one DicomNode used by `threads` threads (`associations` of them, by default as
               many as threads), verify: status,
               sending the files' bytes from memory; its wall time includes opening the
               associations, and its CPU is this process's
  storescu     DCMTK's storescu sending every file on one association, one after the other
  storescu xN  `threads` storescu processes at once, each sending its share of the files

for the peers `storescp --fork` (one process per association, writing each file to disk) and a
fresh Orthanc 1.10 (its DICOM port, "DicomThreadsCount" = threads). On Orthanc it also measures
`bridge (commitment)`: the same with verify: commitment, each instance committed on its own.
Every peer gets a fresh output directory or server, and every instance is counted there after
each run.

DCMTK leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its environment; then each of its
exchanges waits for the other side's delayed ACK (about 45 ms; bridge.peers.associations explains
how the bridge avoids that). The peers and storescu run with TCP_NODELAY=1, so that the baseline is
DCMTK at its best; --nagle runs them all with Debian's defaults instead.

Ratios are bridge / baseline within each round; the table shows each variant's median rate and
the median ratio.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from benchmarks.throughput import CT_IMAGE_STORAGE, SIZE, ct_slice  # noqa: E402
from bridge.config import DEFAULT_CALLING_AE_TITLE  # noqa: E402
from bridge.peers.dimse import DicomNode  # noqa: E402
from tests.orthanc import OrthancServer, StoreSCP, discard, free_ports  # noqa: E402

STORESCU = "/usr/bin/storescu"  # DCMTK's: pynetdicom installs one of its own in .venv/bin
MB = 1e6


def instance(index: int, study: str, series: str) -> bytes:
    """One CT slice as an Explicit VR Little Endian Part-10 file."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = UID(generate_uid())
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.PatientID, ds.PatientName = "BENCH", "DIMSE^Benchmark"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.InstanceNumber = "CT", index + 1
    ds.ImagePositionPatient = [-250.0, -250.0, float(-index)]
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = ct_slice(index).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@dataclass
class Run:
    """One measurement."""

    seconds: float
    cpu: float  # of the sender: this process (bridge) or the storescu processes
    count: int
    size: int  # bytes sent

    @property
    def rate(self) -> float:
        return self.count / self.seconds


@dataclass
class Peer:
    """Where the instances go: started fresh for each measurement, then checked and discarded."""

    name: str
    start: Callable[[], tuple[int, str, Callable[[], int], Callable[[], None]]]


def storescp_peer(work: Path, env: dict[str, str]) -> Peer:
    """storescp --fork, writing each file to a fresh directory."""
    runs = iter(range(10**6))

    def start() -> tuple[int, str, Callable[[], int], Callable[[], None]]:
        scp = StoreSCP(work / f"storescp-{next(runs)}", options=["--fork"], env=env)
        scp.start()
        return scp.port, scp.aet, lambda: len(scp.received()), lambda: discard(scp)

    return Peer("storescp", start)


def orthanc_peer(work: Path, env: dict[str, str], threads: int, listen_port: int) -> Peer:
    """A fresh, empty Orthanc that knows the bridge's commitment listener."""
    runs = iter(range(10**6))

    def start() -> tuple[int, str, Callable[[], int], Callable[[], None]]:
        server = OrthancServer(
            "peer",
            work / f"orthanc-{next(runs)}",
            modalities={"bridge": [DEFAULT_CALLING_AE_TITLE, "127.0.0.1", listen_port]},
            extra_config={"DicomThreadsCount": threads},
            env=env,
        )
        server.start()
        return (
            server.dicom_port,
            server.aet,
            lambda: len(server.instances()),
            lambda: discard(server),
        )

    return Peer("orthanc", start)


def bridge(
    files: Sequence[bytes], port: int, aet: str, threads: int, associations: int, **options: object
) -> Run:
    """Every file through one DicomNode used by `threads` threads."""
    with DicomNode(
        "127.0.0.1",
        port,
        aet,
        associations=associations,
        timeout=60,
        **options,  # type: ignore[arg-type]
    ) as node:
        cpu, started = time.process_time(), time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(node.store, files))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return Run(seconds, cpu, len(files), sum(map(len, files)))


def storescu(
    paths: Sequence[Path], port: int, aet: str, processes: int, env: dict[str, str]
) -> Run:
    """Every file through `processes` storescu processes, each sending its share."""
    shares = [paths[i::processes] for i in range(processes)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [STORESCU, "-aet", DEFAULT_CALLING_AE_TITLE, "-aec", aet, "127.0.0.1", str(port)]
            + [str(path) for path in share],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
        )
        for share in shares
    ]
    for proc in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"storescu exited with {proc.returncode}")
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return Run(seconds, cpu, len(paths), sum(path.stat().st_size for path in paths))


def measure(peer: Peer, send: Callable[[int, str], Run], count: int) -> Run:
    """Start the peer, send, check that it holds `count` instances, discard it."""
    port, aet, held, stop = peer.start()
    try:
        run = send(port, aet)
        if held() != count:
            raise RuntimeError(f"{peer.name} holds {held()} instances, expected {count}")
        return run
    finally:
        stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--associations", type=int, default=0, help="default: --threads")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nagle", action="store_true", help="DCMTK with Nagle's algorithm on")
    args = parser.parse_args()
    env = {} if args.nagle else {"TCP_NODELAY": "1"}
    (listen_port,) = free_ports(1)
    with tempfile.TemporaryDirectory(prefix="dimse-bench-") as tmp:
        work = Path(tmp)
        study, series = generate_uid(), generate_uid()
        files = [instance(index, study, series) for index in range(args.count)]
        paths = []
        for index, data in enumerate(files):
            paths.append(work / f"{index:05d}.dcm")
            paths[-1].write_bytes(data)
        print(
            f"{args.count} CT slices, {sum(map(len, files)) / 2**20:.0f} MiB, "
            f"{args.threads} threads, {args.associations or args.threads} associations, "
            f"DCMTK {'with' if args.nagle else 'without'} Nagle"
        )
        n, a = args.threads, args.associations or args.threads
        variants: list[tuple[Peer, str, Callable[[int, str], Run]]] = []
        for peer in (
            storescp_peer(work, env),
            orthanc_peer(work, env, args.threads, listen_port),
        ):
            variants.append((peer, "bridge", lambda port, aet: bridge(files, port, aet, n, a)))
            if peer.name == "orthanc":
                variants.append(
                    (
                        peer,
                        "bridge (commitment)",
                        lambda port, aet: bridge(
                            files,
                            port,
                            aet,
                            n,
                            a,
                            verify="commitment",
                            commitment_port=listen_port,
                            commitment_host="127.0.0.1",
                        ),
                    )
                )
            variants.append(
                (peer, "storescu", lambda port, aet: storescu(paths, port, aet, 1, env))
            )
            variants.append(
                (peer, f"storescu x{n}", lambda port, aet: storescu(paths, port, aet, n, env))
            )
        results: dict[tuple[str, str], list[Run]] = {}
        for round_ in range(args.rounds):
            for peer, name, send in variants:
                run = measure(peer, send, args.count)
                results.setdefault((peer.name, name), []).append(run)
                print(
                    f"round {round_ + 1} {peer.name:8} {name:20} {run.seconds:6.2f} s "
                    f"{run.rate:7.1f}/s  {run.size / run.seconds / MB:6.1f} MB/s  "
                    f"CPU {run.cpu / run.count * 1000:5.2f} ms/instance",
                    flush=True,
                )
    print()
    print(f"{'peer':8} {'sender':20} {'instances/s':>11} {'MB/s':>7} {'CPU ms/inst':>11}")
    for (peer_name, name), runs in results.items():
        rate = statistics.median(run.rate for run in runs)
        mbs = statistics.median(run.size / run.seconds / MB for run in runs)
        cpu = statistics.median(run.cpu / run.count * 1000 for run in runs)
        print(f"{peer_name:8} {name:20} {rate:11.1f} {mbs:7.1f} {cpu:11.2f}")
    print()
    for peer_name in ("storescp", "orthanc"):
        ours = results[(peer_name, "bridge")]
        for baseline in ("storescu", f"storescu x{args.threads}"):
            theirs = results[(peer_name, baseline)]
            ratio = statistics.median(a.rate / b.rate for a, b in zip(ours, theirs, strict=True))
            print(f"{peer_name}: bridge / {baseline} = {ratio:.2f}")


if __name__ == "__main__":
    main()
