"""Fixtures running real Orthanc servers and a DCMTK workstation; logic in tests/orthanc.py."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import orthanc
from tests.orthanc import OrthancPair, OrthancServer, StoreSCP, discard, pydicom_sample_paths

MakeOrthanc = Callable[..., OrthancServer]

# A test using one of these (directly or through another fixture) runs real Orthanc servers.
ORTHANC_FIXTURES = frozenset({"orthanc_pair", "make_orthanc"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "orthanc: runs real Orthanc servers (added to the users of the orthanc fixtures); "
        "scripts/test.sh runs these again against Orthanc 1.12",
    )


def pytest_report_header(config: pytest.Config) -> str:
    """Which Orthanc the real-server tests run: `Orthanc 1.12.7 at /path/to/binary`."""
    try:
        version = ".".join(map(str, orthanc.orthanc_version()))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        version = f"(unknown: {exc})"
    return f"Orthanc {version} at {orthanc.ORTHANC_BINARY}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if ORTHANC_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.orthanc)


@pytest.fixture(autouse=True)
def _orthanc_marker_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """Let tests/orthanc.py refuse to start a server in a test without the `orthanc` marker."""
    orthanc.MARKED_FOR_ORTHANC = request.node.get_closest_marker("orthanc") is not None
    try:
        yield
    finally:
        orthanc.MARKED_FOR_ORTHANC = None


@pytest.fixture
def orthanc_pair(tmp_path: Path) -> Iterator[OrthancPair]:
    """Fresh, started source and target servers (with authentication), stopped after the test."""
    pair = OrthancPair.create(tmp_path)
    pair.start()
    try:
        yield pair
    finally:
        # Killed, not stopped: a clean Orthanc shutdown takes 3.5 s and the data is thrown away.
        pair.discard()


@pytest.fixture
def source(orthanc_pair: OrthancPair) -> OrthancServer:
    """Orthanc A of the pair: where the PACS sends, in any transfer syntax."""
    return orthanc_pair.source


@pytest.fixture
def target(orthanc_pair: OrthancPair) -> OrthancServer:
    """Orthanc B of the pair: where the bridge uploads uncompressed copies."""
    return orthanc_pair.target


@pytest.fixture
def make_orthanc(tmp_path: Path) -> Iterator[MakeOrthanc]:
    """Factory for servers with custom options (`OrthancServer` keywords); started, then stopped."""
    servers: list[OrthancServer] = []

    def make(name: str, **options: Any) -> OrthancServer:
        server = OrthancServer(name, tmp_path / name, **options)
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        discard(*servers)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    """A started storescp that accepts only uncompressed syntaxes: the research workstation."""
    scp = StoreSCP(tmp_path / "storescp")
    scp.start()
    try:
        yield scp
    finally:
        discard(scp)


@pytest.fixture
def make_storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """Factory for started storescp processes with options (`StoreSCP` keywords); killed after."""
    scps: list[StoreSCP] = []

    def make(name: str = "storescp", **options: Any) -> StoreSCP:
        scp = StoreSCP(tmp_path / name, **options)
        scps.append(scp)
        scp.start()
        return scp

    try:
        yield make
    finally:
        discard(*scps)


@pytest.fixture(scope="session")
def pydicom_samples() -> dict[str, Path]:
    """pydicom's bundled files by key of tests.orthanc.PYDICOM_SAMPLES (j2k_lossless, rle, ...)."""
    return pydicom_sample_paths()
