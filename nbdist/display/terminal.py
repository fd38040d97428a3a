"""The terminal dashboard (rich ``Live``), for a script or IPython in a terminal.

::

    nbdist job 1a2b · running · 0:42 · 2 ranks · gloo
     rank 0 running  ━━━━━━╸━━━━━━━  45% epoch 2/3 › train 45/100 (45%) 12 it/s  loss=0.31
     rank 1 running  ━━━━━━╸━━━━━━━  45% epoch 2/3 › train 45/100 (45%) 12 it/s  loss=0.30
     loss █▆▅▄▃▃▂▂▁▁ 0.31  (rank 0)
     rank 0 ▸ 45%|████▌     | 45/100      ← the line rank 0 is redrawing with \\r

Finished lines of rank 0's output scroll above the dashboard as ordinary terminal
text; the line it is still redrawing with ``\\r`` (tqdm) stays in the dashboard, so
it updates in place and only its final state reaches the scrollback. The dashboard is
redrawn at most ``1 / RENDER_INTERVAL`` times a second, from the supervising thread
only (no refresh thread: nothing else reads the state while it changes).

On several hosts, a line ``host gpu2 — ranks 2-3`` heads each host's rows.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Callable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from nbdist.display.base import RENDER_INTERVAL, SHOW_AFTER, Display
from nbdist.display.state import (LOG_SCALE_SPAN, JobView, LineBuffer, RankView,
                                  describe_failure, format_duration, format_metrics,
                                  format_value, progress_text)
from nbdist.states import EventKind, JobState, RankState

if TYPE_CHECKING:
    from nbdist.protocol import Event
    from nbdist.job import Job

CLOCK_INTERVAL = 1.0
BAR_WIDTH = 24
SPARK_WIDTH = 40
SPARKS = "▁▂▃▄▅▆▇█"

STATE_STYLES = {
    RankState.PENDING: "dim", RankState.STARTING: "dim", RankState.JOINING: "dim",
    RankState.READY: "blue", RankState.RUNNING: "blue", RankState.DONE: "green",
    RankState.FAILED: "bold red", RankState.CRASHED: "bold red",
    RankState.KILLED: "yellow", RankState.STOPPED: "yellow",
}
JOB_STYLES = {JobState.RUNNING: "bold blue", JobState.SUCCEEDED: "bold green",
              JobState.FAILED: "bold red", JobState.TIMEOUT: "bold yellow",
              JobState.INTERRUPTED: "bold yellow"}
BAR_STYLES = {RankState.DONE: "green", RankState.FAILED: "red", RankState.CRASHED: "red",
              RankState.KILLED: "yellow", RankState.STOPPED: "yellow"}


class TerminalDisplay(Display):
    def __init__(self, *, all_ranks: bool = False, console: Console | None = None,
                 clock: Callable[[], float] = time.monotonic, show_after: float = SHOW_AFTER):
        super().__init__(all_ranks=all_ranks)
        self.console = console or Console()
        self._clock = clock
        self._show_after = show_after
        self._began = 0.0
        self._over = False  # stopped: nothing is drawn any more
        self.view: JobView | None = None
        self._live: Live | None = None
        self._lines: dict[int, LineBuffer] = {}
        self._dirty = False
        self._last_render = float("-inf")

    # --- the Display interface -------------------------------------------------------
    def start(self, job: "Job") -> None:
        streamed = set(range(job.world_size)) if self.all_ranks else {0}
        self.view = JobView(job, streamed=streamed, clock=self._clock)
        self._lines = {r: LineBuffer() for r in sorted(streamed)}
        self._began = self._clock()
        if self._show_after <= 0:
            self._show()

    def _show(self) -> None:
        """Start drawing the dashboard (a job over sooner shows its output only)."""
        self._live = Live(self.render(), console=self.console, auto_refresh=False,
                          transient=False)
        self._live.start()
        self._last_render = self._clock()

    def notice(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)  # under the dashboard, in the output

    def output(self, rank: int, text: str) -> None:
        buffer = self._lines.get(rank)
        if buffer is None:
            return
        finished = buffer.feed(text)
        if finished:
            self._print(rank, finished)
        self._dirty = True
        self.tick()

    def event(self, event: "Event") -> None:
        if self.view is None or not self.view.apply(event):
            return
        self._dirty = True
        if self._live is not None and event.kind == EventKind.STATUS \
                and self.view.ranks[event.rank].bad:
            self._refresh()  # a failure is shown at once
        else:
            self.tick()

    def tick(self) -> None:
        if self._live is None:
            if (self.view is None or self._over
                    or self._clock() - self._began < self._show_after):
                return
            self._show()
        since = self._clock() - self._last_render
        if (self._dirty and since >= RENDER_INTERVAL) or since >= CLOCK_INTERVAL:
            self._refresh()

    def stop(self, job: "Job") -> None:
        for rank, buffer in self._lines.items():
            rest = buffer.flush()
            if rest:
                self._print(rank, rest)
        self._lines = {}
        self._over = True
        if self._live is None:  # over before it was worth a dashboard
            return
        self.view.finish(job)
        self._refresh()
        self._live.stop()
        self._live = None

    def abandon(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    # --- drawing ---------------------------------------------------------------------
    def _print(self, rank: int, lines: list[str]) -> None:
        prefix = f"[rank {rank}] " if self.all_ranks else ""
        text = Text("\n").join(Text.from_ansi(prefix + line) for line in lines)
        self.console.print(text, soft_wrap=True, highlight=False)

    def _refresh(self) -> None:
        self._last_render = self._clock()
        self._dirty = False
        self._live.update(self.render(), refresh=True)

    def render(self) -> RenderableType:
        """The dashboard as it stands (tests print it to a recording console)."""
        view = self.view
        parts: list[RenderableType] = [self._header(view)]
        # one Text per rank, padded by hand: a rich Table costs ~2 ms a row to lay out
        groups = view.host_groups()
        if not groups:
            parts += [self._row(view, rank) for rank in view.ranks]
        for group in groups:
            parts.append(Text(f" {group.title}", style="bold", no_wrap=True,
                              overflow="ellipsis"))
            parts += [self._row(view, rank) for rank in group.ranks]
        spark = self._sparkline(view)
        if spark is not None:
            parts.append(spark)
        for rank in view.ranks:
            if rank.bad:
                parts.append(self._failure(view, rank))
        for rank, buffer in self._lines.items():
            if buffer.current:
                parts.append(Text.assemble((f" rank {rank} ▸ ", "dim"),
                                           Text.from_ansi(buffer.current),
                                           no_wrap=True, overflow="ellipsis"))
        return Group(*parts)

    def _header(self, view: JobView) -> Text:
        return Text.assemble(
            ("nbdist ", "bold"), (view.title, "cyan"), " · ",
            (view.status, JOB_STYLES.get(view.status, "")), " · ",
            format_duration(view.elapsed()), f" · {view.ranks_text()} · ",
            view.job.backend)

    def _row(self, view: JobView, rank: RankView) -> Text:
        fraction = rank.fraction()
        row = Text(f" rank {rank.rank:<{len(str(len(view.ranks) - 1))}} ", no_wrap=True,
                   overflow="ellipsis")
        row.append(f"{view.label(rank):<8}", STATE_STYLES.get(rank.state, ""))
        row.append(" ")
        row.append_text(bar_text(fraction, BAR_STYLES.get(rank.state, "blue")))
        row.append("      " if fraction is None else f" {fraction:>4.0%} ")
        row.append(progress_text(rank))
        idle = view.idle_for(rank)
        if idle is not None:
            row.append(f"  no progress for {format_duration(idle)}", style="yellow")
        metrics = format_metrics(rank.metrics)
        if metrics:
            row.append("  ")
            row.append(metrics, style="cyan")
        return row

    def _sparkline(self, view: JobView) -> Text | None:
        keys = view.chart_keys()
        if not keys:
            return None
        line = Text(" ")
        for key in keys:
            values = [v for _, v in view.series[key].values()]
            line.append(f"{key} ", style="bold")
            line.append(sparkline(values), style="magenta")
            line.append(f" {format_value(values[-1])}  ")
        line.append("(rank 0)", style="dim")
        return line

    def _failure(self, view: JobView, rank: RankView) -> Panel:
        what = describe_failure(rank)
        title = f"{view.rank_name(rank)} {rank.state}" + (f": {what}" if what else "")
        body = Text.from_ansi(rank.log_tail) if rank.log_tail else Text(
            "(its output is above)" if rank.rank in view.streamed else "(no output)",
            style="dim")
        return Panel(body, title=title, title_align="left", border_style="red",
                     expand=False)


def bar_text(fraction: float | None, style: str, width: int = BAR_WIDTH) -> Text:
    """``━━━━━━╸━━━━━`` as rich draws it, filled to ``fraction``."""
    halves = round((fraction or 0.0) * width * 2)
    full, half = divmod(halves, 2)
    bar = Text("━" * full + "╸" * half, style=style)
    bar.append("━" * (width - full - half), style="grey23")
    return bar


def sparkline(values: list[float], width: int = SPARK_WIDTH) -> str:
    """``▇▆▅▃▂▁`` — the last values, averaged down to ``width`` characters."""
    if not values:
        return ""
    if len(values) > width:
        # the most recent history, in width buckets
        values = values[-width * 8:]
        size = len(values) / width
        values = [sum(chunk) / len(chunk) for chunk in
                  (values[int(i * size):int((i + 1) * size)] for i in range(width))
                  if chunk]
    low, high = min(values), max(values)
    if low > 0 and high / low >= LOG_SCALE_SPAN:  # a loss falling over decades
        values = [math.log10(v) for v in values]
        low, high = min(values), max(values)
    if high == low:
        return SPARKS[len(SPARKS) // 2] * len(values)
    scale = (len(SPARKS) - 1) / (high - low)
    return "".join(SPARKS[round((v - low) * scale)] for v in values)
