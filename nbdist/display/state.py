"""What a display knows about a running job, independent of how it is drawn.

Every display folds the same event stream (``channel.py``) into a :class:`JobView`:
per rank its state, its host, its progress bars (from ``track``), its latest metrics
(from ``report``), and rank 0's metric history for the loss chart. The drawing code
(``plain.py``, ``terminal.py``, ``notebook.py``) only reads it, so the three show the
same numbers and are tested against the same recorded events.

Hosts: a job on several hosts (``job.hosts``) shows its ranks grouped by host
(:meth:`JobView.host_groups`). Until a rank names its host (its first STATUS event) it
is counted on the host it was planned for; torch's rendezvous decides where it lands.
A job on one machine has no groups, and its displays show no hosts.

Times: a bar's rate is computed from the worker's own timestamps (the event times),
so polling delays do not distort it; "elapsed" and "idle for" use the display's clock,
which tests inject.
"""

from __future__ import annotations

import codecs
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from nbdist.jobdir import JobDir
from nbdist.states import FINAL, EventKind, JobState, RankState

if TYPE_CHECKING:
    from nbdist.protocol import Event
    from nbdist.job import Job

LOG_TAIL_LINES = 15
LOG_VIEW_LINES = 200  # lines a followed log keeps (the notebook's per-rank view)
LOG_READ_MAX = 64 * 1024  # bytes read from a log at once: its end, when it grew more
LOG_LINE_MAX = 1000  # characters of one log line kept, the rest cut off
IDLE_AFTER = 30.0  # seconds without progress before an open bar is shown as idle
SERIES_MAX_POINTS = 2000  # per metric, before the history is thinned to half
SERIES_MAX_KEYS = 8
LOG_SCALE_SPAN = 30.0  # max / min of a positive series from which charts use a log scale

# CRASHED / KILLED come from the Job record (torchrun's agent saw the exit, or nbdist
# killed a rank that had not finished: timeout, interrupt, a peer's death); STOPPED is
# what a display shows for a rank the record leaves unfinished (one that never reported).
BAD_STATES = (RankState.FAILED, RankState.CRASHED)
# a warm pool's rank works on the task, then waits for the next one
POOL_LABELS = {RankState.RUNNING: "busy", RankState.DONE: "idle", RankState.READY: "idle"}
ENDED_EARLY = (RankState.FAILED, RankState.CRASHED, RankState.KILLED, RankState.STOPPED)


@dataclass
class Bar:
    """One ``track()`` loop of one rank."""

    id: int
    desc: str | None
    total: int | None
    n: int = 0
    opened: float = 0.0  # worker time of the bar's first event
    updated: float = 0.0  # worker time of its latest event
    advanced: float = 0.0  # display clock when ``n`` last changed
    closed: bool = False
    seq: int = 0  # order of the latest event among all bars of the job

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return min(1.0, max(0.0, self.n / self.total))

    @property
    def rate(self) -> float | None:
        """Iterations per second since the bar opened, or None before any."""
        seconds = self.updated - self.opened
        if self.n <= 0 or seconds <= 0:
            return None
        return self.n / seconds

    @property
    def eta(self) -> float | None:
        rate = self.rate
        if self.closed or rate is None or self.total is None:
            return None
        return max(0.0, (self.total - self.n) / rate)

    def count_text(self) -> str:
        if self.total is None:
            return f"{self.n}"
        return f"{self.n}/{self.total}"


