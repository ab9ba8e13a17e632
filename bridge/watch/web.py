"""The read-only HTTP server: /metrics, /livez, /readyz, and / (the status page).

It runs in its own threads and only reads: counters, the health decisions and, for the page,
the ledger's totals and a few of its rows, through a read-only connection of its own. It never
takes a lock that a transfer holds for longer than a counter update, so it cannot slow the
transfers. Beyond loopback it asks for basic auth,
except on /livez and /readyz, which health checkers call and which tell only a state and a
reason.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hmac
import logging
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import choose_encoder

from bridge import __version__, metrics
from bridge.config import Config, HttpConfig
from bridge.errors import ConfigError, one_line
from bridge.ledger.state import LedgerReads
from bridge.outcomes import PENDING, PROBLEMS
from bridge.peers.peer import Peer
from bridge.watch.health import Health
from bridge.watch.snapshot import Snapshot
from bridge.watch.statuspage import ProblemView, ServerView, StatusView, render

log = logging.getLogger(__name__)

_PROBLEMS_SHOWN = 20
_SOP_UID = re.compile(r"SOP Instance UID [0-9.]+")
_OPEN_PATHS = ("/livez", "/readyz")
_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"


class WebServer:
    """Serves one pipeline's metrics, health and status page until `close`."""

    def __init__(
        self,
        config: Config,
        command: str,
        snapshot: Callable[[], Snapshot],
        health: Health,
        ledger: LedgerReads,
    ) -> None:
        self._http = config.http
        self._pages = _Pages(config, command, snapshot, health, ledger)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The port it listens on (useful with port 0), None when disabled."""
        return self._server.server_address[1] if self._server else None

    def start(self) -> None:
        """Listen at http_listen, if set; a port already taken is a configuration error."""
        address = self._http.address
        if address is None:
            return
        handler = _handler(self._http, self._pages)
        try:
            self._server = ThreadingHTTPServer(address, handler)
        except OSError as exc:
            raise ConfigError(
                f"http_listen: cannot listen on {self._http.listen}: {exc.strerror or exc}"
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.2,), name="http", daemon=True
        )
        self._thread.start()
        log.info("metrics, health and status page on http://%s/", self._http.listen)

    def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Pages:
    """What each path answers: (status, content type, body)."""

    def __init__(
        self,
        config: Config,
        command: str,
        snapshot: Callable[[], Snapshot],
        health: Health,
        ledger: LedgerReads,
    ) -> None:
        self._config = config
        self._command = command
        self._snapshot = snapshot
        self._health = health
        # Its own read-only connection: the page never waits for the lock transfers write under.
        self._ledger = ledger
        self._started = time.time()

    def metrics(self, accept: str) -> tuple[int, str, bytes]:
        encoder, content_type = choose_encoder(accept)
        return 200, content_type, encoder(metrics.REGISTRY)

    def livez(self) -> tuple[int, str, bytes]:
        stuck = self._health.liveness()
        return _text(503, f"stuck: {stuck}") if stuck else _text(200, "alive")

    def readyz(self) -> tuple[int, str, bytes]:
        reasons = self._health.readiness()
        if reasons:
            return _text(503, "not ready:\n" + "\n".join(f"- {r}" for r in reasons))
        return _text(200, "ready")

    def status(self) -> tuple[int, str, bytes]:
        return 200, "text/html; charset=utf-8", render(self.view()).encode()

    def view(self) -> StatusView:
        """Everything the status page shows, read now."""
        now = self._snapshot()
        health = self._health
        state = self._ledger
        reasons = health.readiness()
        ledger = state.counts()
        waiting = sum(ledger.get(s, 0) for s in PROBLEMS)
        servers_down = [f"the {c.role} {c.what}" for c in health.servers if not c.up]
        if health.liveness() or health.state_problem:
            verdict = "attention"
        elif reasons:
            verdict = "waiting"
        elif waiting:
            verdict = "attention"
            reasons = [f"{waiting} instances kept in the source wait for a person (below)"]
        else:
            verdict = "ok"
        backlog = max(0, now.source_last - now.cursor)
        config = self._config
        return StatusView(
            version=__version__,
            command=self._command,
            activity=_activity(now, servers_down, backlog),
            health=verdict,
            reasons=reasons,
            started=self._started,
            now=time.time(),
            cursor=now.cursor,
            source_last_change=now.source_last,
            backlog=backlog,
            outcomes=now.outcomes,
            ledger=ledger,
            rate=now.rate,
            inflight_instances=now.inflight_instances,
            inflight_bytes=now.inflight_bytes,
            inflight_limit_bytes=now.inflight_limit,
            decoders_alive=now.decoders_alive,
            decoders_configured=now.decoders_configured,
            decoder_restarts=now.decoder_restarts,
            servers=[_server_view(c, time.monotonic()) for c in health.servers],
            problems=[
                ProblemView(e.instance_id, e.state, e.source_syntax, _no_uids(e.error), e.updated)
                for e in state.entries((*PROBLEMS, PENDING), limit=_PROBLEMS_SHOWN)
            ],
            retry_command=f"orthanc-bridge retry -c {config.path or 'bridge.yaml'}",
            targets=state.delivery_counts() if len(config.targets) > 1 else {},
            cluster=now.where,
            config=without_secrets(config),
        )


def _activity(now: Snapshot, servers_down: list[str], backlog: int) -> str:
    if now.stopping:
        return "stopping: finishing the instances in flight"
    if servers_down:
        return "waiting for " + " and ".join(servers_down)
    if now.mode == "catching up":
        return f"catching up: {backlog} changes behind"
    if now.total:
        return f"{now.mode}: {now.done} of {now.total} instances"
    return now.mode


def _no_uids(reason: str | None) -> str | None:
    """The reason without the SOP Instance UID the decoder's message names: the page shows
    Orthanc's instance IDs only (the log and `status` keep the whole reason)."""
    return _SOP_UID.sub("SOP Instance UID in the log", reason) if reason else reason


