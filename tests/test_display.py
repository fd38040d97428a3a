"""The live displays, fed by a recorded event sequence; one real job in a real kernel.

``RECORDED`` is what the two ranks of a real job wrote to their event files (times
made relative): three epochs of ``track`` with 20 steps each and ``report(loss=...)``,
in which rank 1 raised ``ValueError`` in the middle of epoch 2 and torchrun then
killed rank 0. Every display is driven by it with an injected clock that follows the
recorded times, so throttling is exercised as in the real run, without a launch.
"""

from __future__ import annotations

import io
import dataclasses
import json
import logging
import os
import queue
import subprocess
import sys
import time

import pytest

from nbdist import display as displays
from nbdist.channel import ChannelReader, ChannelWriter
from nbdist.protocol import Event, Progress, Metrics, Status, decode_event
from nbdist.display.base import RENDER_INTERVAL, Display, GuardedDisplay
from nbdist.display.plain import PROGRESS_EVERY, PlainDisplay
from nbdist.display.state import (IDLE_AFTER, Bar, JobView, LineBuffer, Series,
                                  collapse_cr, format_duration, format_ranks, format_rate)
from nbdist.errors import InvalidArgumentError
from nbdist.job import Job, RankStatus

RECORDED = [
    (0, "status", 0.0000, {"state": "starting", "pid": 1000}),
    (1, "status", 0.0029, {"state": "starting", "pid": 1001}),
    (1, "status", 3.5526, {"state": "joining"}),
    (0, "status", 3.7487, {"state": "joining"}),
    (0, "status", 3.7531, {"state": "ready"}),
    (0, "status", 3.7531, {"state": "running"}),
    (0, "progress", 3.7531, {"bar": 0, "desc": "epoch", "n": 0, "total": 3}),
    (0, "progress", 3.7532, {"bar": 1, "desc": "train", "n": 0, "total": 20}),
    (1, "status", 3.7537, {"state": "ready"}),
    (1, "status", 3.7538, {"state": "running"}),
    (1, "progress", 3.7538, {"bar": 0, "desc": "epoch", "n": 0, "total": 3}),
    (1, "progress", 3.7539, {"bar": 1, "desc": "train", "n": 0, "total": 20}),
    (0, "metrics", 3.7733, {"values": {"loss": 1.0, "lr": 0.1}, "step": 1}),
    (1, "metrics", 3.7740, {"values": {"loss": 1.0, "lr": 0.1}, "step": 1}),
    (0, "progress", 3.9547, {"bar": 1, "desc": "train", "n": 10, "total": 20}),
    (1, "progress", 3.9553, {"bar": 1, "desc": "train", "n": 10, "total": 20}),
    (0, "metrics", 3.9750, {"values": {"loss": 0.09091, "lr": 0.1}, "step": 11}),
    (1, "metrics", 3.9755, {"values": {"loss": 0.09091, "lr": 0.1}, "step": 11}),
    (0, "progress", 4.1564, {"bar": 1, "desc": "train", "n": 20, "total": 20}),
    (0, "metrics", 4.1566, {"values": {"loss": 0.05, "lr": 0.1}, "step": 20}),
    (0, "progress", 4.1566, {"bar": 1, "desc": "train", "n": 20, "total": 20, "closed": True}),
    (0, "progress", 4.1568, {"bar": 0, "desc": "epoch", "n": 1, "total": 3}),
    (0, "progress", 4.1568, {"bar": 2, "desc": "train", "n": 0, "total": 20}),
    (1, "progress", 4.1569, {"bar": 1, "desc": "train", "n": 20, "total": 20}),
    (1, "metrics", 4.1570, {"values": {"loss": 0.05, "lr": 0.1}, "step": 20}),
    (1, "progress", 4.1570, {"bar": 1, "desc": "train", "n": 20, "total": 20, "closed": True}),
    (1, "progress", 4.1571, {"bar": 0, "desc": "epoch", "n": 1, "total": 3}),
    (1, "progress", 4.1571, {"bar": 2, "desc": "train", "n": 0, "total": 20}),
    (0, "metrics", 4.1769, {"values": {"loss": 0.04762, "lr": 0.1}, "step": 21}),
    (1, "metrics", 4.1773, {"values": {"loss": 0.04762, "lr": 0.1}, "step": 21}),
    (0, "progress", 4.3583, {"bar": 2, "desc": "train", "n": 10, "total": 20}),
    (1, "progress", 4.3585, {"bar": 2, "desc": "train", "n": 10, "total": 20}),
    (0, "metrics", 4.3785, {"values": {"loss": 0.03226, "lr": 0.1}, "step": 31}),
    (1, "metrics", 4.3787, {"values": {"loss": 0.03226, "lr": 0.1}, "step": 31}),
    (1, "progress", 4.3788, {"bar": 2, "desc": "train", "n": 10, "total": 20, "closed": True}),
    (1, "progress", 4.3788, {"bar": 0, "desc": "epoch", "n": 1, "total": 3, "closed": True}),
    (1, "status", 4.3886, {"state": "failed", "exitcode": 1, "error": "ValueError"}),
]
RANK1_LOG = ("Traceback (most recent call last):\n"
             '  File "train.py", line 10, in train\n'
             '    raise ValueError("bad batch 10 on rank 1")\n'
             "ValueError: bad batch 10 on rank 1 <&>\n")
T0 = 1_800_000_000.0  # worker wall-clock time of the first event


