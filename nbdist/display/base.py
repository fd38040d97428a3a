"""The interface every live display implements, and the guard around them.

The caller's supervision loop (``api.py``) feeds a display, from one thread:
``start`` with the :class:`~nbdist.job.Job`, then ``output`` (text a rank printed),
``event`` (status / progress / metrics from ``channel.py``), ``tick`` (every poll,
so a display can redraw its clock even when nothing happens) and ``notice`` (a
warning such as a stall), and at the end ``stop`` with the final job record. Implementations: ``plain.py`` (prefixed lines),
``terminal.py`` (rich), ``notebook.py`` (ipywidgets); their heavy imports happen only
when chosen (see ``__init__.create``).

A display must never break the job it shows: :class:`GuardedDisplay` catches what a
display raises, logs it once and carries on with plain text.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from nbdist.protocol import Event
    from nbdist.job import Job

log = logging.getLogger("nbdist.display")

RENDER_INTERVAL = 0.1  # seconds: rich and widget displays redraw at most 10 times a second
# seconds a job runs before its dashboard appears (as tqdm's ``delay``): a warm pool's
# task that is over sooner shows its output, and no dashboard nobody could read
SHOW_AFTER = 0.5


class Display:
    """Shows one running job. Subclasses override what they show; all calls are cheap."""

    def __init__(self, *, all_ranks: bool = False):
        self.all_ranks = all_ranks

    def start(self, job: "Job") -> None:
        pass

    def output(self, rank: int, text: str) -> None:
        pass

    def event(self, event: "Event") -> None:
        pass

    def tick(self) -> None:
        """Called at every poll of the supervision loop; redraw if something is due."""

    def notice(self, text: str) -> None:
        """Tell the user something about the job while it runs (a stall warning)."""

    def stop(self, job: "Job") -> None:
        pass

    def abandon(self) -> None:
        """Give up the screen after an error (stop a rich Live, ...); must not raise."""


class GuardedDisplay(Display):
    """Runs ``inner``; when it raises, logs the error and continues with ``fallback()``.

    ``KeyboardInterrupt`` still propagates: the stop button must work during a redraw.
    """

    def __init__(self, inner: Display, fallback: Callable[[], Display] | None = None):
        super().__init__(all_ranks=inner.all_ranks)
        self.inner = inner
        self._fallback = fallback
        self._job: "Job | None" = None

    def start(self, job: "Job") -> None:
        self._job = job
        self._call("start", job)

    def output(self, rank: int, text: str) -> None:
        self._call("output", rank, text)

    def event(self, event: "Event") -> None:
        self._call("event", event)

    def tick(self) -> None:
        self._call("tick")

    def notice(self, text: str) -> None:
        self._call("notice", text)

    def stop(self, job: "Job") -> None:
        self._call("stop", job)

    def _call(self, method: str, *args) -> None:
        try:
            getattr(self.inner, method)(*args)
        except Exception:
            failed = self.inner
            log.warning("nbdist: the %s display failed in %s(); continuing with %s",
                        type(failed).__name__, method,
                        "plain text" if self._fallback else "no display", exc_info=True)
            try:
                failed.abandon()
            except Exception:
                pass
            self.inner = self._fallback() if self._fallback else Display()
            self._fallback = None  # a failing fallback ends in no display at all
            if method != "start" and self._job is not None:
                self._call("start", self._job)
            if method != "tick":  # what the failed display dropped is not lost
                self._call(method, *args)
