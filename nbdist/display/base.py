"""The interface every live display implements, and the choice among them.

The caller's supervision loop (``api.py``) feeds a display three things, from one
thread: ``output`` (text a rank printed), ``event`` (status / progress / metrics from
``channel.py``) and, at the end, ``stop`` with the final :class:`~nbdist.job.Job`.
Implementations: ``plain.py`` (prefixed lines), ``terminal.py`` (rich),
``notebook.py`` (ipywidgets); their heavy imports happen only when chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nbdist.channel import Event
    from nbdist.job import Job


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

    def stop(self, job: "Job") -> None:
        pass