class Clock:
    """The display's clock, moved by the test."""

    def __init__(self, t: float = 50.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def event(rank: int, kind: str, at: float, data: dict) -> Event:
    """The event a rank's line ``{"kind": kind, "time": at, **data}`` decodes to."""
    decoded = decode_event(rank, json.dumps({"kind": kind, "time": at, **data}).encode())
    assert decoded is not None, (kind, data)
    return decoded


def recorded() -> list[Event]:
    return [event(rank, kind, T0 + t, dict(data)) for rank, kind, t, data in RECORDED]


def succeeded(nprocs: int = 2, epochs: int = 3, steps: int = 20) -> list[Event]:
    """A healthy job: every rank runs epochs × steps with a report per step."""
    events, t = [], 0.0
    for r in range(nprocs):
        events += [event(r, "status", T0, {"state": "starting", "pid": 1000 + r}),
                   event(r, "status", T0 + 1, {"state": "running"}),
                   event(r, "progress", T0 + 1, {"bar": 0, "desc": "epoch", "n": 0,
                                                 "total": epochs})]
    t, bar, step = 1.0, 1, 0
    for epoch in range(epochs):
        for r in range(nprocs):
            events.append(event(r, "progress", T0 + t, {"bar": bar, "desc": "train",
                                                        "n": 0, "total": steps}))
        for i in range(1, steps + 1):
            t += 0.05
            step += 1
            for r in range(nprocs):
                events.append(event(r, "progress", T0 + t, {"bar": bar, "desc": "train",
                                                            "n": i, "total": steps}))
                events.append(event(r, "metrics", T0 + t, {"values": {
                    "loss": 2.0 / step, "acc": step / (epochs * steps)}, "step": step}))
        for r in range(nprocs):
            events += [event(r, "progress", T0 + t, {"bar": bar, "desc": "train",
                                                     "n": steps, "total": steps,
                                                     "closed": True}),
                       event(r, "progress", T0 + t, {"bar": 0, "desc": "epoch",
                                                     "n": epoch + 1, "total": epochs,
                                                     "closed": epoch + 1 == epochs})]
        bar += 1
    events += [event(r, "status", T0 + t + 0.1, {"state": "done"}) for r in range(nprocs)]
    return events


def make_job(tmp_path, nprocs: int = 2, hosts: list[str] | None = None) -> Job:
    job_dir = tmp_path / "job"
    job_dir.mkdir(exist_ok=True)
    (job_dir / "rank-0.log").write_text("epoch 0 done\n")
    (job_dir / "rank-1.log").write_text("loading\n10%\r50%\r100%\n" + RANK1_LOG)
    return Job(id="20260101-000000-abcdef", dir=str(job_dir), world_size=nprocs,
               backend="gloo", started=time.time() - 5, hosts=hosts,
               ranks=[RankStatus(r, log=str(job_dir / f"rank-{r}.log"))
                      for r in range(nprocs)])


def on_hosts(events: list[Event], landed: list[str]) -> list[Event]:
    """``events`` with each rank's first STATUS naming its host, ``landed[rank]``."""
    named: set[int] = set()
    for i, each in enumerate(events):
        if each.kind == "status" and each.rank not in named:
            named.add(each.rank)
            events[i] = dataclasses.replace(each, body=dataclasses.replace(
                each.body, host=landed[each.rank]))
    return events


def two_hosts(tmp_path, landed=("gpu1", "gpu1", "gpu2", "gpu2")) -> tuple[Job, list[Event]]:
    """A job planned as 2 hosts × 2 ranks, and its events: the ranks land on ``landed``;
    rank 3 fails at the end, the others finish."""
    job = make_job(tmp_path, nprocs=4, hosts=["gpu1", "gpu2"])
    (tmp_path / "job" / "rank-3.log").write_text(RANK1_LOG)
    events = on_hosts(succeeded(nprocs=4, epochs=2, steps=10), list(landed))
    last = events.pop()
    assert last.rank == 3 and last.body == Status("done")
    events.append(event(3, "status", last.time,
                        {"state": "failed", "exitcode": 1, "error": "ValueError"}))
    return job, events


def two_hosts_end(job: Job) -> Job:
    return end(job, "failed", ["done", "done", "done", "failed"], [0, 0, 0, 1])


def line_order(text: str, starts: list[str]) -> list[int]:
    """Where the first line starting with each of ``starts`` is (spaces ignored)."""
    lines = [line.strip() for line in text.splitlines()]
    return [next(i for i, line in enumerate(lines) if line.startswith(start))
            for start in starts]


def end(job: Job, status: str, states: list[str], exitcodes: list[int | None]) -> Job:
    """The job record as api.py hands it to stop(), after diagnose()."""
    job.status = status
    job.ended = job.started + 7.0
    for rank, state, code in zip(job.ranks, states, exitcodes):
        rank.state, rank.exitcode = state, code
    return job


def feed(display: Display, events: list[Event], clock: Clock, *, tick: bool = True) -> None:
    """Deliver events at their recorded times, as the 50 ms supervision loop would."""
    base = clock.t - (events[0].time - T0)
    for event in events:
        clock.t = base + (event.time - T0)
        display.event(event)
        if tick:
            display.tick()


def failed_job(tmp_path) -> Job:
    return end(make_job(tmp_path), "failed", ["killed", "failed"], [-15, 1])


# --- the model every display shares ---------------------------------------------------
def test_view_folds_the_recorded_failure(tmp_path):
    clock = Clock()
    view = JobView(make_job(tmp_path), clock=clock)
    for event in recorded():
        view.apply(event)
    r0, r1 = view.ranks
    assert r0.state == "running" and r1.state == "failed"
    assert r1.error == "ValueError" and r1.exitcode == 1
    # rank 1 unwound (and closed) its loops when it failed: it still shows where it was
    assert r1.progress_label() == "epoch 2/3 › train" and r1.fraction() == 0.5
    assert r0.progress_label() == "epoch 2/3 › train" and r0.active_bar().n == 10
    assert "ValueError: bad batch 10 on rank 1" in r1.log_tail
    assert "10%" not in r1.log_tail and "100%" in r1.log_tail  # \r lines collapsed
    assert r0.log_tail is None  # rank 0's output is streamed, not tailed
    assert r0.metrics == {"loss": 0.03226, "lr": 0.1}
    assert view.chart_keys() == ["loss"]
    assert [s for s, _ in view.series["loss"].values()] == [1, 11, 20, 21, 31]

    view.finish(failed_job(tmp_path))
    assert [r.state for r in view.ranks] == ["killed", "failed"]
    assert view.summary().startswith("nbdist job 20260101-000000-abcdef failed in 0:07")
    assert view.rank_line(r1).startswith("rank 1 failed  ValueError, exit code 1  "
                                         "epoch 2/3 › train 10/20 (50%)")
    assert "killed by SIGTERM" in view.rank_line(r0)


def test_rates_eta_idle_and_formats():
    bar = Bar(0, "train", 100, n=25, opened=10.0, updated=15.0)
    assert bar.rate == 5.0 and bar.eta == 15.0 and bar.fraction == 0.25
    assert Bar(0, None, None, n=3, opened=0, updated=6).eta is None
    assert format_rate(5.0) == "5 it/s" and format_rate(0.25) == "4 s/it"
    assert format_rate(12345.0) == "12,345 it/s" and format_rate(None) == ""
    assert format_duration(7) == "0:07" and format_duration(3723) == "1:02:03"

    clock = Clock(0.0)
    job = Job(id="j", dir="/nonexistent", world_size=1, backend="gloo", ranks=[RankStatus(0)])
    view = JobView(job, clock=clock)
    view.apply(event(0, "progress", T0, {"bar": 0, "desc": "x", "n": 1, "total": 9}))
    clock.t = IDLE_AFTER + 1
    assert view.idle_for(view.ranks[0]) == pytest.approx(IDLE_AFTER + 1)
    assert "no progress for 0:31" in view.rank_line(view.ranks[0])


def test_line_buffer_keeps_only_what_a_terminal_would_show():
    buf = LineBuffer()
    assert buf.feed("first\n 10%|#") == ["first"]
    assert buf.current == " 10%|#"
    assert buf.feed("#\r 20%|##\r") == [] and buf.current == " 20%|##"
    assert buf.feed(" 30%|###\ndone") == [" 30%|###"]
    assert buf.flush() == ["done"] and buf.flush() == []
    assert collapse_cr("a\rb\r\n".rstrip("\n")) == "b"


def test_series_stays_bounded_and_keeps_the_latest_value():
    series = Series(max_points=100)
    for step in range(1, 10_001):
        series.add(step, 1.0 / step)
    values = series.values()
    assert len(values) <= 101
    assert values[-1] == (10_000, 1.0 / 10_000)
    assert [s for s, _ in values] == sorted(s for s, _ in values)


def test_view_groups_ranks_by_host(tmp_path):
    view = JobView(make_job(tmp_path, nprocs=4, hosts=["gpu1", "gpu2"]))

    def groups():
        return [(g.title, [r.rank for r in g.ranks]) for g in view.host_groups()]

    # before the ranks say where they are: where they were planned
    assert groups() == [("host gpu1 — ranks 0-1", [0, 1]), ("host gpu2 — ranks 2-3", [2, 3])]
    # the rendezvous put them elsewhere, one on a host the caller did not name
    for rank, host in enumerate(["gpu2", "gpu1", "gpu1", "gpu3"]):
        view.apply(event(rank, "status", T0, {"state": "starting", "pid": 1000 + rank,
                                              "host": host}))
    view.apply(event(1, "status", T0 + 1, {"state": "running"}))  # the host stays
    assert groups() == [("host gpu1 — ranks 1-2", [1, 2]), ("host gpu2 — rank 0", [0]),
                        ("host gpu3 — rank 3", [3])]
    assert view.rank_name(view.ranks[3]) == "rank 3 @gpu3"
    assert view.rank_line(view.ranks[1]).startswith("rank 1 @gpu1 running")
    assert view.ranks_text() == "4 ranks on 3 hosts"
    assert format_ranks([0, 2, 3, 4, 7]) == "ranks 0, 2-4, 7"

    # one machine: no groups and no host in any label, whatever the ranks report
    for hosts in (None, ["gpu1"]):
        view = JobView(make_job(tmp_path, hosts=hosts))
        view.apply(event(0, "status", T0, {"state": "starting", "pid": 1, "host": "gpu1"}))
        assert view.host_groups() == []  # rank 1 has not named its host yet
        assert view.rank_name(view.ranks[0]) == "rank 0" and view.ranks_text() == "2 ranks"


def test_a_job_on_one_host_shows_no_hosts(tmp_path):
    """Whether the job names its one host and the ranks theirs, every display is as
    without hosts."""
    from nbdist.display.html import dashboard_html, dashboard_text
    from nbdist.display.terminal import TerminalDisplay

    shown = []
    for hosts, landed in ((None, None), (None, ["box", "box"]), (["box"], ["box", "box"])):
        events = on_hosts(recorded(), landed) if landed else recorded()
        clock, out = Clock(), io.StringIO()
        plain = PlainDisplay(stream=out, clock=clock)
        term = TerminalDisplay(console=rich_console(), clock=Clock(), show_after=0)
        for display in (plain, term):
            display.start(make_job(tmp_path, hosts=hosts))
        feed(plain, events, clock)
        feed(term, events, term._clock)
        live = rendered(term)
        for display in (plain, term):
            display.stop(failed_job(tmp_path))
        shown.append((out.getvalue(), live, rendered(term), dashboard_html(term.view),
                      dashboard_text(term.view)))
    assert "host" not in shown[0][1] and "@" not in shown[0][0]
    assert shown[1] == shown[0] and shown[2] == shown[0]


# --- plain -------------------------------------------------------------------------------
def test_plain_shows_failure_and_summary_and_bounds_progress(tmp_path):
    clock, out = Clock(), io.StringIO()
    plain = PlainDisplay(stream=out, clock=clock)
    job = make_job(tmp_path)
    plain.start(job)
    plain.output(0, "epoch 0 done\n")
    plain.output(1, "not shown\n")
    feed(plain, recorded(), clock)
    plain.stop(failed_job(tmp_path))
    lines = out.getvalue().splitlines()
    assert lines[0] == "epoch 0 done"
    assert "not shown" not in out.getvalue()
    assert "[nbdist] rank 1 failed  ValueError, exit code 1" in lines
    assert lines[-2] == "[nbdist] rank 0 final metrics: loss=0.03226 lr=0.1"
    assert lines[-1].startswith(f"[nbdist] job {job.id} failed in 7.0s (2 ranks; logs: ")


def test_plain_progress_lines_come_at_a_bounded_rate(tmp_path):
    clock, out = Clock(), io.StringIO()
    plain = PlainDisplay(stream=out, clock=clock)
    plain.start(make_job(tmp_path))
    events = [e for e in succeeded(epochs=30, steps=20) if e.rank == 0]  # ~30 s of events
    feed(plain, events, clock)
    plain.stop(end(make_job(tmp_path), "succeeded", ["done", "done"], [0, 0]))
    progress = [line for line in out.getvalue().splitlines()
                if line.startswith("[nbdist] rank 0 running")]
    span = events[-1].time - events[0].time
    assert span > 3 * PROGRESS_EVERY
    # one line per PROGRESS_EVERY, plus the end of the epoch loop shown mid-way
    assert 2 <= len(progress) <= span / PROGRESS_EVERY + 2
    assert "epoch 30/30 (100%)" in progress[-1]


def test_plain_shows_a_progress_line_per_rank_at_a_bounded_rate(tmp_path):
    """Only rank 0's output is copied, but every rank's progress gets its own lines."""
    clock, out = Clock(), io.StringIO()
    plain = PlainDisplay(stream=out, clock=clock)
    plain.start(make_job(tmp_path, nprocs=3))
    events = succeeded(nprocs=3, epochs=30, steps=20)  # ~30 s of events per rank
    feed(plain, events, clock)
    plain.stop(end(make_job(tmp_path, nprocs=3), "succeeded", ["done"] * 3, [0] * 3))
    lines = out.getvalue().splitlines()
    span = events[-1].time - events[0].time
    for r in range(3):
        progress = [line for line in lines if line.startswith(f"[nbdist] rank {r} running")]
        assert 2 <= len(progress) <= span / PROGRESS_EVERY + 2, (r, progress)
        assert "epoch 30/30 (100%)" in progress[-1]


def test_plain_all_ranks_prefixes_lines_and_redraws():
    out = io.StringIO()
    plain = PlainDisplay(all_ranks=True, stream=out)
    plain.output(1, "a\nb")
    plain.output(0, " 10%\r 20%\n")
    plain.output(1, "c\n")
    plain.flush_output()
    assert out.getvalue() == "[rank 1] a\n[rank 0]  10%\r[rank 0]  20%\n[rank 1] bc\n"


def test_plain_names_the_host_of_each_rank_on_several_hosts(tmp_path):
    clock, out = Clock(), io.StringIO()
    plain = PlainDisplay(stream=out, clock=clock)
    job, events = two_hosts(tmp_path)
    plain.start(job)
    plain.output(0, "epoch 0 done\n")
    feed(plain, events, clock)
    plain.stop(two_hosts_end(job))
    lines = out.getvalue().splitlines()
    assert lines[0] == "epoch 0 done"  # rank 0's output, as it printed it
    for r, host in enumerate(["gpu1", "gpu1", "gpu2", "gpu2"]):
        assert any(line.startswith(f"[nbdist] rank {r} @{host} running  epoch")
                   for line in lines), (r, lines)
    assert "[nbdist] rank 3 @gpu2 failed  ValueError, exit code 1" in lines
    assert lines[-2].startswith("[nbdist] rank 0 @gpu1 final metrics: loss=")
    assert lines[-1].startswith(f"[nbdist] job {job.id} failed in 7.0s (4 ranks; ")

    out = io.StringIO()  # streamed output keeps its prefix
    plain = PlainDisplay(all_ranks=True, stream=out)
    plain.start(job)
    plain.output(2, "two\n")
    assert out.getvalue() == "[rank 2] two\n"


# --- terminal (rich) ----------------------------------------------------------------------
def rich_console(width: int = 140):
    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=True, width=width,
                   color_system=None, legacy_windows=False)


