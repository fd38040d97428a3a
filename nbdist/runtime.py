"""Helpers for code running on a rank: ``rank()``, ``device()``, ``track()``, ``report()``...

They read torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), so they
also work under a plain ``torchrun`` and, outside any launcher, answer as a single
process (rank 0 of 1) — a function written for nbdist can be tried locally first.

Example, inside a function passed to ``run_distributed``::

    from nbdist import rank, device, track, report, rank0_first

    with rank0_first():
        data = prepare()            # rank 0 downloads/caches first, then the others
    for epoch in track(range(3), desc="epoch"):
        loss = train_one_epoch(model.to(device()), data)
        report(loss=loss)
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from typing import Any, Iterable, Iterator, TypeVar

from nbdist.channel import ChannelWriter
from nbdist.protocol import Metrics, Progress

T = TypeVar("T")

PROGRESS_INTERVAL = 0.2  # seconds between progress events of one bar
METRICS_INTERVAL = 0.2

_channel: ChannelWriter | None = None
_bar_ids = itertools.count()
_pending_metrics: dict[str, Any] = {}
_last_metrics_emit = 0.0
_report_step = 0  # report() calls so far: the x axis of the live chart


def rank() -> int:
    """Global rank of this process (0 outside a distributed job)."""
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    """Rank of this process on its machine (0 outside a distributed job)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    """Number of processes in the job (1 outside a distributed job)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """True on rank 0: the rank that should log, save checkpoints and return results."""
    return rank() == 0


def device():
    """``torch.device("cuda:<local_rank>")`` when this job uses GPUs, else ``cpu``."""
    import torch

    if os.environ.get("NBDIST_DEVICE", "cuda") == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank reaches this point (no-op outside a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def rank0_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (e.g. a download)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def track(iterable: Iterable[T], desc: str | None = None,
          total: int | None = None) -> Iterator[T]:
    """Iterate like ``iterable`` and show a progress bar for this rank in the display.

    Events are throttled to a few per second, so wrapping a tight loop is cheap
    (about 0.2 µs per iteration; see ``benchmarks/track_overhead.py``). When the loop
    ends, metrics held back by :func:`report`'s throttling are sent too, so the
    display shows each epoch's last values.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    channel = _channel
    if channel is None:
        yield from iterable
        return
    bar = next(_bar_ids)
    channel.emit(Progress(bar, desc, 0, total))
    n = 0
    monotonic = time.monotonic
    next_emit = monotonic() + PROGRESS_INTERVAL
    try:
        for item in iterable:
            yield item
            n += 1
            if monotonic() >= next_emit:
                channel.emit(Progress(bar, desc, n, total))
                next_emit = monotonic() + PROGRESS_INTERVAL
    finally:
        flush_metrics()
        channel.emit(Progress(bar, desc, n, total, closed=True))


def report(**metrics: Any) -> None:
    """Show scalar metrics (``report(loss=0.3, acc=0.9)``) live in the display.

    Values of rank 0 are shown by default (every rank's in its own row of the
    dashboard); tensors are converted with ``.item()``. Calls are throttled to a few
    events per second; the latest value of each name always gets through. Each call
    counts as one step on the x axis of the live loss chart.
    """
    global _last_metrics_emit, _report_step
    _report_step += 1
    _pending_metrics.update(metrics)
    now = time.monotonic()
    if _channel is not None and now - _last_metrics_emit >= METRICS_INTERVAL:
        flush_metrics()
        _last_metrics_emit = now


def flush_metrics() -> None:
    """Send metrics still held back by throttling (the worker calls this at the end)."""
    if _channel is not None and _pending_metrics:
        _channel.emit(Metrics(dict(_pending_metrics), _report_step))
        _pending_metrics.clear()


def _attach(channel: ChannelWriter | None) -> None:
    global _channel
    _channel = channel
