"""The job dashboard as plain HTML and SVG strings (no widget library needed).

Used live by ``notebook.py`` for the loss chart, the failure panel, the per-rank log
view and the HTML that stands beside the live widgets, and at the end for the static
copy of the whole dashboard (with every rank's last log lines) that replaces the
widgets, so the saved notebook still shows the outcome where widget state is not saved
(nbviewer, GitHub). On several hosts, a row ``host gpu2 — ranks 2-3`` heads each host's
ranks.
"""

from __future__ import annotations

import html
import math
import re
import time
from pathlib import Path

from nbdist.display.state import (LOG_SCALE_SPAN, LOG_VIEW_LINES, HostGroup, JobView,
                                  RankView, describe_failure, format_duration, format_metrics,
                                  format_value, log_path, progress_text)
from nbdist.states import JobState, RankState

STATE_COLORS = {
    RankState.PENDING: "#888", RankState.STARTING: "#888", RankState.JOINING: "#888",
    RankState.READY: "#1f6feb", RankState.RUNNING: "#1f6feb", RankState.DONE: "#1a7f37",
    RankState.FAILED: "#cf222e", RankState.CRASHED: "#cf222e",
    RankState.KILLED: "#bc4c00", RankState.STOPPED: "#bc4c00",
}
JOB_COLORS = {JobState.RUNNING: "#1f6feb", JobState.SUCCEEDED: "#1a7f37",
              JobState.FAILED: "#cf222e", JobState.TIMEOUT: "#bc4c00",
              JobState.INTERRUPTED: "#bc4c00"}
SERIES_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c")
MONO = "font-family: var(--jp-code-font-family, monospace); font-size: 12px"
NOWRAP = "white-space: nowrap; overflow: hidden; text-overflow: ellipsis; display: block"
# colours and cursor moves of a rank's output: a terminal's business, noise in HTML
ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_])")


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def state_html(state: str, label: str | None = None) -> str:
    color = STATE_COLORS.get(state, "#888")
    return f'<span style="color:{color}; font-weight:600">{esc(label or state)}</span>'


def header_html(view: JobView) -> str:
    job = view.job
    color = JOB_COLORS.get(view.status, "#888")
    where = f" on pool <code>{esc(job.pool)}</code>" if getattr(job, "pool", None) else ""
    return (f'<div style="{MONO}"><b>nbdist</b> {"task" if where else "job"} '
            f'<code>{esc(job.id)}</code>{where} · '
            f'<span style="color:{color}; font-weight:600">{esc(view.status)}</span> · '
            f'{format_duration(view.elapsed())} · {view.ranks_text()} · '
            f'{esc(job.backend)}</div>')


def host_html(group: HostGroup) -> str:
    """The line above one host's ranks."""
    return f'<span style="{MONO}; font-weight:600">{esc(group.title)}</span>'


def info_html(view: JobView, rank: RankView) -> str:
    text = progress_text(rank)
    idle = view.idle_for(rank)
    extra = ""
    if idle is not None:
        extra = (f' <span style="color:#bc4c00">no progress for '
                 f'{format_duration(idle)}</span>')
    if rank.state in (RankState.FAILED, RankState.CRASHED, RankState.KILLED) \
            and describe_failure(rank):
        extra += f' <span style="color:#cf222e">{esc(describe_failure(rank))}</span>'
    return f'<span style="{MONO}; {NOWRAP}">{esc(text)}{extra}</span>'


def metrics_html(rank: RankView) -> str:
    return (f'<span style="{MONO}; {NOWRAP}" title="{esc(format_metrics(rank.metrics, 99))}">'
            f'{esc(format_metrics(rank.metrics))}</span>')


def failures_html(view: JobView) -> str:
    """A panel per failed rank whose output was not shown: its last log lines."""
    parts = []
    for rank in view.ranks:
        if not rank.bad:
            continue
        what = describe_failure(rank)
        title = f"{view.rank_name(rank)} {rank.state}" + (f": {what}" if what else "")
        body = ""
        if rank.log_tail:
            path = view.job.ranks[rank.rank].log if rank.rank < len(view.job.ranks) else ""
            body = (f'<div style="color:#666">last lines of its log ({esc(path)}):</div>'
                    f'<pre style="{MONO}; margin:2px 0; padding:4px; max-height:18em; '
                    f'overflow:auto; background:#fff5f5; border-left:3px solid #cf222e; '
                    f'white-space:pre-wrap">{esc(rank.log_tail)}</pre>')
        parts.append(f'<div style="margin-top:4px"><b style="color:#cf222e">'
                     f'{esc(title)}</b>{body}</div>')
    return "".join(parts)


