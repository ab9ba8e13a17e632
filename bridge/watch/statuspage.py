"""The status page for a person: http://127.0.0.1:8242/ renders a `StatusView` as one HTML page.

Pure rendering: the HTTP server builds a `StatusView` from the pipeline, the ledger and the
metrics, and `render` turns it into text; nothing here reads state or does I/O.

The page is self-contained (inline <style>, an inline SVG plot, an SVG favicon as a data: URI;
no JavaScript, no fonts, no CDN): hospital networks are closed, and a page that waits for an
asset it can never fetch is a blank page. It refreshes itself with <meta http-equiv="refresh">.

Everything interpolated is escaped: reasons come from hostile DICOM files and from decoders'
messages. No patient data is shown, only Orthanc's instance IDs. Elements that tests (and
people's scripts) look for have stable ids: health, activity, backlog, count-<outcome>,
ledger-<state>, rate-plot, problems, retry-command, servers, config, decoders.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import quote

from bridge.outcomes import DELETING, OUTCOMES, PENDING

LEDGER_STATES = (*OUTCOMES, PENDING, DELETING)
RATE_MINUTES = 60
MIB = 1024 * 1024
_DASH = "\u2013"  # an empty cell

# health -> (badge class, label, colour of the favicon); anything unknown needs a person.
_HEALTH = {
    "ok": ("ok", "OK", "#16a34a"),
    "waiting": ("waiting", "Waiting", "#d97706"),
    "attention": ("attention", "Needs attention", "#dc2626"),
}
# The SVG plot's geometry, in viewBox units.
_W, _H = 1100, 210
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 24, 12, 26


@dataclass(frozen=True)
class ServerView:
    role: str  # "source" or "target"
    url: str
    up: bool | None  # None: not contacted yet
    last_answer_age: float | None  # seconds since its latest good answer
    error: str | None  # the latest failure, when not up


@dataclass(frozen=True)
class ProblemView:
    instance_id: str  # Orthanc's instance ID (no patient data anywhere on the page)
    state: str  # failed / unsupported / pending
    syntax: str | None
    reason: str | None
    updated: float  # unix time


@dataclass(frozen=True)
class StatusView:
    version: str
    command: str  # run, catch-up, retry, reconcile
    activity: str  # e.g. "following the source", "waiting for the target Orthanc"
    health: str  # "ok", "waiting" or "attention"
    reasons: list[str]  # why not ok (the /readyz and /livez reasons), may be empty
    started: float  # unix time the process started
    now: float  # unix time of this page
    cursor: int
    source_last_change: int
    backlog: int
    outcomes: dict[str, int]  # this process: converted, forwarded, failed, unsupported, vanished
    ledger: dict[str, int]  # all-time counts by ledger state
    rate: list[int]  # instances finished per minute, the last 60 minutes, oldest first
    inflight_instances: int
    inflight_bytes: int
    inflight_limit_bytes: int
    decoders_alive: int
    decoders_configured: int
    decoder_restarts: int
    servers: list[ServerView]
    problems: list[ProblemView]  # the latest ones, newest first
    retry_command: str  # e.g. "orthanc-bridge retry -c /etc/orthanc-bridge/bridge.yaml"
    config: list[tuple[str, str]]  # the configuration without secrets, as key/value text
    refresh_seconds: int = 5
    # All-time counts by state at each target, when there are several (routing).
    targets: dict[str, dict[str, int]] = field(default_factory=dict)
    cluster: str | None = None  # "N Dask workers with M threads, at tcp://...", on a cluster


def render(view: StatusView) -> str:
    """The whole page, as text to send with Content-Type: text/html; charset=utf-8."""
    badge, label, colour = _HEALTH.get(view.health, _HEALTH["attention"])
    refresh = max(1, int(view.refresh_seconds))
    icon = (
        "<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'>"
        f"<circle cx='8' cy='8' r='7' fill='{colour}'/></svg>"
    )
    body = "\n".join(
        [
            _header(view, badge, label),
            '<div class="grid">',
            _progress(view),
            _counts(view),
            _resources(view),
            "</div>",
            _rate(view.rate),
            _servers(view.servers),
            _targets(view.targets),
            _problems(view.problems, view.retry_command, view.now),
            _configuration(view),
        ]
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{refresh}">
<title>{_e(label)} · orthanc-bridge {_e(view.command)}</title>
<link rel="icon" href="data:image/svg+xml,{_e(quote(icon))}">
<style>{_STYLE}</style>
</head>
<body class="health-{badge}">
<main>
{body}
<footer>Page of {_e(_clock(view.now))}, refreshed every {refresh} s.
For machines: <a href="/metrics">/metrics</a>, <a href="/readyz">/readyz</a>,
<a href="/livez">/livez</a>.</footer>
</main>
</body>
</html>
"""


