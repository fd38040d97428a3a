"""The notebook dashboard (ipywidgets): one per job, updated live, static at the end.

::

    nbdist job 1a2b · running · 0:42 · 2 ranks · gloo
    rank 0  running  [██████░░░░]  epoch 2/3 › train 45/100 (45%) 12 it/s ETA 0:05  loss=0.31
    rank 1  running  [██████░░░░]  epoch 2/3 › train 45/100 (45%) 12 it/s ETA 0:05  loss=0.30
    ╲__ loss chart of rank 0 (SVG)
    rank N failed: ... and the last lines of its log, when one fails
    log of rank  [none] [0] [1]      ← pick a rank: its newest lines, followed live

On several hosts, a line ``host gpu2 — ranks 2-3`` heads each host's rows; the rows
are rearranged when a rank reports a host other than the one it was planned on.

The log view reads only the picked rank's log (``rank-N.log``), at most every
``RENDER_INTERVAL``, from where it last stopped, and keeps its last ``LOG_VIEW_LINES``
lines. The frontend's click reaches the kernel mid-cell only where widget messages
come on a subshell (JupyterLab 4.4+ with ipykernel 7+); elsewhere only after the cell.

Rank 0's output goes to the cell's own output below the dashboard, as if printed
there: the frontend redraws ``\\r`` progress lines (tqdm) in place, and the text is
saved with the notebook, none of it lost. While the job runs, the widgets' display
also carries an HTML and a text line saying which job runs, for frontends without
widgets and for a notebook saved mid-run. When the job ends, the widgets are
replaced in place (same display id) by a static HTML copy of the final dashboard with
a text summary, so a saved notebook shows the outcome without widget state; the copy
keeps the last lines of every rank's log, collapsed one per rank.

The kernel stays "busy" in JupyterLab for the whole job although the widgets make
the frontend send control requests mid-cell: see ``busy.py``.
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, TextIO

import ipywidgets as widgets

from nbdist.display import busy
from nbdist.display import html as h
from nbdist.display.base import RENDER_INTERVAL, SHOW_AFTER, Display
from nbdist.display.plain import PlainDisplay
from nbdist.display.state import (LOG_TAIL_LINES, JobView, LogTail, RankView, log_path,
                                  log_tail)
from nbdist.states import EventKind, RankState

if TYPE_CHECKING:
    from nbdist.protocol import Event
    from nbdist.job import Job

CHART_INTERVAL = 0.5  # seconds between redraws of the chart (a few KB of SVG each)
CLOCK_INTERVAL = 1.0  # the elapsed time shows whole seconds
PICKER_BUTTONS_MAX = 8  # more ranks than this are picked from a drop-down list
NO_RANK = -1  # the picker's "none": no log followed


class Publisher(Protocol):
    """Where the dashboard is shown: IPython's display machinery, or a test's recorder.

    ``begin`` comes before the first widget is created, ``end`` after the last is
    closed (or when the display is abandoned).
    """

    def begin(self) -> None: ...

    def show(self, bundle: dict, display_id: str) -> None: ...

    def update(self, bundle: dict, display_id: str) -> None: ...

    def end(self) -> None: ...


class IPythonPublisher:
    def begin(self) -> None:
        # opening widget comms makes JupyterLab show the kernel idle (see busy.py)
        busy.hold()

    def end(self) -> None:
        busy.release()

    def show(self, bundle: dict, display_id: str) -> None:
        from IPython.display import display

        display(bundle, raw=True, display_id=display_id)

    def update(self, bundle: dict, display_id: str) -> None:
        from IPython.display import update_display

        update_display(bundle, raw=True, display_id=display_id)


@dataclass
class RankRow:
    """The widgets of one rank's row; tests read their values."""

    name: widgets.HTML
    state: widgets.HTML
    progress: widgets.FloatProgress  # percent of the active bar, 0..100
    info: widgets.HTML
    metrics: widgets.HTML
    box: widgets.HBox

    @classmethod
    def create(cls, rank: int) -> "RankRow":
        name = widgets.HTML(f'<span style="{h.MONO}">rank {rank}</span>',
                            layout=widgets.Layout(width="56px"))
        state = widgets.HTML(h.state_html(RankState.PENDING),
                             layout=widgets.Layout(width="64px"))
        progress = widgets.FloatProgress(value=0.0, min=0.0, max=100.0,
                                         layout=widgets.Layout(width="180px"))
        # one line per rank: the progress text keeps its width, the metrics get what
        # is left and are cut with an ellipsis (their full text is the tooltip)
        info = widgets.HTML(layout=widgets.Layout(flex="0 0 auto", margin="0 12px 0 6px"))
        metrics = widgets.HTML(layout=widgets.Layout(flex="1 1 0", min_width="0",
                                                     overflow="hidden"))
        box = widgets.HBox([name, state, progress, info, metrics],
                           layout=widgets.Layout(align_items="center", width="100%"))
        return cls(name, state, progress, info, metrics, box)

    def update(self, view: JobView, rank: RankView) -> None:
        self.state.value = h.state_html(rank.state, view.label(rank))
        fraction = rank.fraction()
        self.progress.value = 0.0 if fraction is None else round(fraction * 100, 2)
        self.progress.bar_style = _BAR_STYLES.get(rank.state, "")
        self.info.value = h.info_html(view, rank)
        self.metrics.value = h.metrics_html(rank)