def _server_view(client: Peer, now: float) -> ServerView:
    age = now - client.last_answer if client.last_answer is not None else None
    return ServerView(
        client.role, client.address, client.up, age, None if client.up else client.last_error
    )


def without_secrets(config: Config) -> list[tuple[str, str]]:
    """The configuration as key/value text, passwords replaced by "(set)"."""
    rows: list[tuple[str, str]] = []

    def add(prefix: str, obj: object) -> None:
        for field in dataclasses.fields(obj):  # type: ignore[arg-type]
            value = getattr(obj, field.name)
            key = f"{prefix}{field.name}"
            if dataclasses.is_dataclass(value):
                add(f"{key}.", value)
            elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
                for number, item in enumerate(value):  # targets, and each target's rules
                    add(f"{key}[{number}].", item)
            elif "password" in field.name:
                rows.append((key, "(set)" if value else ""))
            elif isinstance(value, frozenset):
                rows.append((key, ", ".join(sorted(value))))
            else:
                rows.append((key, "" if value is None else str(value)))

    add("", config)
    return rows


def _text(status: int, body: str) -> tuple[int, str, bytes]:
    return status, "text/plain; charset=utf-8", (body + "\n").encode()


def _handler(http: HttpConfig, pages: _Pages) -> type[BaseHTTPRequestHandler]:
    expected = (
        base64.b64encode(f"{http.username}:{http.password}".encode()).decode()
        if http.username
        else None
    )

    class Handler(BaseHTTPRequestHandler):
        server_version = f"orthanc-bridge/{__version__}"

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if expected and path not in _OPEN_PATHS and not self._authorized(expected):
                self._send(401, "text/plain; charset=utf-8", b"authentication required\n")
                return
            routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
                "/metrics": lambda: pages.metrics(self.headers.get("Accept", "")),
                "/livez": pages.livez,
                "/readyz": pages.readyz,
                "/": pages.status,
            }
            route = routes.get(path)
            if route is None:
                self._send(404, "text/plain; charset=utf-8", b"not found\n")
                return
            try:
                status, content_type, body = route()
            except Exception as exc:
                log.error("HTTP %s failed: %s", path, one_line(exc))
                log.debug("HTTP %s failed", path, exc_info=True)
                self._send(500, "text/plain; charset=utf-8", b"internal error, see the log\n")
                return
            self._send(status, content_type, body)

        def _authorized(self, expected: str) -> bool:
            scheme, _, given = self.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "basic":
                return False
            return hmac.compare_digest(given.strip().encode(), expected.encode())

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            gzipped = "gzip" in self.headers.get("Accept-Encoding", "") and len(body) > 1024
            if gzipped:
                body = gzip.compress(body, 1)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            if gzipped:
                self.send_header("Content-Encoding", "gzip")
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="orthanc-bridge"')
            # The page needs nothing but its own inline style and SVG: forbid everything else,
            # so that even a reason that slipped through escaping could not run or fetch.
            self.send_header("Content-Security-Policy", _POLICY)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("HTTP %s", format % args)

    return Handler