def _header(view: StatusView, badge: str, label: str) -> str:
    reasons = "".join(f"<li>{_e(r)}</li>" for r in view.reasons)
    return f"""<header>
<div class="title"><h1>Orthanc bridge</h1>
<span class="tag">{_e(view.version)}</span><span class="tag">{_e(view.command)}</span>
<span id="health" class="badge badge-{badge}" data-health="{_e(view.health)}">{_e(label)}</span>
</div>
<p id="activity" class="activity">{_e(view.activity)}</p>
{f'<ul id="reasons" class="reasons">{reasons}</ul>' if reasons else ""}
<p class="muted">Up for {_e(_duration(view.now - view.started))}, \
since {_e(_clock(view.started))}.</p>
</header>"""


def _progress(view: StatusView) -> str:
    return f"""<section class="card">
<h2>Progress</h2>
<p class="big" id="backlog" data-value="{view.backlog}">{_n(view.backlog)}</p>
<p class="muted">changes behind the source</p>
<table class="kv">
<tr><th>Cursor</th><td id="cursor">{_n(view.cursor)}</td></tr>
<tr><th>Source's last change</th><td id="source-last-change">{_n(view.source_last_change)}</td></tr>
</table>
</section>"""


def _counts(view: StatusView) -> str:
    extra = sorted((view.outcomes.keys() | view.ledger.keys()) - set(LEDGER_STATES))
    shown = [*OUTCOMES, *(s for s in (PENDING, DELETING) if s in view.ledger), *extra]
    rows = []
    for state in shown:
        run = view.outcomes.get(state, 0)
        this_run = (
            f'<td id="count-{_e(state)}" data-value="{run}">{_n(run)}</td>'
            if state in OUTCOMES or state in view.outcomes
            else f'<td class="muted">{_DASH}</td>'
        )
        total = view.ledger.get(state, 0)
        rows.append(
            f'<tr><th><span class="dot s-{_e(state)}"></span>{_e(state)}</th>{this_run}'
            f'<td id="ledger-{_e(state)}" data-value="{total}">{_n(total)}</td></tr>'
        )
    return f"""<section class="card">
<h2>Instances</h2>
<table class="counts">
<tr><th></th><th>this run</th><th>all time</th></tr>
{"".join(rows)}
</table>
</section>"""


def _resources(view: StatusView) -> str:
    limit = view.inflight_limit_bytes
    share = min(1.0, view.inflight_bytes / limit) if limit > 0 else 0.0
    limit_text = f"{limit / MIB:,.0f} MiB" if limit > 0 else "no limit"
    short = "short" if view.decoders_alive < view.decoders_configured else ""
    if view.cluster is not None:  # the workers decode; this process keeps none
        decoding = f'<h2>Cluster</h2>\n<p id="cluster">{_e(view.cluster)}</p>'
    else:
        decoding = (
            f'<h2>Decoding processes</h2>\n<p id="decoders" class="{short}">'
            f"<b>{_n(view.decoders_alive)}</b> alive of {_n(view.decoders_configured)}, "
            f"{_plural(view.decoder_restarts, 'restart')}</p>"
        )
    return f"""<section class="card">
<h2>In flight</h2>
<p id="inflight"><b>{_n(view.inflight_instances)}</b> instances,
<b>{view.inflight_bytes / MIB:,.1f} MiB</b> of {limit_text}</p>
<div class="meter"><div style="width: {share * 100:.1f}%"></div></div>
{decoding}
</section>"""


def _rate(rate: list[int]) -> str:
    values = [0] * max(0, RATE_MINUTES - len(rate)) + [max(0, v) for v in rate[-RATE_MINUTES:]]
    total, peak = sum(values), max(values)
    average = f"On average {total / (RATE_MINUTES * 60):.2f} instances/s over the last hour"
    detail = (
        f" ({total / RATE_MINUTES:,.1f}/min): {_n(total)} in all, at most {_n(peak)} in one"
        " minute. The light bar is this minute, not over yet."
        if total
        else ": none finished."
    )
    return f"""<section class="card">
<h2>Instances finished per minute, the last hour</h2>
{_plot(values)}
<p id="rate-average" class="muted">{average}{detail}</p>
</section>"""