@dataclass
class RankView:
    rank: int
    host: str | None = None  # as the rank reported it, else where it was planned
    state: RankState = RankState.PENDING
    exitcode: int | None = None
    error: str | None = None  # the exception's type name, when the rank reported one
    bars: dict[int, Bar] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    log_tail: str | None = None  # shown when the rank failed

    @property
    def final(self) -> bool:
        return self.state in FINAL

    @property
    def bad(self) -> bool:
        return self.state in BAD_STATES

    def active_bar(self) -> Bar | None:
        """The bar to show: the innermost open one, else the one that closed last.

        A rank that stopped early shows its innermost bar, even though unwinding
        closed them all: where it was when it failed is what matters.
        """
        if not self.bars:
            return None
        open_bars = [b for b in self.bars.values() if not b.closed]
        if open_bars:
            return max(open_bars, key=lambda b: b.id)
        if self.state in ENDED_EARLY:
            return max(self.bars.values(), key=lambda b: b.id)
        return max(self.bars.values(), key=lambda b: b.seq)

    def outer_bars(self) -> list[Bar]:
        """The bars enclosing the active one (``epoch`` around ``train``), outermost first.

        A bar that closed before a later one opened is dropped then (``_progress``),
        so every bar left with a smaller id was open when the active one opened.
        """
        active = self.active_bar()
        if active is None:
            return []
        return sorted((b for b in self.bars.values() if b.id < active.id),
                      key=lambda b: b.id)

    def progress_label(self) -> str:
        """``epoch 2/3 › train`` — where the rank is, without the active bar's count."""
        active = self.active_bar()
        if active is None:
            return ""
        parts = []
        for bar in self.outer_bars():
            # an outer loop is *inside* iteration n+1 while its inner bar runs
            current = bar.n + 1 if bar.total is None else min(bar.n + 1, bar.total)
            of = f"/{bar.total}" if bar.total is not None else ""
            parts.append(f"{bar.desc or 'loop'} {current}{of}")
        parts.append(active.desc or "progress")
        return " › ".join(parts)

    def fraction(self) -> float | None:
        """Fill of this rank's progress bar; a rank that is done without bars is full."""
        bar = self.active_bar()
        if bar is not None and bar.fraction is not None:
            return bar.fraction
        if self.state == RankState.DONE:
            return 1.0
        return None if bar is None else 0.0


@dataclass
class HostGroup:
    """The ranks of one host, in rank order; ``host`` None: not known yet."""

    host: str | None
    ranks: list[RankView]

    @property
    def title(self) -> str:
        """``host gpu2 — ranks 2-3``."""
        return f"host {self.host or '?'} — {format_ranks([r.rank for r in self.ranks])}"


class Series:
    """A bounded history of one metric: (step, value), thinned to half when full."""

    def __init__(self, max_points: int = SERIES_MAX_POINTS):
        self.max_points = max_points
        self.points: list[tuple[float, float]] = []
        self.latest: tuple[float, float] | None = None
        self._stride = 1  # keep every stride-th value once thinned
        self._count = 0

    def add(self, step: float, value: float) -> None:
        self.latest = (step, value)
        self._count += 1
        if self._count % self._stride:
            return
        self.points.append(self.latest)
        if len(self.points) > self.max_points:
            self.points = self.points[1::2]
            self._stride *= 2

    def values(self) -> list[tuple[float, float]]:
        """The kept points, ending with the latest value."""
        if self.latest is not None and (not self.points or self.points[-1] is not self.latest):
            return self.points + [self.latest]
        return list(self.points)


