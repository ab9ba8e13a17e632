"""The status page: render's output checked as text, then the same page in headless Chromium."""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bridge.outcomes import OUTCOMES
from bridge.watch.statuspage import ProblemView, ServerView, StatusView, render
from tests import browser
from tests.browser import render_page

NOW = 1_760_000_000.0
HOSTILE = "<script>alert(1)</script>"
RATE = [0] * 20 + [3, 8, 15, 22, 30, 41, 38, 35, 40, 44] + [36] * 28 + [30, 12]


def sample_view(**changes: object) -> StatusView:
    view = StatusView(
        version="0.1.0",
        command="run",
        activity="catching up: 1234 changes behind",
        health="waiting",
        reasons=["the target Orthanc did not answer for 40 s"],
        started=NOW - 3 * 3600 - 125,
        now=NOW,
        cursor=88_210,
        source_last_change=89_444,
        backlog=1234,
        outcomes={"converted": 12_345, "forwarded": 17, "failed": 3, "unsupported": 2},
        ledger={
            "converted": 151_002,
            "forwarded": 230,
            "failed": 9,
            "unsupported": 4,
            "vanished": 31,
            "pending": 2,
        },
        rate=RATE,
        inflight_instances=7,
        inflight_bytes=183 * 1024 * 1024,
        inflight_limit_bytes=512 * 1024 * 1024,
        decoders_alive=3,
        decoders_configured=4,
        decoder_restarts=1,
        servers=[
            ServerView("source", "http://pacs-orthanc:8042", True, 0.8, None),
            ServerView(
                "target", "https://research-orthanc:8042", False, 41.0, "connection refused"
            ),
        ],
        problems=[
            ProblemView(
                "4e6f1d2a-0c1b9a33-7d0b5f8e-8d21c7f4-0a9e3b11",
                "failed",
                "1.2.840.10008.1.2.4.50",
                "decoder crashed: " + HOSTILE,
                NOW - 95,
            ),
            ProblemView(
                "9a8b7c6d-5e4f3a2b-1c0d9e8f-7a6b5c4d-3e2f1a0b",
                "unsupported",
                "1.2.840.10008.1.2.4.100",
                "MPEG2 video cannot become native pixels",
                NOW - 4000,
            ),
        ],
        retry_command="orthanc-bridge retry -c /etc/orthanc-bridge/bridge.yaml",
        config=[
            ("source.url", "http://pacs-orthanc:8042"),
            ("workers", "4"),
            ("target.password", "p@ss<word>&1"),
        ],
    )
    return dataclasses.replace(view, **changes)  # type: ignore[arg-type]