def rendered(display) -> str:
    from rich.console import Console

    console = Console(record=True, width=140, file=io.StringIO(), color_system=None)
    console.print(display.render())
    return console.export_text()


def test_terminal_dashboard_of_the_recorded_failure(tmp_path):
    from nbdist.display.terminal import TerminalDisplay

    clock, console = Clock(), rich_console()
    term = TerminalDisplay(console=console, clock=clock, show_after=0)
    term.start(make_job(tmp_path))
    term.output(0, "epoch 0 done\n 50%|#####     | 10/20\r")
    feed(term, recorded(), clock)
    text = rendered(term)
    assert "nbdist job 20260101-000000-abcdef · running" in text
    row0 = next(line for line in text.splitlines() if "rank 0 running" in line)
    assert "50%" in row0 and "epoch 2/3 › train 10/20" in row0 and "loss=0.03226" in row0
    row1 = next(line for line in text.splitlines() if "rank 1 failed" in line)
    assert "epoch 2/3 › train 10/20" in row1
    assert "rank 1 failed: ValueError, exit code 1" in text  # the panel's title
    assert "ValueError: bad batch 10 on rank 1 <&>" in text  # ... and the log tail
    assert "loss █" in text and "0.03226" in text  # the sparkline, from 1.0 down
    assert "rank 0 ▸  50%|#####     | 10/20" in text  # the line being redrawn

    term.stop(failed_job(tmp_path))
    out = console.file.getvalue()
    assert out.count("epoch 0 done") == 1  # finished lines are printed once, above
    final = out[out.rindex("nbdist job"):]
    assert "failed" in final and "rank 0 killed" in final
    # the Live was stopped (rich >= 14.1 keeps a stack of them, older rich one)
    assert getattr(console, "_live_stack", []) == [] and getattr(console, "_live", None) is None


