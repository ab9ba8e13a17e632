"""Fixtures running real Orthanc servers and a DCMTK workstation; logic in tests/orthanc.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.orthanc import OrthancPair, OrthancServer, StoreSCP, discard, pydicom_sample_paths

MakeOrthanc = Callable[..., OrthancServer]


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


@pytest.fixture(scope="session")
def pydicom_samples() -> dict[str, Path]:
    """pydicom's bundled files by key of tests.orthanc.PYDICOM_SAMPLES (j2k_lossless, rle, ...)."""
    return pydicom_sample_paths()
