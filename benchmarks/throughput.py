"""Throughput of the bridge against the naive loop and against the machine's limits.

Run as `python benchmarks/throughput.py [--count N] [--workers W] [--repeat R] [--grow]
[--only naive,naive-plain,naive-gdcm,copy,decode,copy-decoded,bridge,cluster,observed]
[--json out.json]`.

One corpus of CT-like 512x512 16-bit slices (smooth anatomy plus noise, -1000..2000 HU stored
with RescaleIntercept -1024), JPEG 2000 lossless, generated once and cached in the temp
directory. Real Orthanc servers are started on loopback: A is loaded once with the corpus (not
timed), every variant writes into a fresh, empty B. Measured, on the same corpus:

  naive   one instance at a time: GET /file, pydicom decompress(), save_as, POST (requests);
          pydicom decodes with pylibjpeg, the bridge's decoder
  naive (no gzip)
          the same asking for the plain file (requests asks for gzip by default), as the bridge
          does: the two then differ only in how the work is arranged
  naive (gdcm)
          the same with GDCM, which pydicom prefers where python-gdcm is installed: its
          OpenJPEG decodes each frame with a thread per core, so it is not a one-core loop
  copy    download from A and upload the same compressed bytes to B, with several threads:
          what the two servers can take (no decoding at all)
  decode  the bridge's decoding processes (bridge.decoding.pool.DecoderPool) over the in-memory
          corpus, kept busy by two threads each: the CPU limit
  copy (decoded upload)
          as copy, but uploading the decoded file of each instance (computed beforehand): the
          servers' limit for the traffic the bridge really makes (3x more bytes to upload)
  bridge  `python -m bridge catch-up -c bridge.yaml` as a subprocess, fresh state, its wall time
          from start to exit (interpreter start-up, process pool start-up included), with its
          HTTP server off (http_listen: "")
  bridge (cluster)
          the same with `cluster:` set: the transfers run on a Dask scheduler and two
          single-threaded `dask worker` processes on this machine (started before timing), the
          coordinator keeping the feed and the ledger: the cluster engine's overhead
  bridge (observed)
          the same with the HTTP server on, /metrics scraped every second and the status page
          loaded every 5 s while it runs (Prometheus scrapes every 15 s by default)

limit = 1 / (1/copy + 1/decode): the servers and the decoders share the same cores, so their
costs add up; the same with copy (decoded upload) gives the limit for the bridge's own traffic.
With --repeat N, N rounds run every variant in turn; the table shows each variant's fastest
run, and every ratio is the median of the ratios computed within each round.
Peak memory of the bridge is sampled every 50 ms over its whole process tree (the bridge, the
zygote and every decoding process), as the sum of RSS and the sum of PSS (shared pages
divided among the processes that share them: the honest total).
--grow runs the bridge on COUNT/2 and on COUNT*2 instances to show that memory stays flat.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Before numpy is imported: OpenBLAS's idle threads would otherwise spin in this process and
# slow the naive loop down by ~1%, for reasons that have nothing to do with how it is built.
# (The bridge sets the same for its decoding processes.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import requests

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bridge.decoding.pool import DecoderPool  # noqa: E402
from bridge.jobs import TranscodeOptions  # noqa: E402
from bridge.peers.orthanc import instance_id  # noqa: E402
from tests.dask_cluster import DaskCluster  # noqa: E402
from tests.orthanc import OrthancServer, cpu_seconds, free_ports  # noqa: E402
from tests.transcode_support import j2k_monochrome  # noqa: E402

SIZE = 512
DECODED_BYTES = SIZE * SIZE * 2  # pixel bytes of one decoded slice
CORPUS_VERSION = "ct-j2k-v1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
COPY_THREADS = 4
SAMPLE_INTERVAL = 0.05
MB = 1e6


# --- the corpus --------------------------------------------------------------------------------


def ct_slice(index: int) -> np.ndarray:
    """A CT-like slice: air, body outline, fat, lungs, spine, soft organs, texture and noise."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    cy, cx = SIZE / 2 + 10 * np.sin(index / 20), SIZE / 2
    hu = np.full((SIZE, SIZE), -1000.0, np.float32)

    def ellipse(dy: float, dx: float, ry: float, rx: float) -> np.ndarray:
        mask: np.ndarray = ((yy - cy - dy) / (SIZE * ry)) ** 2 + (
            (xx - cx - dx) / (SIZE * rx)
        ) ** 2 < 1
        return mask

    body = ellipse(0, 0, 0.36, 0.44)
    inner = ellipse(0, 0, 0.33, 0.41)
    hu[body] = 40
    hu[body & ~inner] = -100  # subcutaneous fat
    for side in (-1, 1):
        hu[ellipse(-10, side * SIZE * 0.18, 0.22, 0.13 + 0.03 * np.cos(index / 15))] = -850
    hu[ellipse(SIZE * 0.22, 0, 0.05, 0.05)] = 700  # vertebra
    hu[ellipse(SIZE * 0.22, 0, 0.038, 0.038)] = 1200
    organ = np.exp(-(((yy - cy + 20) / (SIZE * 0.1)) ** 2 + ((xx - cx + 30) / (SIZE * 0.12)) ** 2))
    hu += (60 * organ + 15 * np.sin(xx / 23 + index / 7) * np.cos(yy / 31)) * inner
    hu += np.where(body, rng.normal(0, 13, hu.shape), rng.normal(0, 3, hu.shape))
    stored: np.ndarray = np.clip(np.rint(hu + 1024), 0, 4095).astype("<u2")
    return stored


