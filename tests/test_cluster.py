"""The cluster engine: transfers on real Dask workers, the ledger and deletions here.

The batching and splitting logic is tested with a fake Dask client; everything that talks to
Orthanc runs against real servers, a real `dask scheduler` and two `dask worker` processes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from bridge import __version__
from bridge.config import ServerConfig, TargetConfig
from bridge.engine.cluster import Batches, ClusterTransfer, check_versions
from bridge.engine.tasks import Job, job
from bridge.errors import ConfigError, Interrupted, ServerUnavailable
from bridge.jobs import TranscodeOptions
from bridge.ledger.state import State
from bridge.outcomes import CONVERTED, FAILED, FORWARDED, SKIPPED, Entry, NewInstance
from bridge.peers.orthanc import OrthancClient
from bridge.peers.retry import RetryPolicy
from bridge.uids import IMPLICIT_VR_LITTLE_ENDIAN
from tests import bridgectl
from tests.conftest import MakeOrthanc
from tests.dask_cluster import DaskCluster
from tests.orthanc import EXPLICIT_VR_LITTLE_ENDIAN, TARGET_USERS, OrthancServer
from tests.polling import wait_for

J2K = "GDCMJ2K_TextGBR.dcm"


class KilledWorker(Exception):
    """Named as Dask's own: Batches recognises it by name (Dask stays an optional extra)."""


class FakeClient:
    """Runs each batch at once; a batch holding "bad" kills its workers."""

    def __init__(self, threads: int = 2) -> None:
        self.batches: list[list[str]] = []
        self.warmed: Job | None = None
        self._threads = threads
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(2)

    def nthreads(self) -> dict[str, int]:
        return {"w0": self._threads}

    def run(self, func: Any, job: Job, on_error: str) -> dict[str, object]:
        self.warmed = job  # Batches prepares the workers for its job first
        return {"w0": None}

    def submit(self, func: Any, job: Job, ids: list[str], pure: bool) -> Future[list[Entry]]:
        with self._lock:
            self.batches.append(list(ids))

        def run() -> list[Entry]:
            if "bad" in ids:
                raise KilledWorker("Attempted to run task on 3 different workers, all died")
            return [Entry(i, None, CONVERTED) for i in ids]

        return self._pool.submit(run)


def a_job() -> Job:
    server = ServerConfig("http://a:1", "u", "secret")
    target = TargetConfig("target", ServerConfig("http://b:1", "v", "target-secret"))
    return job(server, (target,), TranscodeOptions(), False)


def test_the_job_carries_no_password() -> None:
    made = a_job()
    assert made.source.password is None and made.source.username == "u"
    assert made.targets[0].server.password is None and made.targets[0].server.username == "v"
    assert made.version == __version__


def test_instances_go_in_batches_and_each_caller_gets_its_own_outcome() -> None:
    client = FakeClient()
    batches = Batches(client, a_job(), 4, threading.Event())
    try:
        with ThreadPoolExecutor(10) as pool:
            entries = list(
                pool.map(lambda iid: batches.send(iid).result(), [f"i{n}" for n in range(10)])
            )
    finally:
        batches.close()
    assert [e.instance_id for e in entries] == [f"i{n}" for n in range(10)]
    assert all(len(b) <= 4 for b in client.batches)
    assert len(client.batches) < 10  # they were grouped
    assert sorted(i for b in client.batches for i in b) == sorted(f"i{n}" for n in range(10))


def test_a_batch_that_kills_workers_is_split_until_the_culprit_is_alone() -> None:
    client = FakeClient()
    batches = Batches(client, a_job(), 8, threading.Event())
    names = ["a", "b", "c", "bad", "e", "f", "g", "h"]
    try:
        with ThreadPoolExecutor(8) as pool:
            entries = dict(
                zip(names, pool.map(lambda iid: batches.send(iid).result(), names), strict=True)
            )
    finally:
        batches.close()
    assert entries["bad"].state == FAILED
    assert "killed every cluster worker" in str(entries["bad"].error)
    assert all(entries[n].state == CONVERTED for n in names if n != "bad")
    assert ["bad"] in client.batches


def test_workers_of_another_version_are_refused() -> None:
    class Versions:
        def run(self, func: Any, on_error: str) -> dict[str, object]:
            return {"tcp://w0": __version__, "tcp://w1": "0.0.1", "tcp://w2": ImportError("x")}

    with pytest.raises(ConfigError) as refused:
        check_versions(Versions())
    message = str(refused.value)
    assert "tcp://w1 runs 0.0.1" in message and "tcp://w2 runs none (ImportError" in message
    assert "tcp://w0" not in message