def test_terminal_redraws_at_most_ten_times_a_second(tmp_path):
    from nbdist.display.terminal import TerminalDisplay

    clock = Clock()
    term = TerminalDisplay(console=rich_console(), clock=clock, show_after=0)
    redraws = []
    term.start(make_job(tmp_path))
    real_update = term._live.update
    term._live.update = lambda *a, **k: (redraws.append(clock.t), real_update(*a, **k))
    events = succeeded(epochs=4, steps=50)  # 10 s of events at 20 Hz per rank
    feed(term, events, clock)
    for i in range(200):  # and output at 20 Hz
        clock.t += 0.05
        term.output(0, f"line {i}\n")
    span = clock.t - redraws[0]
    assert len(redraws) <= span / RENDER_INTERVAL + 2
    assert min(b - a for a, b in zip(redraws, redraws[1:])) >= RENDER_INTERVAL - 1e-9

    term.stop(end(make_job(tmp_path), "succeeded", ["done", "done"], [0, 0]))
    text = rendered(term)
    assert "succeeded" in text
    for r in range(2):
        row = next(line for line in text.splitlines() if f"rank {r} done" in line)
        assert "100%" in row and "epoch 4/4" in row


def test_loss_chart_scales(tmp_path):
    from nbdist.display.html import chart_svg

    view = JobView(make_job(tmp_path))
    assert chart_svg(view) == ""  # nothing reported yet
    for step, loss in enumerate([5.0, 0.5, 0.05, 0.01], start=1):
        view.apply(event(0, "metrics", T0 + step, {"values": {"loss": loss, "note": "x"},
                                                   "step": step}))
    view.apply(event(1, "metrics", T0, {"values": {"loss": 99.0}, "step": 1}))
    svg = chart_svg(view)
    assert svg.count("<polyline") == 1 and ">log</text>" in svg  # falls over decades
    assert ">5</text>" in svg and ">0.01</text>" in svg and ">99<" not in svg  # rank 0 only
    flat = JobView(make_job(tmp_path))
    for step in range(1, 4):
        flat.apply(event(0, "metrics", T0 + step, {"values": {"acc": 0.5 + step / 10},
                                                   "step": step}))
    assert flat.chart_keys() == ["acc"] and ">log</text>" not in chart_svg(flat)


def test_terminal_groups_rows_by_host(tmp_path):
    from nbdist.display.terminal import TerminalDisplay

    clock = Clock()
    term = TerminalDisplay(console=rich_console(), clock=clock, show_after=0)
    job, events = two_hosts(tmp_path)
    term.start(job)
    text = rendered(term)
    assert " · 4 ranks on 2 hosts · gloo" in text.splitlines()[0]
    starts = ["host gpu1 — ranks 0-1", "rank 0 pending", "rank 1 pending",
              "host gpu2 — ranks 2-3", "rank 2 pending", "rank 3 pending"]
    order = line_order(text, starts)
    assert order == sorted(order) and order[0] == 1, text
    feed(term, events, clock)
    term.stop(two_hosts_end(job))
    text = rendered(term)
    starts = ["host gpu1 — ranks 0-1", "rank 0 done", "rank 1 done",
              "host gpu2 — ranks 2-3", "rank 2 done", "rank 3 failed"]
    order = line_order(text, starts)
    assert order == sorted(order), text
    assert "rank 3 @gpu2 failed: ValueError, exit code 1" in text  # the panel's title


def test_sparkline_shape():
    from nbdist.display.terminal import sparkline

    assert sparkline([3, 2, 1]) == "█▅▁"
    assert sparkline([1, 1]) == "▅▅"
    assert len(sparkline(list(range(1000)), width=40)) == 40


# --- notebook (ipywidgets) ----------------------------------------------------------------
class Recorder:
    """Stands in for IPython's display(): keeps what would have been shown."""

    def __init__(self):
        self.shown: list[tuple[str, dict, str]] = []
        self.calls: list[str] = []  # begin / show / update / end, in order

    def begin(self):
        self.calls.append("begin")

    def end(self):
        self.calls.append("end")

    def show(self, bundle, display_id):
        self.calls.append("show")
        self.shown.append(("show", bundle, display_id))

    def update(self, bundle, display_id):
        self.calls.append("update")
        self.shown.append(("update", bundle, display_id))


def notebook(**kwargs):
    from nbdist.display.notebook import NotebookDisplay

    clock, out, publisher = Clock(), io.StringIO(), Recorder()
    return NotebookDisplay(clock=clock, stream=out, publisher=publisher,
                           **{"show_after": 0, **kwargs}), \
        clock, out, publisher


def test_a_task_over_before_show_after_gets_no_dashboard_and_a_long_one_does(tmp_path):
    """A warm pool's quick task prints its output and draws nothing (as tqdm's delay);
    a job still running after ``show_after`` gets its dashboard, with all it missed."""
    from nbdist.display.terminal import TerminalDisplay

    quick = succeeded(steps=2)
    nb, clock, out, publisher = notebook(show_after=0.5)
    term = TerminalDisplay(console=rich_console(), clock=clock, show_after=0.5)
    for display in (nb, term):
        display.start(make_job(tmp_path))
        display.output(0, "rank 0 says hi\n")
    for each in quick:  # the whole task inside 0.4 s of the display's clock
        clock.t += 0.4 / len(quick)
        nb.event(each)
        term.event(each)
        nb.tick()
        term.tick()
    job = end(make_job(tmp_path), "succeeded", ["done", "done"], [0, 0])
    nb.stop(job)
    term.stop(job)
    assert publisher.calls == [] and out.getvalue() == "rank 0 says hi\n"
    printed = term.console.file.getvalue()
    assert term._live is None and "rank 0 says hi" in printed
    assert "job" not in printed  # no dashboard was drawn

    nb, clock, out, publisher = notebook(show_after=0.5)
    nb.start(make_job(tmp_path))
    feed(nb, succeeded(), clock)  # 3 s of events: shown after 0.5 s
    assert publisher.calls[:2] == ["begin", "show"]
    nb.stop(end(make_job(tmp_path), "succeeded", ["done", "done"], [0, 0]))
    assert publisher.calls[-2:] == ["update", "end"]
    assert "loss" in publisher.shown[-1][1]["text/html"]  # the metrics before it showed