def log_text(text: str) -> str:
    """A rank's output as HTML text: escaped, without terminal escape codes."""
    return esc(ANSI.sub("", text))


def log_view_html(rank: int, path: Path, text: str) -> str:
    """The live per-rank log view: the followed rank's newest lines, scrolled to the end."""
    body = log_text(text) if text else '<span style="color:#999">(nothing printed yet)</span>'
    return (f'<div style="{MONO}; color:#666; {NOWRAP}" title="{esc(path)}">'
            f'rank {rank}\'s output, live · last {LOG_VIEW_LINES} lines of '
            f'{esc(path.name)}</div>'
            # column-reverse: the box opens scrolled to its end, where the newest line is
            f'<div style="max-height:16em; overflow:auto; display:flex; '
            f'flex-direction:column-reverse; background:#f6f8fa; '
            f'border-left:3px solid #1f6feb">'
            f'<pre style="{MONO}; margin:0; padding:4px 6px; white-space:pre-wrap">'
            f'{body}</pre></div>')


def rank_logs_html(view: JobView, tails: dict[int, str]) -> str:
    """The last lines of every rank's log, collapsed one ``<details>`` per rank."""
    parts = []
    for rank in view.ranks:
        if rank.rank not in tails:
            continue
        text = tails[rank.rank]
        count = text.count("\n") + 1 if text else 0
        name = log_path(view.job, rank.rank).name
        what = (f"last {count} line{'s' * (count != 1)} of {name}" if count
                else f"nothing printed ({name} is empty)")
        body = (f'<pre style="{MONO}; margin:2px 0 4px 16px; padding:4px 6px; '
                f'max-height:18em; overflow:auto; background:#f6f8fa; '
                f'white-space:pre-wrap">{log_text(text)}</pre>' if text else "")
        parts.append(f'<details><summary style="{MONO}; cursor:pointer">{view.rank_name(rank)} '
                     f'{state_html(rank.state, view.label(rank))} · {what}</summary>'
                     f'{body}</details>')
    return f'<div style="margin-top:4px">{"".join(parts)}</div>' if parts else ""


def chart_svg(view: JobView, width: int = 440, height: int = 120) -> str:
    """A small line chart of rank 0's loss-like metrics; empty before any value."""
    keys = view.chart_keys()
    series = {k: view.series[k].values() for k in keys}
    points = [p for values in series.values() for p in values]
    if not points:
        return ""
    left, right, top, bottom = 56, 8, 18, 16
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    low, high = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    # a loss falling over decades is read on a log scale, else its tail looks flat
    log = low > 0 and high / low >= LOG_SCALE_SPAN
    scale = math.log10 if log else (lambda v: v)
    y0, y1 = scale(low), scale(high)
    if y1 == y0:
        pad = abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + (y1 - scale(y)) / (y1 - y0) * plot_h

    shapes, legend = [], []
    for i, (key, values) in enumerate(series.items()):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        values = _thin(values, plot_w)
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        if len(values) == 1:
            x, y = values[0]
            shapes.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" '
                          f'fill="{color}"/>')
        else:
            shapes.append(f'<polyline points="{coords}" fill="none" stroke="{color}" '
                          f'stroke-width="1.5" stroke-linejoin="round"/>')
        legend.append(f'<tspan fill="{color}">{esc(key)} {format_value(values[-1][1])}'
                      f'</tspan>')
    text = 'font-family="monospace" font-size="10" fill="#555"'
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="rank 0 metrics">'
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        f'stroke="#ddd"/>'
        f'<text x="{left}" y="12" {text}>{"  ".join(legend)} '
        f'<tspan fill="#999">(rank 0)</tspan></text>'
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end" {text}>'
        f'{esc(format_value(high))}</text>'
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" {text}>'
        f'{esc(format_value(low))}</text>'
        + (f'<text x="{left - 4}" y="{top + plot_h / 2 + 4}" text-anchor="end" {text}>'
           f'log</text>' if log else "")
        + f'<text x="{left}" y="{height - 3}" {text}>step {format_value(x0)}</text>'
        f'<text x="{left + plot_w}" y="{height - 3}" text-anchor="end" {text}>'
        f'{format_value(x1)}</text>'
        + "".join(shapes) + "</svg>")