def make_instance(index: int, study: str, series: str) -> bytes:
    """One JPEG 2000 lossless CT instance as a DICOM Part-10 file."""
    from openjpeg.utils import encode_array

    frame = encode_array(ct_slice(index), bits_stored=12, photometric_interpretation=2)
    return j2k_monochrome(
        [frame],
        SIZE,
        CT_IMAGE_STORAGE,
        PatientID="BENCH",
        PatientName="Throughput^Benchmark",
        StudyInstanceUID=study,
        SeriesInstanceUID=series,
        Modality="CT",
        InstanceNumber=index + 1,
        SliceThickness="1.0",
        ImagePositionPatient=[-250.0, -250.0, float(-index)],
        ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        PixelSpacing=[0.9765625, 0.9765625],
        RescaleIntercept="-1024",
        RescaleSlope="1",
        WindowCenter="40",
        WindowWidth="400",
    )


def _make_file(job: tuple[int, str, str, str]) -> None:
    index, study, series, path = job
    data = make_instance(index, study, series)
    Path(path + ".part").write_bytes(data)
    os.replace(path + ".part", path)


def corpus(count: int, cache: Path) -> list[bytes]:
    """The first `count` instances of the cached corpus, generated on all cores when missing."""
    folder = cache / CORPUS_VERSION
    folder.mkdir(parents=True, exist_ok=True)
    uids = folder / "uids.json"
    if not uids.exists():
        from pydicom.uid import generate_uid

        uids.write_text(json.dumps({"study": generate_uid(), "series": generate_uid()}))
    ids = json.loads(uids.read_text())
    paths = [folder / f"{index:05d}.dcm" for index in range(count)]
    missing = [
        (index, ids["study"], ids["series"], str(path))
        for index, path in enumerate(paths)
        if not path.exists()
    ]
    if missing:
        started = time.monotonic()
        with ProcessPoolExecutor() as pool:
            list(pool.map(_make_file, missing, chunksize=8))
        print(f"generated {len(missing)} instances in {folder} in {_since(started):.0f} s")
    return [path.read_bytes() for path in paths]


# --- servers -----------------------------------------------------------------------------------