def _plot(values: list[int]) -> str:
    """Bars scaled to the peak minute, on axes from -60 min to now; axes alone when all zero."""
    peak = max(values)
    width, height = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    base, middle, step = _TOP + height, _TOP + height / 2, width / len(values)
    shapes = []
    for i, value in enumerate(values):
        h = value / peak * height if peak else 0.0
        ago = len(values) - 1 - i
        shapes.append(
            f'<rect class="bar{" current" if ago == 0 else ""}" x="{_LEFT + i * step + 1:.1f}" '
            f'y="{base - h:.1f}" width="{step - 2:.1f}" height="{h:.1f}" data-value="{value}">'
            f"<title>{f'{ago} min ago' if ago else 'this minute'}: {value}</title></rect>"
        )
    for m, anchor in ((60, "start"), (45, "middle"), (30, "middle"), (15, "middle"), (0, "end")):
        shapes.append(
            f'<text x="{_LEFT + width * (60 - m) / 60:.1f}" y="{_H - 8}" text-anchor="{anchor}">'
            f"{f'-{m} min' if m else 'now'}</text>"
        )
    if peak:
        shapes.append(f'<text x="{_LEFT - 6}" y="{_TOP + 4}" text-anchor="end">{peak}/min</text>')
    else:
        shapes.append(
            f'<text class="note" x="{_LEFT + width / 2:.1f}" y="{middle + 5:.1f}" '
            'text-anchor="middle">no instance finished in the last hour</text>'
        )
    return f"""<svg id="rate-plot" viewBox="0 0 {_W} {_H}" role="img"
 aria-label="instances finished per minute over the last hour, peak {peak}">
<line class="grid-line" x1="{_LEFT}" y1="{_TOP}" x2="{_W - _RIGHT}" y2="{_TOP}"/>
<line class="grid-line" x1="{_LEFT}" y1="{middle}" x2="{_W - _RIGHT}" y2="{middle}"/>
<line class="axis" x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{base}"/>
<line class="axis" x1="{_LEFT}" y1="{base}" x2="{_W - _RIGHT}" y2="{base}"/>
<text x="{_LEFT - 6}" y="{base + 4}" text-anchor="end">0</text>
{"".join(shapes)}
</svg>"""


def _servers(servers: list[ServerView]) -> str:
    rows = []
    for s in servers:
        if s.up is None:
            state, detail = '<span class="pill">not contacted yet</span>', ""
        elif s.up:
            state = '<span class="pill pill-ok">up</span>'
            detail = _ago(s.last_answer_age)
        else:
            state = '<span class="pill pill-bad">down</span>'
            last = f" (last good answer {_ago(s.last_answer_age)})" if s.last_answer_age else ""
            detail = f'<span class="error">{_e(s.error or "no answer")}</span>{_e(last)}'
        rows.append(
            f"<tr><th>{_e(s.role)}</th><td><code>{_e(s.url)}</code></td>"
            f"<td>{state}</td><td>{detail}</td></tr>"
        )
    return _table_section(
        "Orthanc servers", "servers", ("role", "URL", "state", "last answer"), rows, "none"
    )


def _targets(targets: dict[str, dict[str, int]]) -> str:
    if not targets:
        return ""
    rows = [
        f"<tr><th>{_e(name)}</th><td>"
        + (", ".join(f"{n} {_e(state)}" for state, n in sorted(counts.items())) or _DASH)
        + "</td></tr>"
        for name, counts in sorted(targets.items())
    ]
    return _table_section(
        "Targets (all time)", "targets", ("target", "instances by outcome"), rows, "none yet"
    )


def _problems(problems: list[ProblemView], retry_command: str, now: float) -> str:
    rows = [
        f"<tr><td><code>{_e(p.instance_id)}</code></td>"
        f'<td><span class="pill s-{_e(p.state)}">{_e(p.state)}</span></td>'
        f"<td><code>{_e(p.syntax or _DASH)}</code></td>"
        f'<td class="reason">{_e(_clip(p.reason or _DASH, 400))}</td>'
        f'<td class="nowrap" title="{_e(_clock(p.updated))}">{_e(_ago(now - p.updated))}</td></tr>'
        for p in problems
    ]
    retry = (
        "<p>Once the cause is fixed, this command queues the failed and unsupported "
        "instances again:</p>\n"
        f'<pre><code id="retry-command">{_e(retry_command)}</code></pre>'
    )
    columns = ("instance", "state", "syntax", "reason", "when")
    empty = "No problems: every instance went through."
    return _table_section("Latest problems", "problems", columns, rows, empty, retry)