class JobView:
    """The state of one job as the events so far describe it."""

    def __init__(self, job: "Job", *, streamed: set[int] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.job = job
        self.clock = clock
        self.streamed = streamed if streamed is not None else {0}
        self.ranks = [RankView(r.rank, host=r.host or planned_host(job, r.rank))
                      for r in job.ranks]
        self.status = JobState.RUNNING
        self.started = clock()
        self.ended: float | None = None
        self.duration: float | None = None
        self.series: dict[str, Series] = {}  # rank 0's numeric metrics
        self._metric_events = 0
        self._seq = 0

    # --- folding events -------------------------------------------------------------
    def apply(self, event: "Event") -> bool:
        """Fold one event in; False if it changes nothing shown (heartbeats, strays)."""
        if not 0 <= event.rank < len(self.ranks):
            return False
        rank = self.ranks[event.rank]
        if event.kind == EventKind.STATUS:
            return self._status(rank, event)
        if event.kind == EventKind.PROGRESS:
            return self._progress(rank, event)
        if event.kind == EventKind.METRICS:
            return self._metrics(rank, event)
        return False

    def _status(self, rank: RankView, event: "Event") -> bool:
        status = event.body
        rank.state = status.state
        if status.host:
            rank.host = status.host
        if status.exitcode is not None:
            rank.exitcode = status.exitcode
        if status.error:
            rank.error = status.error
        if rank.state == RankState.DONE:
            rank.exitcode = 0
        if rank.bad:
            self._read_tail(rank)
        return True

    def _progress(self, rank: RankView, event: "Event") -> bool:
        progress = event.body
        bar_id = progress.bar
        bar = rank.bars.get(bar_id)
        now = self.clock()
        if bar is None:
            bar = rank.bars[bar_id] = Bar(bar_id, progress.desc, progress.total,
                                          opened=event.time, updated=event.time,
                                          advanced=now)
            # a new loop at the same depth replaces the finished ones before it
            for old in [b for b in rank.bars.values() if b.closed and b.id < bar_id]:
                del rank.bars[old.id]
        if progress.n != bar.n:
            bar.advanced = now
        bar.n = progress.n
        bar.total = progress.total if progress.total is not None else bar.total
        bar.updated = event.time
        bar.closed = progress.closed
        self._seq += 1
        bar.seq = self._seq
        return True

    def _metrics(self, rank: RankView, event: "Event") -> bool:
        values = event.body.values or {}
        rank.metrics.update(values)
        if rank.rank == 0:
            self._metric_events += 1
            step = event.body.step or self._metric_events
            for key, value in values.items():
                if not _is_number(value):
                    continue
                series = self.series.get(key)
                if series is None:
                    if len(self.series) >= SERIES_MAX_KEYS:
                        continue
                    series = self.series[key] = Series()
                series.add(step, float(value))
        return True

    def finish(self, job: "Job") -> None:
        """Take the final outcome from the job record (crashes only it knows about)."""
        self.status = job.status
        self.duration = job.duration
        self.ended = self.clock()
        for rank, status in zip(self.ranks, job.ranks):
            if status.state in (RankState.CRASHED, RankState.KILLED):
                rank.state = status.state
            elif not rank.final:
                rank.state = RankState.DONE if status.state == RankState.DONE \
                    else RankState.STOPPED
            if status.exitcode is not None:
                rank.exitcode = status.exitcode
            if status.host:  # what a display started late (a fallback) did not see
                rank.host = status.host
            if rank.bad:
                self._read_tail(rank)  # again: the log may have grown since

    def _read_tail(self, rank: RankView) -> None:
        if rank.rank in self.streamed or rank.rank >= len(self.job.ranks):
            return  # its output is on screen already
        rank.log_tail = log_tail(Path(self.job.ranks[rank.rank].log), LOG_TAIL_LINES)

    # --- derived values ---------------------------------------------------------------
    def elapsed(self) -> float:
        if self.duration is not None:
            return self.duration
        return self.clock() - self.started

    def idle_for(self, rank: RankView) -> float | None:
        """Seconds since the rank's open bar last advanced, when that is long."""
        bar = rank.active_bar()
        if rank.final or bar is None or bar.closed:
            return None
        idle = self.clock() - bar.advanced
        return idle if idle >= IDLE_AFTER else None

    def host_groups(self) -> list[HostGroup]:
        """The ranks by host: ``job.hosts`` in order, then hosts only the ranks named.

        Empty unless the ranks are on more than one host: a job on one machine (or
        whose hosts are not known yet) is shown without hosts.
        """
        by_host: dict[str | None, list[RankView]] = {h: [] for h in self.job.hosts or []}
        for rank in self.ranks:
            by_host.setdefault(rank.host, []).append(rank)
        groups = [HostGroup(host, ranks) for host, ranks in by_host.items() if ranks]
        if sum(g.host is not None for g in groups) < 2:
            return []
        return sorted(groups, key=lambda g: g.host is None)  # the unknown last

    def rank_name(self, rank: RankView) -> str:
        """``rank 2``, or ``rank 2 @gpu2`` when the job runs on several hosts."""
        if rank.host and self.host_groups():
            return f"rank {rank.rank} @{rank.host}"
        return f"rank {rank.rank}"

    def ranks_text(self) -> str:
        """``4 ranks``, or ``4 ranks on 2 hosts``."""
        hosts = len(self.host_groups())
        return f"{len(self.ranks)} ranks" + (f" on {hosts} hosts" if hosts else "")

    def chart_keys(self) -> list[str]:
        """Rank 0's metrics worth plotting: every ``*loss*``, else the first reported."""
        keys = [k for k in self.series if "loss" in k.lower()]
        return keys[:3] or list(self.series)[:1]

    @property
    def title(self) -> str:
        """``job 1a2b``, or for a warm pool's task ``task 1a2b on pool 3c4d``."""
        pool = getattr(self.job, "pool", None)
        return f"task {self.job.id} on pool {pool}" if pool else f"job {self.job.id}"

    def label(self, rank: RankView) -> str:
        """A rank's state as shown: a pool's ranks are busy with the task, then idle."""
        if getattr(self.job, "pool", None):
            return POOL_LABELS.get(rank.state, rank.state)
        return rank.state

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rank in self.ranks:
            label = self.label(rank)
            counts[label] = counts.get(label, 0) + 1
        return counts

    def summary(self) -> str:
        """One line: ``job 1a2b succeeded in 12.3s: 2/2 ranks done``."""
        counts = ", ".join(f"{n} {state}" for state, n in self.counts().items())
        verb = "running for" if self.duration is None else f"{self.status} in"
        return (f"nbdist {self.title} {verb} {format_duration(self.elapsed())} "
                f"({len(self.ranks)} ranks: {counts})")

    def rank_line(self, rank: RankView) -> str:
        """Everything about one rank on one line, for plain text."""
        parts = [f"{self.rank_name(rank)} {self.label(rank)}"]
        if rank.state == RankState.FAILED or rank.exitcode not in (None, 0):
            parts.append(describe_failure(rank))
        progress = progress_text(rank)
        if progress:
            parts.append(progress)
        idle = self.idle_for(rank)
        if idle is not None:
            parts.append(f"no progress for {format_duration(idle)}")
        metrics = format_metrics(rank.metrics)
        if metrics:
            parts.append(metrics)
        return "  ".join(parts)


# --- text helpers shared by the displays ---------------------------------------------
def planned_host(job: "Job", rank: int) -> str | None:
    """The host ``rank`` is planned on: ranks fill ``job.hosts`` in order, evenly."""
    if not job.hosts:
        return None
    per_host = max(1, job.world_size // len(job.hosts))
    return job.hosts[min(rank // per_host, len(job.hosts) - 1)]


def format_ranks(ranks: list[int]) -> str:
    """``rank 3``, ``ranks 2-3``, ``ranks 0, 2-3`` (ranks sorted)."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)
    return f"rank {text}" if len(ranks) == 1 else f"ranks {text}"


def progress_text(rank: RankView) -> str:
    """``epoch 2/3 › train 45/100 (45%) 12.3 it/s ETA 0:05``."""
    bar = rank.active_bar()
    if bar is None:
        return ""
    parts = [rank.progress_label(), bar.count_text()]
    if bar.fraction is not None:
        parts.append(f"({bar.fraction:.0%})")
    rate = format_rate(bar.rate)
    if rate:
        parts.append(rate)
    if bar.eta is not None and not rank.final:
        parts.append(f"ETA {format_duration(bar.eta)}")
    return " ".join(parts)


def describe_failure(rank: RankView) -> str:
    parts = []
    if rank.error:
        parts.append(rank.error)
    if rank.exitcode is not None and rank.exitcode < 0:
        import signal

        try:
            parts.append(f"killed by {signal.Signals(-rank.exitcode).name}")
        except ValueError:
            parts.append(f"killed by signal {-rank.exitcode}")
    elif rank.exitcode not in (None, 0):
        parts.append(f"exit code {rank.exitcode}")
    return ", ".join(parts)


def format_duration(seconds: float) -> str:
    """``0:07``, ``12:05``, ``3:02:01`` — like a stopwatch."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def format_rate(rate: float | None) -> str:
    if rate is None or rate <= 0:
        return ""
    if rate >= 1:
        return f"{rate:.3g} it/s" if rate < 1000 else f"{rate:,.0f} it/s"
    return f"{1 / rate:.3g} s/it"


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 24 else text[:23] + "…"


def format_metrics(metrics: dict[str, Any], limit: int = 6) -> str:
    items = [f"{k}={format_value(v)}" for k, v in list(metrics.items())[:limit]]
    if len(metrics) > limit:
        items.append(f"(+{len(metrics) - limit})")
    return " ".join(items)


def collapse_cr(line: str) -> str:
    """What a terminal shows of a line rewritten with ``\\r``: the part after the last."""
    line = line.rstrip("\r")
    return line[line.rfind("\r") + 1:]


def log_tail(path: Path, lines: int, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a log as a terminal shows them (``\r`` redraws collapsed)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - max_bytes))
            data = f.read()
    except OSError:
        return ""
    # split on \n only: str.splitlines() would also split at every \r of a progress bar
    text = data.decode("utf-8", errors="replace").rstrip("\n")
    return "\n".join(collapse_cr(line) for line in text.split("\n")[-lines:])


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


class LineBuffer:
    """Splits a rank's output into finished lines and the line being rewritten.

    ``feed("10%\\r20%\\r")`` finishes nothing and leaves ``current == "20%"``;
    ``feed("30%\\n")`` then finishes ``"30%"``. What tqdm draws in place thus stays one
    line, and only its last state is kept.
    """

    def __init__(self) -> None:
        self._pending = ""

    @property
    def current(self) -> str:
        return collapse_cr(self._pending)

    def feed(self, text: str) -> list[str]:
        lines = (self._pending + text).split("\n")
        pending = lines.pop()
        # keep only what can still be shown; a trailing \r means "overwrite next"
        self._pending = collapse_cr(pending) + ("\r" if pending.endswith("\r") else "")
        return [collapse_cr(line) for line in lines]

    def flush(self) -> list[str]:
        rest, self._pending = collapse_cr(self._pending), ""
        return [rest] if rest else []


def log_path(job: "Job", rank: int) -> Path:
    """Where rank ``rank`` of ``job`` writes its output (a pool's task: the task's own)."""
    return JobDir(job.dir).log(rank)


class LogTail:
    """The last ``max_lines`` lines of a log that is still growing, as a terminal shows them.

    Each :meth:`read` reads only what was appended since the last one, and never more
    than ``max_bytes``: a rank that printed more meanwhile (or a long log opened the
    first time) is read from its last ``max_bytes``. Following a chatty rank thus costs
    no more than a quiet one, and memory stays bounded.

    ``tail = LogTail(path); tail.read(); tail.text`` → the newest lines, ``\r`` redraws
    collapsed to their last state.
    """

    def __init__(self, path: Path, max_lines: int = LOG_VIEW_LINES,
                 max_bytes: int = LOG_READ_MAX):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lines: deque[str] = deque(maxlen=max_lines)
        self._buffer = LineBuffer()
        self._offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._mid_line = False  # read from the middle of a line: drop up to its end

    @property
    def text(self) -> str:
        current = self._buffer.current
        return "\n".join([*self._lines, current] if current else self._lines)

    def read(self) -> bool:
        """Take in what was appended; True when :attr:`text` changed."""
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == self._offset:
                    return False
                skip = size < self._offset or size - self._offset > self.max_bytes
                if skip:  # rewritten, or too much to read: start again from its end
                    self._offset = max(0, size - self.max_bytes)
                    self._lines.clear()
                    self._buffer = LineBuffer()
                    self._decoder.reset()
                    self._mid_line = self._offset > 0
                f.seek(self._offset)
                data = f.read(size - self._offset)
        except OSError:  # not written yet, or gone with its folder
            return False
        self._offset += len(data)
        text = self._decoder.decode(data)
        if self._mid_line:
            newline = text.find("\n")
            self._mid_line = newline < 0
            text = text[newline + 1:] if newline >= 0 else ""
        for line in self._buffer.feed(text):
            self._lines.append(_cut(line))
        return bool(data)


def _cut(line: str) -> str:
    return line if len(line) <= LOG_LINE_MAX else line[:LOG_LINE_MAX - 1] + "…"
