"""What the live display costs: ``track``/``report`` on a rank, redraws in the caller.

    python benchmarks/track_overhead.py            # prints a table; target: track ≤ 2 µs

Worker side: the extra time per iteration of a tight loop wrapped in ``track`` (its
events go to a real event file, as in a job), and per ``report`` call. Caller side: the
time one event takes to fold into a display, and one full redraw of the rich and the
widget dashboards (at most 10 redraws a second happen, so 10 × that is the CPU share).
Each figure is the best of several runs, to keep other load on the machine out of it.
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from pathlib import Path

from nbdist import runtime
from nbdist.channel import ChannelWriter
from nbdist.protocol import Event, Metrics, Progress
from nbdist.job import Job, RankStatus

N = 2_000_000
REPEAT = 5


def best(fn, repeat: int = REPEAT) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bare() -> None:
    for _ in range(N):
        pass


def tracked() -> None:
    for _ in runtime.track(range(N), desc="bench"):
        pass


def reported() -> None:
    for i in range(N // 10):
        runtime.report(loss=0.5)


def worker_side(folder: Path) -> dict[str, float]:
    results = {}
    loop = best(bare)
    runtime._attach(None)
    results["track, outside a job (µs/iteration)"] = (best(tracked) - loop) / N * 1e6
    writer = ChannelWriter(folder / "events-rank-0.jsonl")
    runtime._attach(writer)
    try:
        results["track, in a job (µs/iteration)"] = (best(tracked) - loop) / N * 1e6
        results["report, in a job (µs/call)"] = (best(reported) - loop / 10) / (N // 10) * 1e6
    finally:
        runtime._attach(None)
        writer.close()
    return results


def events(nprocs: int, count: int) -> list[Event]:
    out = []
    for i in range(count):
        rank = i % nprocs
        if i % 2:
            out.append(Event(rank, i * 0.01, Progress(0, "train", i, count)))
        else:
            out.append(Event(rank, i * 0.01, Metrics({"loss": 1.0 / (i + 1), "acc": 0.5}, i)))
    return out


def caller_side(folder: Path, nprocs: int = 8) -> dict[str, float]:
    job = Job(id="bench", dir=str(folder), world_size=nprocs, backend="gloo",
              ranks=[RankStatus(r, log=str(folder / f"rank-{r}.log")) for r in range(nprocs)])
    stream = events(nprocs, 20_000)
    results = {}

    from nbdist.display.plain import PlainDisplay

    displays = {"plain": lambda: PlainDisplay(stream=io.StringIO())}
    try:
        from rich.console import Console

        from nbdist.display.terminal import TerminalDisplay

        displays["terminal"] = lambda: TerminalDisplay(console=Console(
            file=io.StringIO(), force_terminal=True, width=140))
    except ImportError:
        pass
    try:
        from nbdist.display.notebook import NotebookDisplay

        class Nowhere:
            def show(self, bundle, display_id): pass

            def update(self, bundle, display_id): pass

        displays["notebook"] = lambda: NotebookDisplay(stream=io.StringIO(),
                                                       publisher=Nowhere())
    except ImportError:
        pass
    for name, make in displays.items():
        display = make()
        display.start(job)

        def feed():
            for event in stream:
                display.event(event)
                display.tick()

        results[f"{name}: event + tick ({nprocs} ranks, µs/event)"] = (
            best(feed, 3) / len(stream) * 1e6)
        redraw = getattr(display, "_refresh", None) or getattr(display, "_render", None)
        if redraw is not None:
            results[f"{name}: one full redraw ({nprocs} ranks, ms)"] = best(
                lambda: [redraw() for _ in range(20)], 3) / 20 * 1e3
        if hasattr(display, "abandon"):
            display.abandon()
    return results


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        results = worker_side(Path(folder))
        results.update(caller_side(Path(folder)))
    width = max(len(k) for k in results)
    print(f"python {sys.version.split()[0]}; best of {REPEAT} runs")
    for key, value in results.items():
        print(f"  {key:<{width}}  {value:8.3f}")
    overhead = results["track, in a job (µs/iteration)"]
    print(f"track overhead {overhead:.2f} µs/iteration "
          f"({'within' if overhead <= 2 else 'OVER'} the 2 µs target)")


if __name__ == "__main__":
    main()