def _configuration(view: StatusView) -> str:
    rows = [f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>" for k, v in view.config]
    return _table_section(
        f"Configuration of orthanc-bridge {view.version}", "config", ("key", "value"), rows, _DASH
    )


def _table_section(
    title: str, ident: str, columns: Iterable[str], rows: list[str], empty: str, after: str = ""
) -> str:
    heads = list(columns)
    if not rows:
        rows = [f'<tr><td colspan="{len(heads)}" class="muted">{_e(empty)}</td></tr>']
    header = "".join(f"<th>{_e(c)}</th>" for c in heads)
    return f"""<section class="card">
<h2>{_e(title)}</h2>
<div class="scroll"><table id="{ident}" class="list">
<tr>{header}</tr>
{"".join(rows)}
</table></div>
{after}
</section>"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _n(value: int) -> str:
    return f"{value:,}"


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    days, hours, minutes = s // 86400, s // 3600 % 24, s // 60 % 60
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {s % 60} s"
    return f"{s} s"


def _ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{_duration(seconds)} ago"


_STYLE = """
:root { color-scheme: light; --ok: #15803d; --wait: #b45309; --bad: #b91c1c;
  --line: #e2e8f0; --muted: #64748b; }
* { box-sizing: border-box; }
body { margin: 0; background: #f1f5f9; color: #0f172a; line-height: 1.4;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 20px; }
header, .card { background: #fff; border: 1px solid var(--line); border-radius: 10px;
  padding: 14px 18px; margin-bottom: 14px; }
header { border-left: 6px solid var(--bad); }
.health-ok header { border-left-color: var(--ok); }
.health-waiting header { border-left-color: var(--wait); }
.title { display: flex; align-items: center; gap: 10px; flex-wrap: wrap; }
h1 { font-size: 20px; margin: 0 6px 0 0; }
h2 { font-size: 13px; margin: 0 0 8px; color: var(--muted); text-transform: uppercase;
  letter-spacing: .04em; }
.card h2 + * { margin-top: 0; }
.tag { background: #f1f5f9; border: 1px solid var(--line); border-radius: 6px;
  padding: 1px 8px; font-size: 12px; }
.badge { margin-left: auto; border-radius: 999px; padding: 3px 14px; font-weight: 600;
  color: #fff; background: var(--bad); }
.badge-ok { background: var(--ok); }
.badge-waiting { background: var(--wait); }
.activity { font-size: 16px; margin: 8px 0 4px; }
.reasons { margin: 4px 0; padding-left: 20px; color: var(--bad); overflow-wrap: anywhere; }
.muted { color: var(--muted); }
header .muted { margin: 4px 0 0; font-size: 13px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(280px, 1fr)); gap: 14px;
  margin-bottom: 14px; }
.grid .card { margin: 0; }
.big { font-size: 34px; font-weight: 600; margin: 0; line-height: 1.1; }
table { border-collapse: collapse; width: 100%; }
th { text-align: left; font-weight: 500; }
td, th { padding: 4px 8px 4px 0; vertical-align: top; }
.kv { margin-top: 10px; } .kv td, .counts td { text-align: right; }
.counts tr:first-child th { color: var(--muted); font-size: 12px; text-align: right; }
.counts td, .kv td { font-variant-numeric: tabular-nums; }
.list th { color: var(--muted); font-size: 12px; border-bottom: 1px solid var(--line); }
.list td, .list tbody th { border-bottom: 1px solid var(--line); }
.list tr:last-child td, .list tr:last-child th { border-bottom: 0; }
.list tr > th:first-child { color: inherit; font-size: inherit; font-weight: 500; }
.list tr:first-child > th:first-child { color: var(--muted); font-size: 12px; }
.scroll { overflow-x: auto; }
.reason, .error { overflow-wrap: anywhere; }
.reason { min-width: 16em; }
.error { color: var(--bad); }
code, pre { font: 12.5px ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
pre { background: #0f172a; color: #e2e8f0; padding: 10px 12px; border-radius: 8px;
  overflow-x: auto; margin: 6px 0 0; }
.dot { display: inline-block; width: 9px; height: 9px; border-radius: 50%; margin-right: 7px;
  background: #94a3b8; }
.pill { display: inline-block; border-radius: 999px; padding: 0 9px; font-size: 12px;
  background: #e2e8f0; }
.pill-ok { background: #dcfce7; color: var(--ok); }
.pill-bad, .pill.s-failed { background: #fee2e2; color: var(--bad); }
.pill.s-unsupported { background: #fef3c7; color: var(--wait); }
.dot.s-converted { background: #16a34a; } .dot.s-forwarded { background: #2563eb; }
.dot.s-failed { background: #dc2626; } .dot.s-unsupported { background: #d97706; }
.meter { height: 8px; border-radius: 4px; background: #e2e8f0; overflow: hidden;
  margin: 6px 0 16px; }
.meter div { height: 100%; background: #3b82f6; }
.short { color: var(--wait); }
.pill, .nowrap { white-space: nowrap; }
svg { width: 100%; height: auto; display: block; }
svg text { font: 12px system-ui, sans-serif; fill: var(--muted); }
svg .note { font-size: 14px; }
.axis { stroke: #94a3b8; stroke-width: 1; }
.grid-line { stroke: var(--line); stroke-dasharray: 3 3; }
.bar { fill: #3b82f6; } .bar.current { fill: #93c5fd; }
#config tr > :first-child { width: 16em; }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 6px; }
footer a { color: inherit; }
"""