def test_notebook_dashboard_of_the_recorded_failure(tmp_path):
    nb, clock, out, publisher = notebook()
    nb.start(make_job(tmp_path))
    (kind, bundle, display_id), = publisher.shown
    assert kind == "show" and "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"].startswith("nbdist job 20260101-000000-abcdef running")
    nb.output(0, "epoch 0 done\n 50%\r")
    nb.output(1, "rank 1 is not streamed\n")
    feed(nb, recorded(), clock)

    assert out.getvalue() == "epoch 0 done\n 50%\r"  # rank 0's text, untouched
    row0, row1 = nb.rows
    assert "running" in row0.state.value and row0.progress.value == 50.0
    assert row0.progress.bar_style == ""
    assert "epoch 2/3 › train 10/20 (50%)" in row0.info.value
    assert "loss=0.03226" in row0.metrics.value
    assert "failed" in row1.state.value and row1.progress.bar_style == "danger"
    assert "ValueError, exit code 1" in row1.info.value
    assert "rank 1 failed: ValueError, exit code 1" in nb.failures.value
    assert "bad batch 10 on rank 1 &lt;&amp;&gt;" in nb.failures.value  # escaped
    assert "<circle" in nb.chart.value  # the chart's first point; redrawn at most 2/s
    clock.t += 1
    nb.tick()  # what the supervision loop calls between events
    assert "<polyline" in nb.chart.value and nb.chart.layout.display == ""
    assert "running" in nb.header.value

    nb.stop(failed_job(tmp_path))
    kind, final, final_id = publisher.shown[-1]
    assert kind == "update" and final_id == display_id  # replaces the widgets in place
    assert set(final) == {"text/html", "text/plain"}
    assert final["text/plain"].splitlines()[0].startswith(
        "nbdist job 20260101-000000-abcdef failed in 0:07")
    assert "rank 1 failed  ValueError, exit code 1" in final["text/plain"]
    assert "bad batch 10" in final["text/plain"]
    assert "rank 0</td><td><span style=\"color:#bc4c00; font-weight:600\">killed" in \
        final["text/html"]
    assert "<polyline" in final["text/html"]
    assert row0.progress.comm is None and nb.box.comm is None  # widgets closed


def test_notebook_live_bundle_has_a_fallback_for_a_notebook_saved_mid_run(tmp_path):
    """Saved while the job runs, the output keeps only this bundle: after a reload the
    widgets' models are gone, so the HTML and text must say something on their own."""
    nb, clock, out, publisher = notebook()
    job = make_job(tmp_path)
    nb.start(job)
    (kind, bundle, display_id), = publisher.shown
    assert kind == "show"
    assert set(bundle) == {"application/vnd.jupyter.widget-view+json", "text/html",
                           "text/plain"}
    html_, text = bundle["text/html"], bundle["text/plain"]
    assert "<b>nbdist</b> job" in html_ and "nbdist job" in text
    for shown in (html_, text):
        assert job.id in shown and "running…" in shown and job.dir in shown
        assert "the live view needs the kernel" in shown
    assert "2 ranks" in html_ and "gloo" in html_
    assert "<div" in html_ and "<script" not in html_
    assert "nbdist-dashboard" not in html_  # that class marks the final dashboard
    assert text.startswith(f"nbdist job {job.id} running")
    # the frontend is warned before the first widget exists, and released at the end
    assert publisher.calls == ["begin", "show"]
    nb.stop(end(job, "succeeded", ["done", "done"], [0, 0]))
    assert publisher.calls == ["begin", "show", "update", "end"]


def test_notebook_success_shows_every_rank_done_at_100(tmp_path):
    nb, clock, out, publisher = notebook()
    nb.start(make_job(tmp_path))
    header_values = []
    nb.header.observe(lambda change: header_values.append(clock.t), "value")
    events = succeeded(epochs=3, steps=40)
    feed(nb, events, clock)
    span = events[-1].time - events[0].time
    # redraws at most every RENDER_INTERVAL although events come at 40 Hz
    assert len(header_values) <= span / RENDER_INTERVAL + 2
    nb.stop(end(make_job(tmp_path), "succeeded", ["done", "done"], [0, 0]))
    for row in nb.rows:
        assert row.progress.value == 100.0 and row.progress.bar_style == "success"
        assert "done" in row.state.value and "epoch 3/3 (100%)" in row.info.value
    text = publisher.shown[-1][1]["text/plain"]
    assert text.splitlines()[0].startswith("nbdist job 20260101-000000-abcdef succeeded")
    assert "(2 ranks: 2 done)" in text.splitlines()[0]
    for r in range(2):
        assert f"rank {r} done  epoch 3/3 (100%)" in text


def test_notebook_all_ranks_streams_prefixed_output(tmp_path):
    nb, clock, out, publisher = notebook(all_ranks=True)
    job = make_job(tmp_path)
    nb.start(job)
    nb.output(0, "zero\n")
    nb.output(1, "one")
    nb.stop(end(job, "succeeded", ["done", "done"], [0, 0]))
    assert out.getvalue() == "[rank 0] zero\n[rank 1] one\n"