class Servers:
    """Orthanc A, loaded once, and a fresh Orthanc B for each variant, under one work dir."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.source = OrthancServer("source", workdir / "source")
        self._targets = 0

    def load(self, files: Sequence[bytes]) -> None:
        """Upload files to A (several threads; not timed)."""
        with ThreadPoolExecutor(COPY_THREADS) as pool:
            list(pool.map(self.source.upload, files))

    @contextmanager
    def fresh_target(self) -> Iterator[OrthancServer]:
        """An empty, newly started Orthanc B; killed and its storage removed afterwards."""
        self._targets += 1
        target = OrthancServer(f"target{self._targets}", self.workdir / f"target{self._targets}")
        target.start()
        try:
            yield target
        finally:
            target.kill()
            shutil.rmtree(target.workdir, ignore_errors=True)


def _count(server: OrthancServer) -> int:
    return int(server.get_json("/statistics")["CountInstances"])


def _check_target(target: OrthancServer, count: int, what: str) -> None:
    held = _count(target)
    if held != count:
        raise SystemExit(f"{what}: the target holds {held} instances, expected {count}")


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Result:
    """One variant's figures."""

    variant: str
    instances: int
    seconds: float
    peak_rss_mb: float | None = None
    peak_pss_mb: float | None = None
    processes: int | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.instances / self.seconds

    @property
    def decoded_mb_s(self) -> float:
        return self.instances * DECODED_BYTES / MB / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "instances_per_s": self.rate, "decoded_mb_per_s": self.decoded_mb_s}


def naive(
    source: OrthancServer,
    target: OrthancServer,
    ids: Sequence[str],
    plugin: str = "pylibjpeg",
    gzip: bool = True,
) -> Result:
    """The loop anyone writes first: one instance at a time, pydicom's decompress().

    pydicom decodes with `plugin`: by default pylibjpeg, the bridge's own decoder. Where
    python-gdcm is installed (the tests install it), pydicom prefers GDCM, whose OpenJPEG
    decodes each frame with one thread per core: that is no longer a one-core loop, and is
    shown as a separate line. requests asks for gzip by default, which costs Orthanc A about
    1.2 CPU s per 300 instances on the loop's path; with gzip=False it asks for the plain file,
    as the bridge does, and the two then differ only in how the work is arranged.
    """
    import pydicom

    session = requests.Session()
    headers = {} if gzip else {"Accept-Encoding": "identity"}
    started, cpu = time.monotonic(), time.process_time()
    for iid in ids:
        response = session.get(f"{source.url}/instances/{iid}/file", headers=headers, timeout=60)
        response.raise_for_status()
        ds = pydicom.dcmread(io.BytesIO(response.content))
        ds.decompress(generate_instance_uid=False, decoding_plugin=plugin)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        session.post(f"{target.url}/instances", data=out.getvalue(), timeout=60).raise_for_status()
    seconds = _since(started)
    session.close()
    name = "naive" if plugin == "pylibjpeg" else f"naive ({plugin})"
    return Result(
        name if gzip else f"{name} (no gzip)",
        len(ids),
        seconds,
        note=f"sequential: GET{'' if gzip else ' without gzip'}, decompress() with {plugin}, "
        "save_as, POST",
        extra={"cpu_s": {"client": time.process_time() - cpu}},
    )


def copy(
    source: OrthancServer,
    target: OrthancServer,
    ids: Sequence[str],
    uploads: Mapping[str, bytes] | None = None,
) -> Result:
    """Download from A and upload to B with several threads, no decoding: the servers' limit.

    The bytes downloaded are uploaded unchanged, or with `uploads`, the given (decoded) file
    of each instance instead: the same traffic as the bridge's, minus its checks.
    """
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=COPY_THREADS)
    session.mount("http://", adapter)

    def one(iid: str) -> None:
        response = session.get(
            f"{source.url}/instances/{iid}/file",
            headers={"Accept-Encoding": "identity"},
            timeout=60,
        )
        response.raise_for_status()
        body = uploads[iid] if uploads is not None else response.content
        session.post(f"{target.url}/instances", data=body, timeout=60).raise_for_status()

    started, cpu = time.monotonic(), time.process_time()
    with ThreadPoolExecutor(COPY_THREADS) as pool:
        list(pool.map(one, ids))
    seconds = _since(started)
    session.close()
    extra: dict[str, Any] = {"cpu_s": {"client": time.process_time() - cpu}}
    if uploads is None:
        note = f"no decoding, {COPY_THREADS} threads"
        return Result("copy", len(ids), seconds, note=note, extra=extra)
    note = f"no decoding, uploads the decoded files, {COPY_THREADS} threads"
    return Result("copy (decoded upload)", len(ids), seconds, note=note, extra=extra)