@dataclass
class LogView:
    """The per-rank log view: a rank picker above the followed rank's newest lines."""

    picker: widgets.ToggleButtons | widgets.Dropdown  # value: a rank, or NO_RANK
    label: widgets.HTML
    bar: widgets.HBox  # the label and the picker
    area: widgets.HTML  # the followed rank's lines; hidden while none is
    box: widgets.VBox

    @classmethod
    def create(cls, world_size: int) -> "LogView":
        options = [("none", NO_RANK)] + [(str(r), r) for r in range(world_size)]
        if world_size <= PICKER_BUTTONS_MAX:
            picker = widgets.ToggleButtons(
                options=options, value=NO_RANK,
                tooltips=["follow no rank's log"]
                + [f"follow rank {r}'s output as it runs" for r in range(world_size)],
                style={"button_width": "56px"})
        else:
            picker = widgets.Dropdown(options=options, value=NO_RANK,
                                      layout=widgets.Layout(width="96px"))
        picker.add_class("nbdist-log-picker")
        _hear_clicks_mid_cell(picker)
        label = widgets.HTML(f'<span style="{h.MONO}">log of rank</span>',
                             layout=widgets.Layout(width="88px"))
        area = widgets.HTML(layout=widgets.Layout(display="none"))
        area.add_class("nbdist-log")
        bar = widgets.HBox([label, picker], layout=widgets.Layout(align_items="center"))
        box = widgets.VBox([bar, area], layout=widgets.Layout(margin="4px 0 0 0"))
        return cls(picker, label, bar, area, box)


def _hear_clicks_mid_cell(widget: widgets.Widget) -> None:
    """Let the frontend's changes to ``widget`` reach the kernel while the cell runs.

    JupyterLab sends them on a subshell, handled by a thread of its own; but ipykernel
    (7.4) routes a comm's incoming messages to the subshell that last wrote on that
    comm: for a widget created here, the cell's main shell, which is busy until the
    job ends. Forgetting that route sends them back to the subshell they came on.
    """
    comm = getattr(widget, "comm", None)
    lock = getattr(comm, "_reply_subshell_lock", None)
    if lock is None:  # an ipykernel without that routing, or no kernel at all
        return
    with lock:
        comm.__dict__.pop("_reply_subshell_id", None)


_BAR_STYLES = {RankState.DONE: "success", RankState.FAILED: "danger",
               RankState.CRASHED: "danger", RankState.KILLED: "warning",
               RankState.STOPPED: "warning"}