def started_cluster(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> tuple[DaskCluster, Path]:
    """A running scheduler with two workers, and a bridge.yaml that deletes originals."""
    cluster = DaskCluster(tmp_path / "dask", 2, bridgectl.env(source, target))
    cluster.start()
    config = bridgectl.write_config(
        tmp_path,
        source,
        target,
        delete_original=True,
        cluster={"scheduler": cluster.address, "batch_size": 4},
    )
    return cluster, config


def test_catch_up_on_two_dask_workers_converts_and_deletes_every_original(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    uploaded = bridgectl.upload_variants(source, J2K, 40)
    cluster, config = started_cluster(source, target, tmp_path)
    try:
        result = bridgectl.run("catch-up", config, source, target, timeout=300)
        assert result.returncode == 0, result.stderr
        assert "40 converted" in result.stdout
        assert "2 workers" in result.stderr
    finally:
        cluster.stop()
    held = bridgectl.wait_for_count(target, 40)
    assert set(held) == uploaded
    assert {target.transfer_syntax(i) for i in held} == {EXPLICIT_VR_LITTLE_ENDIAN}
    assert source.instances() == []
    state = State(tmp_path / "state", read_only=True)
    try:
        entries = state.entries((CONVERTED,))
    finally:
        state.close()
    assert {e.instance_id for e in entries} == uploaded
    assert all(e.deleted_original for e in entries)


def test_two_targets_with_rules_on_the_cluster(
    source: OrthancServer, target: OrthancServer, make_orthanc: MakeOrthanc, tmp_path: Path
) -> None:
    """Routing travels with the tasks; each worker reads each target's own credentials."""
    archive = make_orthanc("archive")
    converted = bridgectl.upload_variants(source, J2K, 12)
    skipped = bridgectl.upload_variants(source, "JPEG2000.dcm", 4)  # NM: research skips it
    (user, password), *_ = TARGET_USERS.items()
    env = bridgectl.env(source, target) | {
        "BRIDGE_TARGET_RESEARCH_USERNAME": user,
        "BRIDGE_TARGET_RESEARCH_PASSWORD": password,
    }
    cluster = DaskCluster(tmp_path / "dask", 2, env)
    cluster.start()
    try:
        targets = [
            {
                "name": "research",
                "url": target.url,
                "username": user,
                "password": password,
                "syntax": IMPLICIT_VR_LITTLE_ENDIAN,
                "rules": [{"when": {"modality": ["NM"]}, "action": "skip"}],
            },
            {"name": "archive", "url": archive.url, "rules": [{"action": "forward"}]},
        ]
        config = bridgectl.write_config(
            tmp_path,
            source,
            target,
            delete_original=True,
            targets=targets,
            cluster={"scheduler": cluster.address, "batch_size": 4},
        )
        result = bridgectl.run("catch-up", config, source, target, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        cluster.stop()
    assert set(target.instances()) == converted
    assert {target.transfer_syntax(i) for i in converted} == {IMPLICIT_VR_LITTLE_ENDIAN}
    assert set(archive.instances()) == converted | skipped
    assert source.instances() == []  # every one taken by archive at least, and verified
    state = State(tmp_path / "state", read_only=True)
    try:
        assert state.delivery_counts() == {
            "research": {CONVERTED: 12, SKIPPED: 4},
            "archive": {FORWARDED: 16},
        }
    finally:
        state.close()


def test_not_ready_without_workers_and_ready_once_one_joins(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    """/readyz, /metrics and the page say how many workers the coordinator has to send to."""
    cluster = DaskCluster(tmp_path / "dask", 0, bridgectl.env(source, target))
    cluster.start()
    config = bridgectl.write_config(
        tmp_path, source, target, cluster={"scheduler": cluster.address}
    )
    base = bridgectl.http_url(config)
    bridge = bridgectl.start("run", config, source, target, tmp_path / "bridge.log")
    try:

        def answer(path: str) -> tuple[int, str] | None:
            assert bridge.poll() is None, (tmp_path / "bridge.log").read_text()
            try:
                response = requests.get(base + path, timeout=5)
            except requests.ConnectionError:
                return None  # not listening yet
            return response.status_code, response.text

        def ready(expected: int) -> Callable[[], tuple[int, str] | None]:
            return lambda: found if (found := answer("/readyz")) and found[0] == expected else None

        _, text = wait_for(ready(503), 60, "/readyz 503 without workers")
        assert "no Dask worker is connected to the scheduler" in text
        assert "orthanc_bridge_cluster_workers 0.0" in (answer("/metrics") or (0, ""))[1]
        worker = cluster._worker(0)
        worker.start()
        cluster.workers.append(worker)
        wait_for(ready(200), 60, "/readyz 200 once a worker joined")
        assert "orthanc_bridge_cluster_workers 1.0" in (answer("/metrics") or (0, ""))[1]
        page = (answer("/") or (0, ""))[1]
        assert "1 Dask workers with 1 threads" in page and 'id="decoders"' not in page
    finally:
        bridgectl.kill(bridge)
        cluster.stop()


def test_nothing_lost_when_a_worker_the_scheduler_and_the_coordinator_are_killed(
    source: OrthancServer, target: OrthancServer, tmp_path: Path
) -> None:
    copies = bridgectl.variants(J2K, 300)
    cluster, config = started_cluster(source, target, tmp_path)
    uploaded: set[str] = set()

    def stream() -> None:  # the PACS keeps sending while everything below happens
        for data in copies:
            uploaded.add(str(source.upload(data)["ID"]))

    sender = threading.Thread(target=stream)
    log = tmp_path / "bridge.log"
    bridge = bridgectl.start("run", config, source, target, log)
    sender.start()
    try:

        def held(count: int) -> bool:
            return len(target.instances()) >= count

        wait_for(lambda: held(40), 120, "40 instances converted")
        cluster.workers[0].kill()  # mid-run: its batch is run again elsewhere
        cluster.workers[0].start()
        wait_for(lambda: held(120), 120, "120 instances converted")
        cluster.scheduler.kill()  # the workers leave with it; their supervisor restarts them
        for worker in cluster.workers:
            worker.kill()
        cluster.scheduler.start()
        for worker in cluster.workers:
            worker.start()
        wait_for(lambda: held(200), 180, "200 instances converted after the scheduler's loss")
        bridgectl.kill(bridge)  # the coordinator, SIGKILL
        bridge = bridgectl.start("run", config, source, target, log)
        sender.join(timeout=120)
        wait_for(
            lambda: held(300) and not source.instances(),
            240,
            "all 300 in the target and none left in the source",
            interval=0.5,
        )
    finally:
        bridgectl.kill(bridge)
        sender.join(timeout=60)
        cluster.stop()
    assert len(uploaded) == 300
    ids = target.instances()
    assert len(ids) == 300 and set(ids) == uploaded  # each once
    assert {target.transfer_syntax(i) for i in ids[::30]} == {EXPLICIT_VR_LITTLE_ENDIAN}
    state = State(tmp_path / "state", read_only=True)
    try:
        counts = state.counts()
        entries = state.entries((CONVERTED,), limit=1000)
    finally:
        state.close()
    assert counts == {CONVERTED: 300}, counts
    assert {e.instance_id for e in entries} == uploaded
    assert all(e.deleted_original for e in entries)


def test_the_coordinator_keeps_a_few_threads_however_many_instances_are_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 Dask threads take 2,048 instances in flight (batches of 16, two per thread): the
    coordinator waits for them with callbacks, not a thread each (before: 2,050 threads)."""
    from bridge.cli import make_pipeline
    from bridge.config import load
    from bridge.engine import cluster as cluster_module

    client = FakeClient(threads=64)
    monkeypatch.setattr(cluster_module, "connect", lambda config: client)
    config_path = tmp_path / "bridge.yaml"
    config_path.write_text(
        "source: {url: 'http://127.0.0.1:1'}\n"
        "target: {url: 'http://127.0.0.1:2'}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "cluster: {scheduler: 'tcp://127.0.0.1:1', batch_size: 16}\n"
    )
    config = load(config_path)
    stop = threading.Event()
    retry = RetryPolicy(stop, max_wait=5)
    state = State(config.state_dir)
    source = OrthancClient(config.source, "source", retry)
    target = OrthancClient(config.targets[0].server, "target", retry)
    engine = make_pipeline(config, state, source, [target], stop)
    peak = threading.active_count()
    sampling = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not sampling.wait(0.005):
            peak = max(peak, threading.active_count())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        summary = engine.process([f"i{n:05d}" for n in range(6000)])
    finally:
        sampling.set()
        sampler.join()
        engine.close()
        state.close()
    assert summary.counts == {CONVERTED: 6000}, summary
    assert len(client.batches) >= 6000 // 16
    print(f"{peak} threads at the peak")
    assert peak < 40, f"{peak} threads at the peak"


class FlakyClient(FakeClient):
    """The first `failures` batches fail as a worker whose server is down makes them fail."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def submit(self, func: Any, job: Job, ids: list[str], pure: bool) -> Future[list[Entry]]:
        with self._lock:
            if self.failures:
                self.failures -= 1
                failed: Future[list[Entry]] = Future()
                failed.set_exception(ServerUnavailable("target Orthanc (POST /instances): down"))
                return failed
        return super().submit(func, job, ids, pure)


@pytest.mark.parametrize("failures", [2, 10_000])
def test_a_transient_failure_on_the_cluster_is_sent_again_until_the_policy_gives_up(
    failures: int,
) -> None:
    """Sent again after a backoff, without a thread waiting; catch-up gives up after its
    bounded wait with the last error."""
    stop = threading.Event()
    client = FlakyClient(failures)
    batches = Batches(client, a_job(), 4, stop)
    retry = RetryPolicy(stop, max_wait=1.0, initial=0.05, longest=0.2)
    source = OrthancClient(ServerConfig("http://127.0.0.1:1"), "source", retry)
    mover = ClusterTransfer(batches, source, False, retry, lambda entry: None)
    try:
        outcome = mover.start(NewInstance(7, "i7"))
        if failures == 2:
            entry = outcome.result(timeout=30)
            assert (entry.instance_id, entry.seq, entry.state) == ("i7", 7, CONVERTED)
            assert len(client.batches) == 1  # the third try reached the worker
        else:
            with pytest.raises(ServerUnavailable, match="down"):
                outcome.result(timeout=30)
        stop.set()  # an instance started now is interrupted at once
        with pytest.raises(Interrupted):
            mover.start(NewInstance(8, "i8")).result(timeout=30)
    finally:
        stop.set()
        mover.close()
        batches.close()