def decode(files: Sequence[bytes], workers: int, keep: list[bytes] | None = None) -> Result:
    """The bridge's own decoding processes over the in-memory corpus: the CPU limit.

    Fed by two threads per process so that none ever waits for its next file. The outputs
    are appended to `keep` when it is given.
    """
    pool = DecoderPool(workers, TranscodeOptions(), threading.Event())
    try:
        with ThreadPoolExecutor(workers * 2) as feeders:
            # Fork the processes and warm them up before timing.
            list(feeders.map(pool.decode, files[: workers * 2]))
            pids = pool.pids()
            cpu = sum(cpu_seconds(pid) for pid in pids)
            started = time.monotonic()
            total = 0
            for result in feeders.map(pool.decode, files):
                total += len(result.data)
                if keep is not None:
                    keep.append(bytes(result.data))
            seconds = _since(started)
            cpu = sum(cpu_seconds(pid) for pid in pids) - cpu
    finally:
        pool.close()
    return Result(
        "decode",
        len(files),
        seconds,
        note=f"{workers} processes, no network",
        extra={"output_bytes": total, "cpu_s": {"workers": cpu}},
    )


class TreeMemory:
    """Samples the summed RSS and PSS of a process and all its descendants."""

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self.max_processes = 0
        self._cpu: dict[int, float] = {}  # last CPU seconds seen of each process in the tree
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        samples = 0
        tree: list[int] = []
        while not self._stop.is_set():
            rss = pss = 0
            if samples % 5 == 0:
                tree = _descendants(self.pid)  # walks all of /proc: not every sample
            samples += 1
            for pid in tree:
                self._cpu[pid] = max(self._cpu.get(pid, 0.0), cpu_seconds(pid))
                usage = _smaps_rollup(pid)
                rss += usage.get("Rss", 0)
                pss += usage.get("Pss", 0)
            self.peak_rss = max(self.peak_rss, rss * 1024)
            self.peak_pss = max(self.peak_pss, pss * 1024)
            self.max_processes = max(self.max_processes, len(tree))
            self._stop.wait(self.interval)

    @property
    def cpu(self) -> float:
        """CPU seconds used by the tree (to the last sample of each process)."""
        return sum(self._cpu.values())


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: parse after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _smaps_rollup(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    usage = {}
    for line in lines[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            usage[key] = int(parts[0])
    return usage


def bridge(
    source: OrthancServer,
    target: OrthancServer,
    count: int,
    workers: int | None,
    workdir: Path,
    label: str = "bridge",
    observed: bool = False,
    scheduler: str | None = None,
) -> Result:
    """`python -m bridge catch-up` on a fresh state directory, memory sampled over its tree;
    `observed`: with its HTTP server on, scraped while it runs."""
    run_dir = workdir / f"bridge-{label}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    port = free_ports(1)[0]
    config: dict[str, Any] = {
        "source": {"url": source.url},
        "target": {"url": target.url},
        "state_dir": str(run_dir / "state"),
        "http_listen": f"127.0.0.1:{port}" if observed else "",
    }
    if scheduler:
        config["cluster"] = {"scheduler": scheduler}
    if workers:
        config["workers"] = workers
    (run_dir / "bridge.yaml").write_text(json.dumps(config))  # JSON is YAML
    log = run_dir / "bridge.log"
    argv = [sys.executable, "-m", "bridge", "catch-up", "-c", str(run_dir / "bridge.yaml")]
    with log.open("wb") as out:
        started, wall_clock = time.monotonic(), time.time()
        process = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        with TreeMemory(process.pid) as memory, Scraper(port, observed) as scraper:
            status = process.wait()
        seconds = _since(started)
    if status != 0:
        raise SystemExit(f"bridge exited with {status}; see {log}:\n{log.read_text()[-2000:]}")
    _check_target(target, count, label)
    lines = log.read_text().splitlines()
    report = [line for line in lines if line.startswith("catch-up:")]
    # The log's timestamps (local time, to the millisecond) of each instance converted.
    done = [
        datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for line in lines
        if " converted from " in line or " converted on the cluster " in line
    ]
    steady = (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 else 0.0
    return Result(
        label,
        count,
        seconds,
        peak_rss_mb=memory.peak_rss / MB,
        peak_pss_mb=memory.peak_pss / MB,
        processes=memory.max_processes,
        note=f"catch-up, {workers or os.cpu_count()} workers, wall time incl. start-up",
        extra={
            "report": report[-1] if report else "",
            "cpu_s": {"bridge": memory.cpu},
            "first_converted_after_s": done[0] - wall_clock if done else None,
            "steady_instances_per_s": steady,
            "scrapes": scraper.counts,
        },
    )


def _on_cluster(
    source: OrthancServer, target: OrthancServer, count: int, workers: int, workdir: Path
) -> Result:
    """The bridge's catch-up with its transfers on `workers` single-threaded Dask workers."""
    env = dict(os.environ)
    cluster = DaskCluster(workdir / "dask", workers, env)
    cluster.start()
    try:
        before = _dask_cpu()
        result = bridge(
            source, target, count, workers, workdir, "cluster", scheduler=cluster.address
        )
        # The scheduler's, the workers' and their decoding processes' CPU: the cluster's
        # cost per instance, to compare with the local engine's whole tree.
        result.extra["cpu_s"]["dask"] = _dask_cpu() - before
        return result
    finally:
        cluster.stop()


def _dask_cpu() -> float:
    """CPU seconds so far of every Dask process and every decoding process on this machine."""
    found = subprocess.run(
        ["pgrep", "-f", "dask (scheduler|worker)|spawn_main|bridge.decoding.zygote"],
        capture_output=True,
        text=True,
    ).stdout.split()
    return sum(cpu_seconds(int(pid)) for pid in found)


class Scraper:
    """Scrapes /metrics every second and loads / every 5 s, as monitoring and a person would."""

    def __init__(self, port: int, enabled: bool) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.enabled = enabled
        self.counts = {"metrics": 0, "page": 0, "refused": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()

    def _run(self) -> None:
        tick = 0
        with requests.Session() as session:
            while not self._stop.wait(1.0):
                tick += 1
                for path, key in (("/metrics", "metrics"), ("/", "page")):
                    if key == "page" and tick % 5:
                        continue
                    try:
                        session.get(self.base + path, timeout=5).raise_for_status()
                        self.counts[key] += 1
                    except requests.RequestException:
                        self.counts["refused"] += 1  # not listening yet, or already gone


# --- the run -----------------------------------------------------------------------------------


def orthanc_id(data: bytes) -> str:
    """The Orthanc ID of a DICOM file."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return instance_id(
        str(ds.PatientID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), ds.SOPInstanceUID
    )


def _since(started: float) -> float:
    return time.monotonic() - started


def _table(results: Sequence[Result]) -> str:
    lines = [
        "| variant | instances | wall s | instances/s | decoded MB/s | CPU s | "
        "peak RSS MB (sum / PSS) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        memory = f"{r.peak_rss_mb:.0f} / {r.peak_pss_mb:.0f}" if r.peak_rss_mb is not None else "-"
        lines.append(
            f"| {r.variant} | {r.instances} | {r.seconds:.1f} | {r.rate:.1f} | "
            f"{r.decoded_mb_s:.1f} | {sum(r.extra.get('cpu_s', {}).values()):.1f} | {memory} |"
        )
    return "\n".join(lines)


def _measure(
    servers: Servers,
    name: str,
    step: Callable[[OrthancServer], Result],
    count: int,
) -> Result:
    """Run `step` once into a fresh target; add the servers' CPU seconds to its figures."""
    with servers.fresh_target() as target:
        assert servers.source.pid is not None and target.pid is not None
        before = cpu_seconds(servers.source.pid), cpu_seconds(target.pid)
        result = step(target)
        cpu = result.extra.setdefault("cpu_s", {})
        cpu["source"] = cpu_seconds(servers.source.pid) - before[0]
        cpu["target"] = cpu_seconds(target.pid) - before[1]
        _check_target(target, count, name)
    _progress(name, result)
    return result


def _best(runs: list[Result]) -> Result:
    best = min(runs, key=lambda r: r.seconds)
    best.extra["runs_s"] = [round(r.seconds, 2) for r in runs]
    return best


def _ratios(rounds: list[dict[str, Result]]) -> dict[str, list[float]]:
    """bridge/naive and bridge/limit of each round, from that round's own runs."""
    ratios: dict[str, list[float]] = {}
    for runs in rounds:
        found: dict[str, float] = {}
        if {"copy", "decode"} <= runs.keys():
            found["limit"] = 1 / (1 / runs["copy"].rate + 1 / runs["decode"].rate)
        if {"copy (decoded upload)", "decode"} <= runs.keys():
            found["limit_decoded_upload"] = 1 / (
                1 / runs["copy (decoded upload)"].rate + 1 / runs["decode"].rate
            )
        if "bridge" in runs:
            bridge_run = runs["bridge"]
            if "limit_decoded_upload" in found:
                found["bridge_over_limit_decoded_upload"] = (
                    bridge_run.rate / found["limit_decoded_upload"]
                )
            if "limit" in found:
                found["bridge_over_limit"] = bridge_run.rate / found["limit"]
                steady = bridge_run.extra.get("steady_instances_per_s") or 0.0
                found["bridge_steady_over_limit"] = steady / found["limit"]
            if "naive" in runs:
                found["bridge_over_naive"] = bridge_run.rate / runs["naive"].rate
            if "naive (no gzip)" in runs:
                found["bridge_over_naive_plain"] = bridge_run.rate / runs["naive (no gzip)"].rate
            if "naive (gdcm)" in runs:
                found["bridge_over_naive_gdcm"] = bridge_run.rate / runs["naive (gdcm)"].rate
            if "bridge (cluster)" in runs:
                cluster = runs["bridge (cluster)"]
                found["cluster_over_bridge"] = cluster.rate / bridge_run.rate
                # After start-up (the cluster's includes importing Dask and connecting).
                steady = bridge_run.extra.get("steady_instances_per_s") or 0.0
                if steady:
                    found["cluster_steady_over_bridge_steady"] = (
                        cluster.extra.get("steady_instances_per_s") or 0.0
                    ) / steady
            if "bridge (observed)" in runs:
                observed = runs["bridge (observed)"]
                found["observed_over_bridge"] = observed.rate / bridge_run.rate
                # Instances per CPU second of the bridge's process tree: on a machine whose
                # cores are all busy this is what throughput follows, with far less noise
                # than wall time on a shared machine.
                found["observed_cpu_over_bridge"] = (
                    bridge_run.extra["cpu_s"]["bridge"] / observed.extra["cpu_s"]["bridge"]
                )
        for key, value in found.items():
            ratios.setdefault(key, []).append(value)
    return ratios


def _progressed(name: str, result: Result) -> Result:
    _progress(name, result)
    return result


def _progress(name: str, result: Result) -> None:
    spent = ", ".join(f"{key} {value:.1f}" for key, value in result.extra.get("cpu_s", {}).items())
    steady = ""
    if result.extra.get("steady_instances_per_s"):
        steady = (
            f"; first instance done after {result.extra['first_converted_after_s']:.2f} s, "
            f"then {result.extra['steady_instances_per_s']:.1f}/s"
        )
    print(
        f"  {name}: {result.rate:.1f} instances/s ({result.seconds:.1f} s; CPU s: {spent}{steady})",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Generate or reuse the corpus, start the servers, measure every variant, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="instances (default 300)")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (0: CPUs)")
    parser.add_argument("--grow", action="store_true", help="also bridge COUNT/2 and COUNT*2")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every variant; the table keeps each one's fastest run, the ratios "
        "are the median of the rounds' own",
    )
    parser.add_argument(
        "--only",
        default="naive,naive-plain,naive-gdcm,copy,decode,copy-decoded,bridge,cluster,observed",
        help="variants to run",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "orthanc-bridge-bench",
        help="where the generated corpus is kept between runs",
    )
    args = parser.parse_args(argv)
    workers = args.workers or os.cpu_count() or 1
    variants = set(args.only.split(","))
    biggest = args.count * 2 if args.grow else args.count
    files = corpus(biggest, args.cache)
    small = max(1, args.count // 2)
    compressed = sum(len(f) for f in files[: args.count])
    print(
        f"corpus: {args.count} instances, {compressed / MB:.1f} MB JPEG 2000 lossless, "
        f"{args.count * DECODED_BYTES / MB:.1f} MB decoded "
        f"(ratio {args.count * DECODED_BYTES / compressed:.2f}); {os.cpu_count()} CPUs",
        flush=True,
    )
    results: list[Result] = []
    rounds: list[dict[str, Result]] = []
    grow: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bridge-bench-") as tmp:
        workdir = Path(tmp)
        servers = Servers(workdir)
        servers.source.start()
        try:
            if args.grow:
                # A first holds COUNT/2 instances, then COUNT*2: two catch-ups, fresh each time.
                servers.load(files[:small])
                grow.append(
                    _measure(
                        servers,
                        "bridge (grow, small)",
                        lambda t: bridge(servers.source, t, small, workers, workdir, "grow-small"),
                        small,
                    )
                )
                servers.load(files[small : args.count])
            else:
                servers.load(files[: args.count])
            ids = sorted(servers.source.instances())
            assert len(ids) == args.count, f"A holds {len(ids)} instances"
            decoded: list[bytes] = []
            uploads: dict[str, bytes] = {}
            if "copy-decoded" in variants:
                decode(files[: args.count], workers, decoded)  # the files to upload; not timed
                uploads = dict(zip(map(orthanc_id, files[: args.count]), decoded, strict=True))
                decoded.clear()
            steps: list[tuple[str, str, Callable[[], Result]]] = [
                ("naive", "naive", lambda: _measure(
                    servers, "naive", lambda t: naive(servers.source, t, ids), args.count
                )),
                ("naive-plain", "naive (no gzip)", lambda: _measure(
                    servers,
                    "naive (no gzip)",
                    lambda t: naive(servers.source, t, ids, gzip=False),
                    args.count,
                )),
                ("naive-gdcm", "naive (gdcm)", lambda: _measure(
                    servers,
                    "naive (gdcm)",
                    lambda t: naive(servers.source, t, ids, "gdcm"),
                    args.count,
                )),
                ("copy", "copy", lambda: _measure(
                    servers, "copy", lambda t: copy(servers.source, t, ids), args.count
                )),
                ("decode", "decode", lambda: _progressed(
                    "decode", decode(files[: args.count], workers)
                )),
                ("copy-decoded", "copy (decoded upload)", lambda: _measure(
                    servers,
                    "copy (decoded upload)",
                    lambda t: copy(servers.source, t, ids, uploads),
                    args.count,
                )),
                ("bridge", "bridge", lambda: _measure(
                    servers,
                    "bridge",
                    lambda t: bridge(servers.source, t, args.count, workers, workdir),
                    args.count,
                )),
                ("cluster", "bridge (cluster)", lambda: _measure(
                    servers,
                    "bridge (cluster)",
                    lambda t: _on_cluster(servers.source, t, args.count, workers, workdir),
                    args.count,
                )),
                ("observed", "bridge (observed)", lambda: _measure(
                    servers,
                    "bridge (observed)",
                    lambda t: bridge(
                        servers.source, t, args.count, workers, workdir, "observed", True
                    ),
                    args.count,
                )),
            ]  # fmt: skip
            # Rounds of every variant in turn, not every repeat of one variant in a row: a slow
            # spell of the machine then weighs on all variants alike, and each round's ratios
            # compare runs made minutes apart at most.
            # Every other round runs them in reverse order, so that no variant always runs
            # first (or right after the same neighbour) in a round.
            for number in range(1, args.repeat + 1):
                print(f"round {number} of {args.repeat}", flush=True)
                ordered = steps if number % 2 else steps[::-1]
                rounds.append({label: step() for key, label, step in ordered if key in variants})
            uploads.clear()
            for key, label, _ in steps:
                if key in variants:
                    results.append(_best([runs[label] for runs in rounds]))
            if args.grow:
                if "bridge" in variants:
                    grow.insert(1, next(r for r in results if r.variant == "bridge"))
                servers.load(files[args.count : biggest])
                grow.append(
                    _measure(
                        servers,
                        "bridge (grow, large)",
                        lambda t: bridge(servers.source, t, biggest, workers, workdir, "grow-big"),
                        biggest,
                    )
                )
        finally:
            servers.source.kill()

    print()
    options = f"--count {args.count} --workers {workers}"
    options += f" --repeat {args.repeat}" if args.repeat > 1 else ""
    options += " --grow" if args.grow else ""
    print(f"`python benchmarks/throughput.py {options}`")
    print(f"{os.cpu_count()} CPUs; Orthanc A and B run on the same machine.")
    print()
    print(_table(results))
    ratios = _ratios(rounds)
    summary: dict[str, Any] = {"rounds": ratios}
    print()
    for key, text in (
        ("limit", "limit = 1 / (1/copy + 1/decode), instances/s"),
        ("limit_decoded_upload", "limit with the bridge's own traffic (copy (decoded upload))"),
        ("bridge_over_limit", "bridge / limit"),
        ("bridge_steady_over_limit", "bridge after its start-up / limit"),
        ("bridge_over_limit_decoded_upload", "bridge / limit with its own traffic"),
        ("bridge_over_naive", "bridge / naive"),
        ("bridge_over_naive_plain", "bridge / naive (no gzip)"),
        ("bridge_over_naive_gdcm", "bridge / naive (gdcm)"),
        ("cluster_over_bridge", "bridge (cluster) / bridge: the cluster engine's overhead"),
        (
            "cluster_steady_over_bridge_steady",
            "the same after start-up (first instance to last)",
        ),
        ("observed_over_bridge", "bridge (observed) / bridge: what the HTTP server costs"),
        ("observed_cpu_over_bridge", "the same in instances per CPU second of the bridge"),
    ):
        if key in ratios:
            values = ratios[key]
            summary[key] = statistics.median(values)
            digits = 1 if key.startswith("limit") else 2
            each = ", ".join(f"{v:.{digits}f}" for v in values)
            rounds_text = f" (median of rounds: {each})" if len(values) > 1 else ""
            print(f"{text}: {summary[key]:.{digits}f}{rounds_text}")
    if grow:
        print("\nmemory as the corpus grows (bridge, peak over the whole process tree):\n")
        print(_table(grow))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "count": args.count,
                    "workers": workers,
                    "cpus": os.cpu_count(),
                    "results": [r.as_dict() for r in results],
                    "grow": [r.as_dict() for r in grow],
                    "summary": summary,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