class NotebookDisplay(Display):
    def __init__(self, *, all_ranks: bool = False,
                 clock: Callable[[], float] = time.monotonic,
                 stream: TextIO | None = None, publisher: Publisher | None = None,
                 show_after: float = SHOW_AFTER):
        super().__init__(all_ranks=all_ranks)
        self._clock = clock
        self._show_after = show_after
        self._began = 0.0
        self._shown = False  # the dashboard is on screen (after ``show_after``)
        self._text = PlainDisplay(all_ranks=all_ranks, stream=stream)  # routes output
        self._publisher = publisher or IPythonPublisher()
        self.display_id = f"nbdist-{uuid.uuid4().hex}"
        self.view: JobView | None = None
        self.rows: list[RankRow] = []
        self.host_headers: dict[str | None, widgets.HTML] = {}  # made when first shown
        self._arranged: list | None = None  # the host groups the box shows
        self._dirty = False
        self._chart_dirty = False
        self._last_render = float("-inf")
        self._last_chart = float("-inf")
        self._closed = False
        self._log: LogTail | None = None  # the followed rank's log
        self._log_rank = NO_RANK
        self._log_dirty = False
        self._last_log_read = float("-inf")

    # --- the Display interface -------------------------------------------------------
    def start(self, job: "Job") -> None:
        streamed = set(range(job.world_size)) if self.all_ranks else {0}
        self.view = JobView(job, streamed=streamed, clock=self._clock)
        self._began = self._clock()
        if self._show_after <= 0:
            self._show()

    def _show(self) -> None:
        """Put the dashboard on screen; what happened before is in the view already."""
        self._shown = True
        job = self.view.job
        self._publisher.begin()
        self.header = widgets.HTML()
        self.rows = [RankRow.create(r.rank) for r in job.ranks]
        self.chart = widgets.HTML(layout=widgets.Layout(display="none"))
        self.failures = widgets.HTML()
        self.logs = LogView.create(job.world_size)
        self.box = widgets.VBox(
            layout=widgets.Layout(border="1px solid #ddd", padding="4px 8px", width="100%"))
        self._chart_dirty = True  # metrics may have come before it showed
        self._render()
        bundle = dict(self.box._repr_mimebundle_() or {})
        # what a frontend without widgets shows while the job runs, and what a notebook
        # saved mid-run shows once the widgets' models are gone (nbviewer, a reload)
        bundle["text/html"] = h.live_fallback_html(self.view)
        bundle["text/plain"] = h.live_fallback_text(self.view)
        self._publisher.show(bundle, self.display_id)

    def notice(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)  # under the dashboard, in the output

    def output(self, rank: int, text: str) -> None:
        self._text.output(rank, text)

    def event(self, event: "Event") -> None:
        if self.view is None or not self.view.apply(event):
            return
        if not self._shown:
            self.tick()
            return
        self._dirty = True
        if event.kind == EventKind.METRICS and event.rank == 0:
            self._chart_dirty = True
        if event.kind == EventKind.STATUS and self.view.ranks[event.rank].bad:
            self._render()  # a failure is shown at once
        else:
            self.tick()

    def tick(self) -> None:
        if self.view is None or self._closed:
            return
        now = self._clock()
        if not self._shown:
            if now - self._began < self._show_after:
                return
            self._show()
        if now - self._last_log_read >= RENDER_INTERVAL:
            self._last_log_read = now
            self._follow_log()
        since = now - self._last_render
        if ((self._dirty or self._log_dirty) and since >= RENDER_INTERVAL) \
                or since >= CLOCK_INTERVAL:
            self._render()

    def stop(self, job: "Job") -> None:
        self._text.flush_output()
        if self.view is None or self._closed:
            return
        if not self._shown:  # over before it was worth a dashboard: its output is shown
            self._closed = True
            return
        self.view.finish(job)
        self._chart_dirty = True
        self._follow_log()
        self._render(final=True)
        self._closed = True
        tails = {r: log_tail(log_path(job, r), LOG_TAIL_LINES) for r in range(job.world_size)}
        self._publisher.update({"text/html": h.dashboard_html(self.view, tails),
                                "text/plain": h.dashboard_text(self.view)},
                               self.display_id)
        self._close_widgets()
        self._publisher.end()

    def abandon(self) -> None:
        self._closed = True
        if self._shown:
            self._publisher.end()  # idempotent: stop() may have called it already

    # --- drawing ---------------------------------------------------------------------
    def _render(self, final: bool = False) -> None:
        view = self.view
        now = self._clock()
        self._last_render = now
        self._dirty = False
        self.header.value = h.header_html(view)
        self._arrange()
        for row, rank in zip(self.rows, view.ranks):
            row.update(view, rank)
        if self._chart_dirty and (final or now - self._last_chart >= CHART_INTERVAL):
            self._chart_dirty = False
            self._last_chart = now
            svg = h.chart_svg(view)
            self.chart.value = svg
            self.chart.layout.display = "" if svg else "none"
        self.failures.value = h.failures_html(view)
        if self._log_dirty:
            self._log_dirty = False
            area = self.logs.area
            if self._log is None:
                area.layout.display = "none"
                area.value = ""
            else:
                area.value = h.log_view_html(self._log_rank, self._log.path, self._log.text)
                area.layout.display = ""

    def _arrange(self) -> None:
        """Lay the rows out under their hosts' headers, when the grouping changed."""
        groups = self.view.host_groups()
        arranged = [(g.host, [r.rank for r in g.ranks]) for g in groups]
        if arranged == self._arranged:
            return
        self._arranged = arranged
        rows = [] if groups else [row.box for row in self.rows]
        for group in groups:
            header = self.host_headers.get(group.host)
            if header is None:
                header = self.host_headers[group.host] = widgets.HTML()
            header.value = h.host_html(group)
            rows += [header, *(self.rows[r.rank].box for r in group.ranks)]
        self.box.children = [self.header, *rows, self.chart, self.failures, self.logs.box]

    def _follow_log(self) -> None:
        """Read what the picked rank appended to its log (only that rank's)."""
        # the picker's value is set by the frontend's comm, on another thread (a
        # subshell): only read here, so the widgets change from this thread alone
        rank = self.logs.picker.value
        if rank is None:
            rank = NO_RANK
        if rank != self._log_rank:
            self._log_rank = rank
            self._log = None if rank == NO_RANK else LogTail(log_path(self.view.job, rank))
            self._log_dirty = True
        if self._log is not None and self._log.read():
            self._log_dirty = True

    def _close_widgets(self) -> None:
        # the static copy replaced them on screen; free their models in the frontend
        logs = self.logs
        parts = [self.box, self.header, self.chart, self.failures,
                 logs.box, logs.bar, logs.label, logs.picker, logs.area,
                 *self.host_headers.values()]
        for row in self.rows:
            parts += [row.box, row.name, row.state, row.progress, row.info, row.metrics]
        for widget in parts:
            for owned in (getattr(widget, "style", None), widget.layout, widget):
                if owned is not None:
                    owned.close()
