"""Live displays of a running job; see ``base.py``."""

from __future__ import annotations

from nbdist.display.base import Display

MODES = ("auto", "notebook", "terminal", "plain", "none")


def create(mode: str = "auto", *, all_ranks: bool = False) -> Display:
    """The display for ``mode`` (one of ``MODES``); imports only what it needs."""
    if mode not in MODES:
        raise ValueError(f"display={mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        return Display(all_ranks=all_ranks)
    from nbdist.display.plain import PlainDisplay

    return PlainDisplay(all_ranks=all_ranks)
