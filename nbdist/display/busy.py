"""Keep a Jupyter frontend showing the kernel busy while a job's cell runs.

Why this exists: JupyterLab (4.4 and later, ``commsOverSubshells``) answers the first
widget comm the kernel opens with a ``create_subshell_request`` on the control channel,
and the last one it closes with a ``delete_subshell_request``. ipykernel (7, with
subshells) handles those on its control thread and publishes ``busy`` then ``idle``
on IOPub with *that request* as parent, and JupyterLab sets its kernel status from
every status message, whatever its parent. So the dashboard's widgets turned the
kernel "Idle" a few milliseconds after a job started, for the rest of the run, while
the cell was still executing. A comm message the frontend sends on a subshell has
the same effect.

While a job's dashboard is up, :func:`hold` wraps the kernel's status publisher:
every ``idle`` published for another request is followed at once by a ``busy`` for
the cell that runs the job. The wrap removes itself when that cell's own ``idle`` goes
out (so nothing lingers after the cell), and :func:`release` (the dashboard's end)
bounds it to ``DRAIN_SECONDS`` more, long enough for the frontend's subshell
clean-up that the widgets' closing triggers, should the cell not end by then.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger("nbdist.display")

DRAIN_SECONDS = 10.0

_lock = threading.RLock()  # orders "foreign idle, then busy" against the cell's own idle
_current: "_Hold | None" = None


class _Hold:
    def __init__(self, kernel: Any, parent: dict):
        self.kernel = kernel
        self.parent = parent
        self.msg_id = parent["header"]["msg_id"]
        self.shadowed = kernel.__dict__.get("_publish_status")  # someone else's wrap
        self.original: Callable[..., None] = kernel._publish_status
        self.deadline: float | None = None  # set by release()

    def publish(self, status: str, channel: str, parent: dict | None = None) -> None:
        # resolved here, in the calling thread, as ipykernel itself would
        actual = parent or self.kernel.get_parent(channel) or {}
        with _lock:
            self.original(status, channel, parent)
            if status != "idle" or _current is not self:
                return
            if (actual.get("header") or {}).get("msg_id") == self.msg_id:
                _remove(self)  # the cell is over: nothing to keep busy
            elif self.deadline is not None and time.monotonic() > self.deadline:
                _remove(self)
            else:
                self.original("busy", "shell", self.parent)


def hold(kernel: Any = None) -> None:
    """From now until the running cell ends, the frontend sees the kernel busy.

    Does nothing outside an ipykernel cell or with an ipykernel it does not know.
    """
    global _current
    try:
        if kernel is None:
            from IPython import get_ipython

            kernel = getattr(get_ipython(), "kernel", None)
        parent = kernel.get_parent("shell")
        if not callable(kernel._publish_status):
            return
    except Exception:  # not a kernel, or one without these internals
        return
    if not isinstance(parent, dict) or not (parent.get("header") or {}).get("msg_id"):
        return
    with _lock:
        if _current is not None:
            if _current.kernel is kernel and _current.msg_id == parent["header"]["msg_id"]:
                _current.deadline = None  # another job of the same cell
                return
            _remove(_current)
        _current = _Hold(kernel, parent)
        kernel._publish_status = _current.publish
    log.debug("nbdist: keeping the kernel busy for request %s", _current.msg_id)


def release() -> None:
    """The job's display is done: keep the hold at most ``DRAIN_SECONDS`` more."""
    with _lock:
        if _current is not None and _current.deadline is None:
            _current.deadline = time.monotonic() + DRAIN_SECONDS


def _remove(held: _Hold) -> None:
    global _current
    with _lock:
        if held.kernel.__dict__.get("_publish_status") == held.publish:
            if held.shadowed is None:
                del held.kernel.__dict__["_publish_status"]
            else:
                held.kernel.__dict__["_publish_status"] = held.shadowed
        if _current is held:
            _current = None