def append(path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def test_notebook_log_view_follows_the_picked_rank(tmp_path, monkeypatch):
    from nbdist.display import notebook as nb_module
    from nbdist.display.state import LOG_VIEW_LINES, LogTail

    opened = []  # the logs the view reads

    class Spy(LogTail):
        def read(self):
            opened.append(self.path.name)
            return super().read()

    monkeypatch.setattr(nb_module, "LogTail", Spy)
    nb, clock, out, publisher = notebook()
    job = make_job(tmp_path)
    nb.start(job)
    picker, area = nb.logs.picker, nb.logs.area
    assert picker.options == (("none", -1), ("0", 0), ("1", 1)) and picker.value == -1
    assert area.layout.display == "none"
    feed(nb, recorded()[:10], clock)
    assert opened == []  # no rank picked: no log read

    picker.value = 1  # what the frontend's click does, from its comm's thread
    clock.t += 1
    nb.tick()
    assert area.layout.display == ""
    assert "rank 1's output, live" in area.value and "rank-1.log" in area.value
    assert "bad batch 10 on rank 1 &lt;&amp;&gt;" in area.value  # escaped
    assert "100%" in area.value and "10%" not in area.value  # \r redraws collapsed
    assert set(opened) == {"rank-1.log"}

    log1 = tmp_path / "job" / "rank-1.log"
    append(log1, "\x1b[31mred\x1b[0m text from rank 1\npartial")
    nb.tick()  # read at most every RENDER_INTERVAL
    assert "text from rank 1" not in area.value
    clock.t += RENDER_INTERVAL
    nb.tick()
    assert "red text from rank 1\npartial" in area.value  # colour codes dropped
    append(log1, "".join(f"line {i}\n" for i in range(1000)))
    clock.t += RENDER_INTERVAL
    nb.tick()
    shown = area.value[area.value.index("<pre"):]
    assert "line 999" in shown and f"line {999 - LOG_VIEW_LINES}\n" not in shown
    assert shown.count("\n") <= LOG_VIEW_LINES
    assert "line 999" not in out.getvalue()  # the cell's own output is rank 0's only

    reads = len(opened)
    clock.t += 5 * RENDER_INTERVAL
    nb.tick()
    assert len(opened) == reads + 1  # one cheap look per tick due, nothing redrawn
    picker.value = 0
    clock.t += RENDER_INTERVAL
    nb.tick()
    assert "epoch 0 done" in area.value and "rank 1" not in area.value
    assert opened[reads + 1:] == ["rank-0.log"]
    picker.value = -1
    clock.t += RENDER_INTERVAL
    nb.tick()
    assert area.layout.display == "none"
    nb.stop(failed_job(tmp_path))
    assert picker.comm is None and area.comm is None  # closed with the others


def test_notebook_groups_rows_by_host(tmp_path):
    nb, clock, out, publisher = notebook()
    # planned 2 × 2, but the rendezvous put ranks 0 and 2 on gpu1
    job, events = two_hosts(tmp_path, landed=["gpu1", "gpu2", "gpu1", "gpu2"])
    nb.start(job)
    heads, rows = nb.host_headers, [row.box for row in nb.rows]
    assert nb.box.children[1:7] == (heads["gpu1"], rows[0], rows[1],
                                    heads["gpu2"], rows[2], rows[3])
    assert "host gpu1 — ranks 0-1" in heads["gpu1"].value
    assert "4 ranks on 2 hosts" in nb.header.value
    assert "4 ranks on 2 hosts" in publisher.shown[0][1]["text/plain"]
    feed(nb, events, clock)
    assert nb.box.children[1:7] == (heads["gpu1"], rows[0], rows[2],
                                    heads["gpu2"], rows[1], rows[3])
    assert "host gpu1 — ranks 0, 2" in heads["gpu1"].value
    assert "host gpu2 — ranks 1, 3" in heads["gpu2"].value
    assert "rank 3 @gpu2 failed: ValueError, exit code 1" in nb.failures.value

    nb.stop(two_hosts_end(job))
    final = publisher.shown[-1][1]
    page = final["text/html"]
    where = [page.index(part) for part in ("host gpu1 — ranks 0, 2", ">rank 0</td>",
                                           ">rank 2</td>", "host gpu2 — ranks 1, 3",
                                           ">rank 1</td>", ">rank 3</td>")]
    assert where == sorted(where)
    assert "rank 3 @gpu2 failed: ValueError" in page  # the failure panel
    assert "rank 2 @gpu1 <span" in page  # the collapsed log of rank 2
    text = final["text/plain"]
    assert "  rank 1 @gpu2 done  epoch 2/2 (100%)" in text
    assert "  rank 3 @gpu2 failed  ValueError, exit code 1" in text
    assert "--- last lines of rank 3 @gpu2's log ---" in text
    assert heads["gpu1"].comm is None  # closed with the other widgets


def test_notebook_final_summary_keeps_every_ranks_log_tail(tmp_path):
    nb, clock, out, publisher = notebook()
    job = make_job(tmp_path)
    append(tmp_path / "job" / "rank-0.log", "".join(f"step {i}\n" for i in range(40)))
    nb.start(job)
    feed(nb, recorded(), clock)
    nb.stop(end(job, "failed", ["killed", "failed"], [-15, 1]))
    final = publisher.shown[-1][1]["text/html"]
    logs = final[final.index("<details"):]
    assert logs.count("<details>") == 2 and "<details open" not in logs  # collapsed
    first, second = logs.split("</details>")[:2]
    assert "rank 0 <span" in first and ">killed</span> · last 15 lines of rank-0.log" in first
    assert "step 39" in first and "step 25" in first and "step 24\n" not in first
    assert "rank 1 <span" in second and ">failed</span>" in second
    assert "bad batch 10 on rank 1 &lt;&amp;&gt;" in second


def test_log_tail_reads_only_what_was_appended_and_stays_bounded(tmp_path):
    from nbdist.display.state import LogTail

    path = tmp_path / "rank-3.log"
    tail = LogTail(path, max_lines=5, max_bytes=100)
    assert not tail.read() and tail.text == ""  # not written yet
    accent = "é".encode()
    path.write_bytes(b"a\n10%\r20%\rb " + accent[:1])  # half a character, so far
    assert tail.read() and tail.text == "a\nb "  # the redrawn line as a terminal shows it
    with open(path, "ab") as f:
        f.write(accent[1:] + b"\n")
    assert tail.read() and tail.text == "a\nb é"
    assert not tail.read()  # nothing new
    append(path, "".join(f"{i:03d}\n" for i in range(100)))  # 400 bytes > max_bytes
    assert tail.read()
    assert tail.text == "095\n096\n097\n098\n099"  # only the end was read, 5 lines kept
    path.write_text("new\n")  # rewritten from the start
    assert tail.read() and tail.text == "new"


class FakeKernel:
    """ipykernel's two methods that ``busy.py`` relies on, recording what goes to IOPub."""

    def __init__(self, cell: str = "cell-1"):
        self.parents = {"shell": {"header": {"msg_id": cell, "msg_type": "execute_request"}},
                        "control": {}}
        self.iopub: list[tuple[str, str]] = []  # (state, parent msg_id)

    def get_parent(self, channel="shell"):
        return self.parents[channel]

    def _publish_status(self, status, channel, parent=None):
        parent = parent or self.get_parent(channel)
        self.iopub.append((status, parent["header"]["msg_id"]))

    def control_request(self, msg_id: str) -> None:
        """What ipykernel's control thread does for e.g. a create_subshell_request."""
        self.parents["control"] = {"header": {"msg_id": msg_id}}
        self._publish_status("busy", "control")
        self._publish_status("idle", "control")


def test_busy_hold_answers_foreign_idles_until_the_cell_ends(monkeypatch):
    from nbdist.display import busy

    kernel = FakeKernel()
    busy.hold(kernel)
    busy.hold(kernel)  # a second job in the same cell: still one hold
    kernel.control_request("create-subshell")
    assert kernel.iopub == [("busy", "create-subshell"), ("idle", "create-subshell"),
                            ("busy", "cell-1")]  # the frontend's last word: busy
    busy.release()
    kernel.control_request("delete-subshell")  # the widgets' closing, within the drain
    assert kernel.iopub[-1] == ("busy", "cell-1")
    kernel._publish_status("idle", "shell")  # the cell's own end removes the hold
    assert "_publish_status" not in kernel.__dict__
    kernel.control_request("later")
    assert kernel.iopub[-2:] == [("busy", "later"), ("idle", "later")]

    # a hold whose cell never ends here (a job run from a thread) lapses after the drain
    busy.hold(kernel)
    busy.release()
    monkeypatch.setattr(busy, "DRAIN_SECONDS", 0.0)
    busy.release()  # idempotent: the first deadline stands...
    kernel.control_request("within")
    assert kernel.iopub[-1] == ("busy", "cell-1")
    busy._current.deadline = time.monotonic() - 1  # ...until it passed
    kernel.control_request("after")
    assert kernel.iopub[-1] == ("idle", "after") and "_publish_status" not in kernel.__dict__

    busy.hold(FakeKernel(cell=""))  # not inside a request: nothing to hold
    busy.hold(object())  # not a kernel at all
    assert busy._current is None


# --- choosing and guarding ------------------------------------------------------------------
class Exploding(Display):
    def event(self, event):
        raise RuntimeError("boom in the display")


def test_a_failing_display_falls_back_to_plain_and_keeps_the_output(tmp_path, caplog):
    out = io.StringIO()
    guarded = GuardedDisplay(Exploding(), fallback=lambda: PlainDisplay(stream=out))
    job = make_job(tmp_path)
    guarded.start(job)
    with caplog.at_level(logging.WARNING, logger="nbdist.display"):
        guarded.event(recorded()[0])
    assert "Exploding display failed in event()" in caplog.text
    assert "boom in the display" in caplog.text
    guarded.output(0, "still shown\n")
    guarded.stop(end(job, "succeeded", ["done", "done"], [0, 0]))
    assert out.getvalue().startswith("still shown\n[nbdist] job ")


def test_the_stop_button_goes_through_the_guard(tmp_path):
    class Interrupted(Display):
        def tick(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        GuardedDisplay(Interrupted()).tick()


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_create_picks_by_environment(monkeypatch):
    from nbdist.display.terminal import TerminalDisplay

    with pytest.raises(InvalidArgumentError, match="display='fancy' is not one of"):
        displays.create("fancy")
    assert type(displays.create("none")) is Display
    assert displays.resolve("auto") == "plain"  # pytest's stdout is not a terminal
    assert isinstance(displays.create().inner, PlainDisplay)
    monkeypatch.setattr(sys, "stdout", FakeTTY())
    assert isinstance(displays.create(all_ranks=True).inner, TerminalDisplay)
    assert displays.create(all_ranks=True).all_ranks is True
    monkeypatch.setenv("TERM", "dumb")
    assert displays.resolve() == "plain"
    monkeypatch.setenv(displays.ENV_DISPLAY, "none")
    assert displays.resolve() == "none"
    # outside a kernel, an explicit notebook display becomes plain text
    assert isinstance(displays.create("notebook").inner, PlainDisplay)


def test_missing_rich_or_ipywidgets_means_plain_text(monkeypatch):
    for name in list(sys.modules):  # None in sys.modules: "import fails"
        if name.split(".")[0] in ("rich", "ipywidgets"):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    monkeypatch.delitem(sys.modules, "nbdist.display.terminal", raising=False)
    monkeypatch.delitem(sys.modules, "nbdist.display.notebook", raising=False)
    monkeypatch.setattr(displays, "in_jupyter_kernel", lambda: True)
    assert isinstance(displays.create("notebook").inner, PlainDisplay)
    assert isinstance(displays.create("terminal").inner, PlainDisplay)


def test_import_nbdist_does_not_import_display_libraries():
    code = ("import sys, nbdist, nbdist.display; "
            "print([m for m in ('ipywidgets', 'rich', 'IPython') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --- the worker's side ----------------------------------------------------------------------
def test_track_and_report_send_throttled_events(tmp_path, monkeypatch):
    from nbdist import runtime

    monkeypatch.setattr(runtime, "_pending_metrics", {})
    monkeypatch.setattr(runtime, "_report_step", 0)
    monkeypatch.setattr(runtime, "_last_metrics_emit", 0.0)
    writer = ChannelWriter(tmp_path / "events-rank-0.jsonl")
    runtime._attach(writer)
    try:
        for i in runtime.track(range(50_000), desc="fast"):
            runtime.report(loss=1.0 / (i + 1))
        assert list(runtime.track(iter([1, 2]))) == [1, 2]
    finally:
        runtime._attach(None)
        writer.close()
    events = ChannelReader({0: tmp_path / "events-rank-0.jsonl"}).poll()
    progress = [e.body for e in events if e.kind == "progress"]
    metrics = [e.body for e in events if e.kind == "metrics"]
    assert progress[0] == Progress(progress[0].bar, "fast", 0, 50_000)
    assert progress[1].n == 50_000 or not progress[1].closed
    fast = [p for p in progress if p.desc == "fast"]
    assert fast[-1].closed and fast[-1].n == 50_000
    assert len(events) < 100  # 50k iterations, a handful of events
    # the last value was held back by the throttle and sent when the loop ended
    assert metrics[-1] == Metrics({"loss": 1.0 / 50_000}, 50_000)
    unknown = [p for p in progress if p.desc is None]
    assert unknown[-1] == Progress(unknown[-1].bar, None, 2, None, closed=True)


def test_channel_reader_never_reorders_one_ranks_events(tmp_path):
    paths = {r: tmp_path / f"events-rank-{r}.jsonl" for r in range(2)}
    lines = {0: [("starting", 10.0), ("joining", 9.0), ("ready", 11.0)],  # clock stepped back
             1: [("running", 9.5), ("done", 10.5)]}
    for rank, items in lines.items():
        paths[rank].write_text("".join(json.dumps({"kind": "status", "time": t,
                                                   "state": s}) + "\n" for s, t in items))
    with open(paths[1], "a") as f:
        f.write('{"kind": "status", "time": 12.0, "sta')  # half written: later
    events = ChannelReader(paths).poll()
    assert [e.body.state for e in events if e.rank == 0] == ["starting", "joining", "ready"]
    assert [e.body.state for e in events if e.rank == 1] == ["running", "done"]
    assert len(events) == 5


# --- a real job on a real terminal ---------------------------------------------------------
TTY_SCRIPT = """
import time
import nbdist
from nbdist import track, report

def train():
    for epoch in track(range(2), desc="epoch"):
        for step in track(range(10), desc="train"):
            time.sleep(0.02)
            report(loss=1.0 / (1 + epoch * 10 + step))
    print("redrawn: ", end="")
    for i in range(5):
        print(f"\\r{i * 25}%", end="", flush=True)
        time.sleep(0.05)
    print(" ok")
    return 7

print("result", nbdist.run_distributed(train, nprocs=2))
"""


@pytest.mark.slow
def test_terminal_dashboard_on_a_real_tty(tmp_path):
    """stdout is a pseudo-terminal: auto picks rich; the final frame stays on screen."""
    import pty
    import re
    import select

    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="120", LINES="40")
    env.pop(displays.ENV_DISPLAY, None)
    proc = subprocess.Popen([sys.executable, "-c", TTY_SCRIPT], stdin=slave, stdout=slave,
                            stderr=slave, env=env, cwd=tmp_path, start_new_session=True)
    os.close(slave)
    out, deadline = b"", time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
    assert proc.returncode == 0, text[-3000:]
    assert "result 7" in text
    final = text[text.rindex("nbdist job"):]
    assert " · succeeded · " in final
    for r in range(2):
        assert re.search(rf"rank {r} done +━+ 100% epoch 2/2 \(100%\)", final), final
    assert "loss █" in final
    assert "100% ok" in text  # the line redrawn with \r, in its final state


# --- a real job in a real Jupyter kernel ------------------------------------------------------
SETUP_CELL = """
import os
os.environ["NBDIST_HOME"] = {home!r}
%load_ext nbdist
"""
TRAIN_CELL = """%%distributed --nprocs 2
import time
total = 0
for epoch in track(range(2), desc="epoch"):
    for step in track(range(8), desc="train"):
        time.sleep(0.03)
        total += 1
        report(loss=1.0 / (1 + step + 8 * epoch))
    print(f"epoch {epoch} done on rank {rank}", flush=True)
"""


def start_kernel(tmp_path):
    """This Python's ipykernel, whatever kernelspecs the machine has installed."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    spec = tmp_path / "kernels" / "nbdist-display-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "nbdist display test", "language": "python"}))
    km = KernelManager(kernel_name=spec.name,
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))
    km.start_kernel(cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return km, kc


# status messages JupyterLab does not let change the kernel status it shows (the
# server's default ``untracked_message_types``, those of parents on the control channel)
LAB_UNTRACKED = {"comm_info_request", "kernel_info_request", "shutdown_request",
                 "interrupt_request", "debug_request"}


class LabComms:
    """Does what JupyterLab (commsOverSubshells="perCommTarget") does about comms: the
    first comm of a target the kernel opens gets a subshell, asked for on the control
    channel; closing its last comm deletes that subshell."""

    def __init__(self, kc):
        self.kc = kc
        self.open: set[str] = set()
        self.subshell: str | None = None
        self.requested = False

    def seen(self, kind: str, content: dict) -> None:
        self._read_replies()
        if kind == "comm_open":
            self.open.add(content["comm_id"])
            if not self.requested:
                self.requested = True
                self._send("create_subshell_request", {})
        elif kind == "comm_close":
            self.open.discard(content["comm_id"])
            if not self.open and self.requested:
                self._read_replies(wait=5.0)
                self._send("delete_subshell_request", {"subshell_id": self.subshell})
                self.requested, self.subshell = False, None

    def _send(self, msg_type: str, content: dict) -> None:
        self.kc.control_channel.send(self.kc.session.msg(msg_type, content))

    def _read_replies(self, wait: float = 0.0) -> None:
        deadline = time.monotonic() + wait
        while True:
            try:
                reply = self.kc.get_control_msg(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if reply["msg_type"] == "create_subshell_reply":
                self.subshell = reply["content"]["subshell_id"]
                return


def run_cell(kc, code: str, models: dict[str, dict], timeout: float = 120, *,
             lab: LabComms | None = None,
             statuses: list[tuple[str, str, bool]] | None = None) -> list[dict]:
    """Execute ``code``; return its output messages, folding widget state into ``models``.

    ``statuses`` gets every status message until the cell's end: (execution state,
    parent type, whether the parent is this cell); ``lab`` answers comms as Lab does.
    """
    msg_id = kc.execute(code)
    outputs = []
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        kind, content = msg["msg_type"], msg["content"]
        mine = msg["parent_header"].get("msg_id") == msg_id
        if kind == "status" and statuses is not None:
            statuses.append((content["execution_state"],
                             msg["parent_header"].get("msg_type"), mine))
        if lab is not None:
            lab.seen(kind, content)
        if kind == "comm_open":
            models[content["comm_id"]] = dict(content["data"]["state"])
        elif kind == "comm_msg" and content["data"].get("method") == "update":
            models[content["comm_id"]].update(content["data"]["state"])
        elif not mine:
            continue
        elif kind == "status" and content["execution_state"] == "idle":
            return outputs
        elif kind not in ("status", "execute_input"):
            outputs.append(msg)


@pytest.mark.slow
def test_real_kernel_magic_shows_every_rank_done_at_100(nbdist_home, tmp_path):
    """A ``%%distributed`` cell in an ipykernel: auto picks the widgets; read their state."""
    km, kc = start_kernel(tmp_path)
    models: dict[str, dict] = {}
    statuses: list[tuple[str, str, bool]] = []
    try:
        setup = run_cell(kc, SETUP_CELL.format(home=nbdist_home), models)
        assert not [m for m in setup if m["msg_type"] == "error"], setup
        outputs = run_cell(kc, TRAIN_CELL, models, lab=LabComms(kc), statuses=statuses)
        check = run_cell(kc, "print(total)", models)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    # JupyterLab shows the kernel state of the last status message it tracks, whatever
    # its parent: the kernel must look busy from the cell's start to its end, although
    # the widgets made the frontend ask for a subshell on the control channel meanwhile
    assert ("idle", "create_subshell_request", False) in statuses, statuses
    start = statuses.index(("busy", "execute_request", True))
    shown = [state for state, parent, _ in statuses[start:-1] if parent not in LAB_UNTRACKED]
    for i, state in enumerate(shown):
        assert state == "busy" or shown[i + 1:i + 2] == ["busy"], statuses
    assert statuses[-1] == ("idle", "execute_request", True)
    by_kind: dict[str, list[dict]] = {}
    for msg in outputs:
        by_kind.setdefault(msg["msg_type"], []).append(msg["content"])
    assert "error" not in by_kind, by_kind.get("error")
    printed = [m["content"]["text"] for m in check if m["msg_type"] == "stream"]
    assert "".join(printed) == "16\n"  # the cell's result came back (in one or two chunks)

    bars = [m for m in models.values() if m.get("_model_name") == "FloatProgressModel"]
    assert len(bars) == 2
    assert all(m["value"] == 100.0 and m["bar_style"] == "success" for m in bars), bars
    rows = [m for m in models.values() if m.get("_model_name") == "HTMLModel"
            and "epoch" in m.get("value", "")]
    assert len(rows) == 2 and all("epoch 2/2 (100%)" in m["value"] for m in rows), rows

    shown, = by_kind["display_data"]
    assert "application/vnd.jupyter.widget-view+json" in shown["data"]
    final, = by_kind["update_display_data"]
    assert final["transient"]["display_id"] == shown["transient"]["display_id"]
    text = final["data"]["text/plain"]
    assert " succeeded in " in text.splitlines()[0] and "2 done" in text.splitlines()[0]
    for r in range(2):
        assert f"rank {r} done  epoch 2/2 (100%)" in text
    assert "loss=" in text and "<polyline" in final["data"]["text/html"]
    streamed = "".join(s["text"] for s in by_kind["stream"] if s["name"] == "stdout")
    assert "epoch 1 done on rank 0" in streamed and "on rank 1" not in streamed


def test_a_pool_task_shows_its_pool_and_its_ranks_busy_then_idle(tmp_path):
    from nbdist.display.html import dashboard_html
    from nbdist.display.state import JobView

    job = make_job(tmp_path)
    job.pool = "20260101-000000-000-pool"
    view = JobView(job)
    view.apply(event(0, "status", T0, {"state": "running"}))
    view.apply(event(1, "status", T0, {"state": "done"}))
    assert [view.label(r) for r in view.ranks] == ["busy", "idle"]
    assert view.summary().startswith(f"nbdist task {job.id} on pool {job.pool} running for")
    assert "1 busy, 1 idle" in view.summary()
    page = dashboard_html(view)
    assert f"task <code>{job.id}</code> on pool <code>{job.pool}</code>" in page
    assert ">busy</span>" in page and ">idle</span>" in page
    job.pool = None  # a cold job's ranks keep their own words
    assert [view.label(r) for r in view.ranks] == ["running", "done"]