def _thin(values: list[tuple[float, float]], limit: float) -> list[tuple[float, float]]:
    """At most about ``limit`` points (one per pixel), always keeping the last one."""
    limit = max(2, int(limit))
    if len(values) <= limit:
        return values
    stride = -(-len(values) // limit)
    kept = values[::stride]
    if kept[-1] is not values[-1]:
        kept.append(values[-1])
    return kept


def bar_html(fraction: float | None, state: str) -> str:
    """A progress bar drawn with two divs (static HTML has no widgets)."""
    color = STATE_COLORS.get(state, "#1f6feb")
    width = 0.0 if fraction is None else fraction * 100
    return (f'<div style="width:160px; height:10px; background:#eee; border-radius:2px">'
            f'<div style="width:{width:.1f}%; height:100%; background:{color}; '
            f'border-radius:2px"></div></div>')


def dashboard_html(view: JobView, logs: dict[int, str] | None = None) -> str:
    """The whole dashboard as static HTML: what the saved notebook keeps.

    ``logs``: the last lines of each rank's log, shown collapsed under the dashboard.
    """
    groups = view.host_groups()
    rows = [] if groups else [rank_row_html(view, rank) for rank in view.ranks]
    for group in groups:
        rows.append(f'<tr><td colspan="6" style="padding-top:4px">{host_html(group)}</td></tr>')
        rows += [rank_row_html(view, rank) for rank in group.ranks]
    table = ('<table style="border-collapse:collapse; margin:4px 0">'
             + "".join(rows) + "</table>")
    chart = chart_svg(view)
    folder = (f'<div style="{MONO}; color:#666">logs: {esc(view.job.dir)}</div>'
              if view.duration is not None else "")
    return (f'<div class="nbdist-dashboard" style="border:1px solid #ddd; padding:6px">'
            f'{header_html(view)}{table}{chart}{failures_html(view)}{folder}'
            f'{rank_logs_html(view, logs or {})}</div>')


def rank_row_html(view: JobView, rank: RankView) -> str:
    """One rank's row of the static dashboard's table."""
    fraction = rank.fraction()
    pct = "" if fraction is None else f"{fraction:.0%}"
    return (f'<tr><td style="{MONO}">rank {rank.rank}</td>'
            f'<td>{state_html(rank.state, view.label(rank))}</td>'
            f'<td>{bar_html(fraction, rank.state)}</td><td style="{MONO}">{pct}</td>'
            f'<td>{info_html(view, rank)}</td><td>{metrics_html(rank)}</td></tr>')


def live_fallback_text(view: JobView) -> str:
    """What stands for the live widgets where they cannot be drawn."""
    job = view.job
    return (f"nbdist job {job.id} running… ({view.ranks_text()}, {job.backend}, "
            f"started {time.strftime('%H:%M:%S', time.localtime(job.started))}; the "
            f"live view needs the kernel and ipywidgets; logs: {job.dir})")


def live_fallback_html(view: JobView) -> str:
    """The HTML beside the live widgets: shown by frontends without them, and kept in a
    notebook saved mid-run, where the widgets' models are gone after a reload."""
    job = view.job
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.started))
    return (f'<div class="nbdist-live" style="border:1px solid #ddd; '
            f'padding:6px"><div style="{MONO}"><b>nbdist</b> job <code>{esc(job.id)}'
            f'</code> · <span style="color:{JOB_COLORS[JobState.RUNNING]}; font-weight:600">'
            f'running…</span> · {view.ranks_text()} · {esc(job.backend)} · started '
            f'{esc(started)}</div><div style="{MONO}; color:#666">the live view needs '
            f'the kernel and ipywidgets; when the job ends the final dashboard replaces '
            f'this. Logs: {esc(job.dir)}</div></div>')


def dashboard_text(view: JobView) -> str:
    """The dashboard as text: a one-line summary, a line per rank, failed ranks' logs."""
    lines = [view.summary()]
    lines += ["  " + view.rank_line(rank) for rank in view.ranks]
    for rank in view.ranks:
        if rank.bad and rank.log_tail:
            lines.append(f"  --- last lines of {view.rank_name(rank)}'s log ---")
            lines += ["  " + line for line in rank.log_tail.splitlines()]
    return "\n".join(lines)
