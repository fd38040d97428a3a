"""Plain text display, for pipes, CI logs and anything without widgets or a TTY.

Rank 0's output is copied through unchanged; with ``all_ranks`` every rank's lines
are prefixed ``[rank N]``. nbdist's own lines start with ``[nbdist]``.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Callable, TextIO

from nbdist.display.base import Display

if TYPE_CHECKING:
    from nbdist.channel import Event
    from nbdist.job import Job

PROGRESS_EVERY = 10.0  # seconds between progress lines of one bar


class PlainDisplay(Display):
    def __init__(self, *, all_ranks: bool = False, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(all_ranks=all_ranks)
        self._stream = stream
        self._clock = clock
        self._partial: dict[int, str] = {}  # a rank's unterminated last line
        self._last_progress: dict[tuple[int, int], float] = {}

    @property
    def stream(self) -> TextIO:
        # looked up late: in a notebook, sys.stdout is per cell
        return self._stream or sys.stdout

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
        self.stream.write("".join(f"[rank {rank}] {line}\n" for line in lines[:-1]))
        self.stream.flush()

    def event(self, event: "Event") -> None:
        if event.kind != "progress" or (event.rank != 0 and not self.all_ranks):
            return
        key = (event.rank, event.data["bar"])
        now = self._clock()
        closed = event.data.get("closed", False)
        if not closed and now - self._last_progress.get(key, -PROGRESS_EVERY) < PROGRESS_EVERY:
            return
        self._last_progress[key] = now
        total = event.data.get("total")
        of = f"/{total}" if total is not None else ""
        desc = event.data.get("desc") or "progress"
        self._line(f"rank {event.rank} {desc}: {event.data['n']}{of}")

    def stop(self, job: "Job") -> None:
        for rank, text in sorted(self._partial.items()):
            self.stream.write(f"[rank {rank}] {text}\n")
        self._partial.clear()
        self._line(f"job {job.id} {job.status} in {job.duration:.1f}s "
                   f"({job.nprocs} ranks; logs: {job.dir})")

    def _line(self, text: str) -> None:
        self.stream.write(f"[nbdist] {text}\n")
        self.stream.flush()
