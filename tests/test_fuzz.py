"""The fuzzing harness (tests/fuzz.py): inputs fixed by the seed, children's ends classified, and
a bounded run over the header reader and the transcoder that must find nothing."""

from __future__ import annotations

import logging
import os
import random
import signal
from pathlib import Path

import pytest
from pydicom import uid

import bridge.dicom.codecs
import bridge.errors
from tests.fuzz import (
    KINDS,
    MIB,
    Case,
    Check,
    Config,
    Corpus,
    Doc,
    Limits,
    Report,
    classify,
    error_event,
    fuzz,
    load_corpus,
    make_case,
    mutate_codestream,
    run_one,
)

# A fixed seed: the CI run is the same inputs every time, up to how many fit in its time.
CI_SEED = 20261203
CI_SECONDS = 25.0


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load_corpus()


def test_the_seeds_cover_every_syntax_the_bridge_decodes(corpus: Corpus) -> None:
    syntaxes = {seed.syntax for seed in corpus.seeds}
    native = {
        uid.ImplicitVRLittleEndian,
        uid.ExplicitVRBigEndian,
        uid.DeflatedExplicitVRLittleEndian,
    }
    assert set(bridge.dicom.codecs.DECODER_CHAINS) | native <= syntaxes


def test_inputs_are_a_function_of_the_seed_and_the_index_alone(corpus: Corpus) -> None:
    indexes = range(len(corpus.seeds), len(corpus.seeds) + 100)
    first = [make_case(corpus, 7, i) for i in indexes]
    backwards = [make_case(corpus, 7, i) for i in reversed(indexes)][::-1]
    other = [make_case(corpus, 8, i) for i in indexes]
    assert [(c.seed, c.data, c.mutations) for c in first] == [
        (c.seed, c.data, c.mutations) for c in backwards
    ]
    assert [c.data for c in other] != [c.data for c in first]
    assert all(c.data != make_case(corpus, 7, 0).data for c in first[:10])


@pytest.mark.parametrize(
    ("syntax", "family"),
    [
        (uid.JPEGBaseline8Bit, "jpeg"),
        (uid.JPEGLSLossless, "jpeg"),
        (uid.JPEG2000, "j2k"),
        (uid.RLELossless, "rle"),
    ],
)
def test_codestreams_are_mutated_by_their_own_structure(
    corpus: Corpus, syntax: str, family: str
) -> None:
    seed = next(s for s in corpus.seeds if s.syntax == syntax)
    rng = random.Random(1)
    described = None
    for _ in range(50):  # an op may not fit this codestream (a JP2 box in a bare one)
        doc = Doc.of(seed)
        described = mutate_codestream(rng, doc)
        if described:
            break
    assert described is not None
    assert described.startswith(family)
    assert doc.encoded() != seed.data


def _case() -> Case:
    return Case(0, "synthetic", "", b"", ("none",))


def _segfaults(data: bytes, limits: Limits, report: Report) -> None:
    report({"stage": "transcode"})
    os.kill(os.getpid(), signal.SIGSEGV)


def _hangs(data: bytes, limits: Limits, report: Report) -> None:
    report({"stage": "transcode"})
    signal.pause()  # until the parent's SIGKILL at the deadline


def _allocates_too_much(data: bytes, limits: Limits, report: Report) -> None:
    try:
        bytearray(2 * limits.memory_bytes)
    except MemoryError as exc:
        report(error_event("transcode", exc))


def _decoder_runs_out(data: bytes, limits: Limits, report: Report) -> None:
    report({"decoder": "pylibjpeg/openjpeg"})
    try:
        bytearray(2 * limits.memory_bytes)
    except MemoryError as exc:  # pydicom logs a plugin's exception, then keeps only its text
        logging.getLogger("pydicom").exception(exc)
    report(error_event("transcode", bridge.errors.DecodeError("frame 0 (pylibjpeg: )")))


def _leaks(data: bytes, limits: Limits, report: Report) -> None:
    report(error_event("transcode", KeyError("Rows")))


def _wraps(data: bytes, limits: Limits, report: Report) -> None:
    report({"header": 512})
    report(error_event("transcode", bridge.errors.DecodeError("frame 0 could not be decoded")))


def _negative_size(data: bytes, limits: Limits, report: Report) -> None:
    report({"header": -1})


@pytest.mark.parametrize(
    ("check", "kinds"),
    [
        (_segfaults, ["crash"]),
        (_hangs, ["timeout"]),
        (_allocates_too_much, ["memory"]),
        (_decoder_runs_out, ["memory"]),
        (_leaks, ["leak"]),
        (_wraps, []),
        (_negative_size, ["header"]),
    ],
)
def test_each_way_a_child_ends_is_classified(check: Check, kinds: list[str]) -> None:
    limits = Limits(timeout=0.5, memory_bytes=256 * MIB, max_decoded_bytes=64 * MIB)
    outcome = run_one(b"", limits, check)
    assert [f.kind for f in classify(_case(), outcome, limits)] == kinds


def test_a_crash_names_its_signal_and_stage() -> None:
    limits = Limits(timeout=10)
    [finding] = classify(_case(), run_one(b"", limits, _segfaults), limits)
    assert "SIGSEGV" in finding.detail
    assert finding.stage == "transcode"


def test_a_bounded_run_finds_nothing(corpus: Corpus, tmp_path: Path) -> None:
    config = Config(seconds=CI_SECONDS, seed=CI_SEED, out=tmp_path, limits=Limits(timeout=5))
    report = fuzz(config, corpus)
    assert report.inputs > len(corpus.seeds)  # past the seeds themselves, into the mutants
    if report.findings(*KINDS):
        summary = "\n".join(report.summary().splitlines()[:40])
        pytest.fail(f"{summary}\n(inputs and findings.jsonl in {tmp_path})", pytrace=False)