class Elements(HTMLParser):
    """Each element with an id: its tag, attributes and its text (with its children's)."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.by_id: dict[str, tuple[str, dict[str, str]]] = {}
        self.text: dict[str, str] = {}
        self.shapes: dict[str, list[dict[str, str]]] = {}  # the svg id -> its rects/polylines
        self._open: list[tuple[str, str | None]] = []
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.handle_data(" ")  # cells' texts apart
        ident = attributes.get("id")
        if ident is not None:
            assert ident not in self.by_id, f"duplicate id {ident}"
            self.by_id[ident] = (tag, attributes)
            self.text[ident] = ""
        if tag in ("rect", "polyline"):
            for _, owner in self._open:
                if owner is not None and self.by_id[owner][0] == "svg":
                    self.shapes.setdefault(owner, []).append(attributes)
        if tag not in ("meta", "link", "br", "hr", "img", "input"):  # HTML's void elements
            self._open.append((tag, ident))

    def handle_endtag(self, tag: str) -> None:
        if any(open_tag == tag for open_tag, _ in self._open):
            while self._open.pop()[0] != tag:
                pass

    def handle_data(self, data: str) -> None:
        for _, ident in self._open:
            if ident is not None:
                self.text[ident] += data

    def value(self, ident: str) -> str:
        return " ".join(self.text[ident].split())


def test_render_has_every_id_and_the_counts() -> None:
    page = render(sample_view())
    assert page.startswith("<!DOCTYPE html>")
    found = Elements(page)
    for ident in (
        "health",
        "activity",
        "backlog",
        "rate-plot",
        "problems",
        "retry-command",
        "servers",
        "config",
        "decoders",
    ):
        assert ident in found.by_id, ident
    assert found.value("activity") == "catching up: 1234 changes behind"
    assert found.value("backlog") == "1,234"
    assert found.value("count-converted") == "12,345"
    assert found.by_id["count-converted"][1]["data-value"] == "12345"
    assert found.value("count-vanished") == "0"  # absent from outcomes: 0, never missing
    assert all(f"count-{outcome}" in found.by_id for outcome in OUTCOMES)
    assert found.value("ledger-converted") == "151,002"
    assert found.value("ledger-pending") == "2"
    assert found.value("decoders") == "3 alive of 4, 1 restart"
    assert found.value("retry-command") == sample_view().retry_command
    assert "pacs-orthanc:8042" in found.value("servers")
    assert "connection refused" in found.value("servers")
    assert "4e6f1d2a-0c1b9a33-7d0b5f8e-8d21c7f4-0a9e3b11" in found.value("problems")
    assert '<meta http-equiv="refresh" content="5">' in page
    assert "183.0 MiB</b> of 512 MiB" in page
    assert "Up for 3 h 2 min" in page


def test_render_is_self_contained() -> None:
    page = render(sample_view())
    assert "<script" not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page


def test_render_escapes_everything() -> None:
    view = sample_view(
        activity=HOSTILE,
        reasons=[HOSTILE],
        version='1"><b>',
        servers=[ServerView("target", "http://x/<i>", False, None, HOSTILE)],
        config=[(HOSTILE, HOSTILE)],
        retry_command=HOSTILE,
    )
    page = render(view)
    assert "<script>" not in page
    assert "<i>" not in page and '1"><b>' not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 7
    found = Elements(page)
    assert found.value("activity") == HOSTILE  # the text a person reads is the original


def test_config_values_are_shown_as_given() -> None:
    """render shows what it is given: the caller strips secrets before building the view."""
    found = Elements(render(sample_view()))
    assert "target.password p@ss<word>&1" in found.value("config")


@pytest.mark.parametrize(
    ("health", "badge"),
    [
        ("ok", "badge-ok"),
        ("waiting", "badge-waiting"),
        ("attention", "badge-attention"),
        ("bogus", "badge-attention"),
    ],
)
def test_badge_class_follows_health(health: str, badge: str) -> None:
    found = Elements(render(sample_view(health=health)))
    _, attributes = found.by_id["health"]
    assert badge in attributes["class"].split()
    assert f'class="health-{badge.removeprefix("badge-")}"' in render(sample_view(health=health))


def bars(page: str) -> list[dict[str, str]]:
    return Elements(page).shapes["rate-plot"]


def test_rate_bars_scale_to_the_peak() -> None:
    shapes = bars(render(sample_view(rate=[0] * 57 + [10, 20, 5])))
    assert len(shapes) == 60
    heights = [float(s["height"]) for s in shapes]
    bottoms = {round(float(s["y"]) + float(s["height"]), 1) for s in shapes}
    assert len(bottoms) == 1  # one baseline
    assert heights[:57] == [0.0] * 57
    peak = heights[58]
    assert peak == max(heights) and peak > 100
    assert heights[57] == pytest.approx(peak / 2, abs=0.1)
    assert heights[59] == pytest.approx(peak / 4, abs=0.1)
    assert [s["data-value"] for s in shapes[-3:]] == ["10", "20", "5"]


def test_rate_short_series_is_padded_and_average_given() -> None:
    page = render(sample_view(rate=[60] * 30))
    shapes = bars(page)
    assert [s["data-value"] for s in shapes] == ["0"] * 30 + ["60"] * 30
    assert "On average 0.50 instances/s" in Elements(page).value("rate-average")


@pytest.mark.parametrize("rate", [[], [0] * 60])
def test_empty_rate_still_has_axes_and_a_note(rate: list[int]) -> None:
    page = render(sample_view(rate=rate))
    svg = page[page.index('<svg id="rate-plot"') : page.index("</svg>", page.index("rate-plot"))]
    assert svg.count('class="axis"') == 2
    assert "-60 min" in svg and ">now<" in svg
    assert "no instance finished in the last hour" in svg
    assert all(float(s["height"]) == 0 for s in bars(page))


def test_no_problems_and_unknown_servers() -> None:
    found = Elements(
        render(
            sample_view(
                problems=[],
                servers=[ServerView("source", "http://a:8042", None, None, None)],
                inflight_limit_bytes=0,
                health="ok",
                reasons=[],
            )
        )
    )
    assert "No problems" in found.value("problems")
    assert "not contacted yet" in found.value("servers")
    assert "reasons" not in found.by_id


def test_several_targets_get_their_own_counts() -> None:
    counts = {"research": {"converted": 7, "skipped": 2}, "archive": {"forwarded": 9}}
    found = Elements(render(sample_view(targets=counts)))
    assert "research" in found.value("targets") and "7 converted, 2 skipped" in found.value(
        "targets"
    )
    assert "9 forwarded" in found.value("targets")
    assert "targets" not in Elements(render(sample_view())).by_id  # one target: no section


class _Page(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        found = self.path == "/"
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.body) if found else 0))
        self.end_headers()
        if found:
            self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve(page: str) -> Iterator[str]:
    handler = type("Handler", (_Page,), {"body": page.encode()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_chromium_renders_the_page(tmp_path: Path) -> None:
    view = sample_view()
    screenshot = Path(os.environ.get("BRIDGE_TEST_ARTEFACTS", tmp_path)) / "status-page.png"
    started = time.monotonic()
    with serve(render(view)) as url:
        dom = render_page(url, screenshot)
    assert time.monotonic() - started < 30
    found = Elements(dom)
    assert found.value("count-converted") == "12,345"
    assert found.by_id["health"][1]["class"] == "badge badge-waiting"
    assert found.by_id["rate-plot"][0] == "svg"
    shapes = found.shapes["rate-plot"]
    assert len(shapes) == 60
    assert max(float(s["height"]) for s in shapes) > 100
    assert "&lt;script&gt;" in dom and "<script>" not in dom
    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 20_000  # a blank page is a few kB


def test_missing_chromium_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never a skip: CI without Chromium must fail, with the way to install it."""
    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "chromium")
    with pytest.raises(browser.BrowserError, match=r"scripts/setup\.sh"):
        browser.render_page("http://127.0.0.1:9/", tmp_path / "page.png")
