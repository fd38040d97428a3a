"""Plain text display, for pipes, CI logs and anything without widgets or a TTY.

Rank 0's output is copied through unchanged; with ``all_ranks`` every rank's lines
are prefixed ``[rank N]``. nbdist's own lines start with ``[nbdist]``: every rank's
progress and metrics, each rank's at most every ``PROGRESS_EVERY`` seconds (and when
a loop that was reported mid-way ends), a line when a rank fails, and a summary at
the end::

    [nbdist] rank 0 running  epoch 2/3 › train 45/100 (45%) 12.3 it/s ETA 0:05  loss=0.31
    [nbdist] rank 1 running  epoch 2/3 › train 44/100 (44%) 12.1 it/s ETA 0:05  loss=0.30
    [nbdist] rank 1 failed  ValueError, exit code 1
    [nbdist] job 1a2b failed in 0:07 (2 ranks; logs: ~/.cache/nbdist/jobs/1a2b)

On several hosts, nbdist's lines name each rank's host (``rank 2 @gpu2 running ...``);
the ``[rank N]`` prefixes of streamed output stay as they are.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Callable, TextIO

from nbdist.display.base import Display
from nbdist.display.state import JobView, RankView, describe_failure, format_metrics
from nbdist.states import EventKind

if TYPE_CHECKING:
    from nbdist.protocol import Event
    from nbdist.job import Job

PROGRESS_EVERY = 10.0  # seconds between progress lines of one rank


class PlainDisplay(Display):
    def __init__(self, *, all_ranks: bool = False, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(all_ranks=all_ranks)
        self._stream = stream
        self._clock = clock
        self._partial: dict[int, str] = {}  # a rank's unterminated last line
        self._view: JobView | None = None
        self._last_line: dict[int, float] = {}  # rank → clock of its last progress line
        self._reported_bars: set[tuple[int, int]] = set()  # bars shown mid-way
        self._failed_shown: set[int] = set()

    @property
    def stream(self) -> TextIO:
        # looked up late: in a notebook, sys.stdout is per cell
        return self._stream or sys.stdout

    def start(self, job: "Job") -> None:
        streamed = set(range(job.world_size)) if self.all_ranks else {0}
        self._view = JobView(job, streamed=streamed, clock=self._clock)

    def output(self, rank: int, text: str) -> None:
        if not self.all_ranks:
            if rank == 0:
                self.stream.write(text)
                self.stream.flush()
            return
        text = self._partial.pop(rank, "") + text
        lines = text.split("\n")
        if lines[-1]:
            self._partial[rank] = lines[-1]
        prefix = f"[rank {rank}] "
        # a line redrawn with \r keeps its prefix on every redraw
        self.stream.write("".join(prefix + line.replace("\r", "\r" + prefix) + "\n"
                                  for line in lines[:-1]))
        self.stream.flush()

    def event(self, event: "Event") -> None:
        view = self._view
        if view is None or not view.apply(event):
            return
        rank = view.ranks[event.rank]
        if event.kind == EventKind.STATUS:
            self._show_failure(rank)
            return
        # every rank's progress, whether its output is shown or not: each on its own clock
        now = self._clock()
        due = now - self._last_line.get(event.rank, now - PROGRESS_EVERY) >= PROGRESS_EVERY
        if event.kind == EventKind.PROGRESS:
            key = (event.rank, event.body.bar)
            closed = event.body.closed
            # an outermost loop whose middle was shown also gets its end shown
            ending = (closed and key in self._reported_bars
                      and not any(not b.closed for b in rank.bars.values()))
            if not (due or ending):
                return
            if closed:
                self._reported_bars.discard(key)
            else:
                self._reported_bars.add(key)
        elif not due:
            return
        self._last_line[event.rank] = now
        self._line(view.rank_line(rank))

    def flush_output(self) -> None:
        """Write out the unterminated last lines kept back for prefixing."""
        if not self._partial:
            return
        for rank, text in sorted(self._partial.items()):
            self.stream.write(f"[rank {rank}] {text}\n")
        self._partial.clear()
        self.stream.flush()

    def stop(self, job: "Job") -> None:
        self.flush_output()
        view = self._view
        if view is not None:
            view.finish(job)
            for rank in view.ranks:
                self._show_failure(rank)
            metrics = format_metrics(view.ranks[0].metrics) if view.ranks else ""
            if metrics:
                self._line(f"{view.rank_name(view.ranks[0])} final metrics: {metrics}")
        self._line(f"job {job.id} {job.status} in {job.duration:.1f}s "
                   f"({job.world_size} ranks; logs: {job.dir})")

    def _show_failure(self, rank: RankView) -> None:
        """One line for a failed rank, the first time it is seen failed."""
        if rank.bad and rank.rank not in self._failed_shown:
            self._failed_shown.add(rank.rank)
            self._line(f"{self._view.rank_name(rank)} {rank.state}  "
                       f"{describe_failure(rank)}")

    def notice(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _line(self, text: str) -> None:
        self.stream.write(f"[nbdist] {text}\n")
        self.stream.flush()
