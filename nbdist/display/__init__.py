"""Live displays of a running job; see ``base.py`` for the interface.

``create("auto")`` picks, in order: the ipywidgets dashboard inside a Jupyter kernel,
the rich dashboard when ``sys.stdout`` is a terminal, plain text otherwise (pipes, CI,
files). The environment variable ``NBDIST_DISPLAY`` overrides what ``"auto"`` picks.
ipywidgets, rich and IPython are imported only here, only when chosen; when one is
missing the display falls back to plain text.
"""

from __future__ import annotations

import logging
import os
import sys

from nbdist.display.base import Display, GuardedDisplay

MODES = ("auto", "notebook", "terminal", "plain", "none")
ENV_DISPLAY = "NBDIST_DISPLAY"

log = logging.getLogger("nbdist.display")

__all__ = ["Display", "MODES", "create", "resolve"]


def create(mode: str = "auto", *, all_ranks: bool = False) -> Display:
    """The display for ``mode`` (one of ``MODES``), guarded so that it cannot break a job.

    Example: ``create("plain")`` for CI logs; ``create()`` decides by environment.
    """
    from nbdist.display.plain import PlainDisplay

    chosen = resolve(mode)
    if chosen == "none":
        return Display(all_ranks=all_ranks)
    inner: Display | None = None
    if chosen == "notebook" and not in_jupyter_kernel():
        log.warning("nbdist: display='notebook' needs a Jupyter kernel; showing plain text")
    elif chosen == "notebook":
        inner = _try_import(mode, "notebook", "ipywidgets",
                            lambda m: m.NotebookDisplay(all_ranks=all_ranks))
    elif chosen == "terminal":
        inner = _try_import(mode, "terminal", "rich",
                            lambda m: m.TerminalDisplay(all_ranks=all_ranks))
    if inner is None:
        inner = PlainDisplay(all_ranks=all_ranks)
        return GuardedDisplay(inner)
    return GuardedDisplay(inner, fallback=lambda: PlainDisplay(all_ranks=all_ranks))


def resolve(mode: str = "auto") -> str:
    """The concrete mode ``mode`` stands for here: ``"auto"`` looks at the environment."""
    if mode not in MODES:
        from nbdist.errors import InvalidArgumentError

        raise InvalidArgumentError(f"display={mode!r} is not one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    forced = os.environ.get(ENV_DISPLAY, "").strip().lower()
    if forced:
        if forced in MODES and forced != "auto":
            return forced
        log.warning("nbdist: ignoring %s=%r (expected one of %s)", ENV_DISPLAY, forced,
                    ", ".join(MODES))
    if in_jupyter_kernel():
        return "notebook"
    if _is_terminal(sys.stdout):
        return "terminal"
    return "plain"


def in_jupyter_kernel() -> bool:
    """True inside an IPython kernel talking to a Jupyter frontend (not a terminal IPython).

    Looks only at modules already imported: a kernel has imported ipykernel and IPython
    long before any cell runs, and anything else is not a kernel.
    """
    if "ipykernel" not in sys.modules or "IPython" not in sys.modules:
        return False
    try:
        shell = sys.modules["IPython"].get_ipython()
        from ipykernel.zmqshell import ZMQInteractiveShell
    except Exception:
        return False
    return isinstance(shell, ZMQInteractiveShell)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty()) and os.environ.get("TERM") != "dumb"
    except Exception:  # a replaced stdout without isatty, or a closed one
        return False


def _try_import(requested: str, module: str, needs: str, build):
    import importlib

    try:
        impl = importlib.import_module(f"nbdist.display.{module}")
        return build(impl)
    except ImportError as exc:
        # "auto" falls back silently; an explicit choice deserves a word
        level = logging.DEBUG if requested == "auto" else logging.WARNING
        log.log(level, "nbdist: display=%r needs %s (%s); showing plain text instead",
                module, needs, exc)
        return None
