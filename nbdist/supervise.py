"""The one supervision loop, for a cold job and for every phase of a pool.

::

    Supervisor(launch, job, view, Limits(timeout, init_timeout, stall_warning))
      .follow(goal)      until the launch ends (goal None) or goal(job, now) holds:
        │ pump: the launch's notices, the ranks' events (into the job record and the
        │       display), the shown ranks' new output
        │ deadlines: timeout / init_timeout → every rank's stack, kill, raise
        │ stall: no progress for stall_warning and a rank in a collective → warn once
        ▼ wait for the bell (a rank ready, done or failed) or an exit, at most POLL

A cold job follows until torchrun exits. A pool follows named goals: its ranks have
joined (:func:`ranks_ready`), a task is over (:class:`TaskOver`: every rank reported,
or one failed ``grace`` seconds ago), every rank reported (:func:`every_rank_reported`).
Each phase is a goal of its own; the loop, the deadlines and what is shown are the same
for all. An interrupt (``KeyboardInterrupt``) leaves ``follow`` as it came: what it
means is the owner's to decide (a cold job kills, a pool asks its ranks first).

The launch owns its processes and finds its ranks itself; the supervisor only reads
what they report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nbdist import rankstacks
from nbdist.channel import ChannelReader, LogFollower
from nbdist.display import Display
from nbdist.errors import InitTimeoutError, JobTimeoutError
from nbdist.job import Job
from nbdist.jobdir import JobDir, tail
from nbdist.launch import Launcher
from nbdist.protocol import Event, Status
from nbdist.states import NOT_JOINED, REPORTED, EventKind, JobState, RankState

POLL = 0.05  # seconds between looks at the ranks' output when no event rings the bell

Goal = Callable[[Job, float], bool]  # (the record, the supervisor's clock) -> done


@dataclass(frozen=True)
class Limits:
    """How long a phase may take, and when a quiet job is worth a warning."""

    timeout: float | None = None  # from the ranks' start
    init_timeout: float | None = None  # for every rank to join the process group
    stall_warning: float | None = None  # seconds without progress, with one in a collective


def ranks_ready(job: Job, now: float) -> bool:
    """A pool's ranks have all joined the process group."""
    return all(r.state == RankState.READY for r in job.ranks)


def every_rank_reported(job: Job, now: float) -> bool:
    """Every rank of the task reported its outcome (done or failed)."""
    return all(r.state in REPORTED for r in job.ranks)


class TaskOver:
    """A pool's task is over: every rank reported, or one failed ``grace`` seconds ago
    and the others still run (likely stuck waiting for it in a collective)."""

    def __init__(self, grace: float):
        self.grace = grace
        self.first_failure: float | None = None

    def __call__(self, job: Job, now: float) -> bool:
        if every_rank_reported(job, now):
            return True
        if self.first_failure is None and any(r.state == RankState.FAILED for r in job.ranks):
            self.first_failure = now
        return self.first_failure is not None and now - self.first_failure > self.grace


class Supervisor:
    """Follows one job record (a cold job, a pool's own ranks, or one task)."""

    def __init__(self, launch: Launcher, job: Job, view: Display, limits: Limits = Limits(),
                 *, clock: Callable[[], float] = time.monotonic):
        self.launch = launch
        self.job = job
        self.view = view
        self.limits = limits
        self.clock = clock
        self._folder = JobDir(job.dir)
        self._events = ChannelReader({r: self._folder.events(r)
                                      for r in range(job.world_size)})
        self._logs: dict[int, LogFollower] = {}  # the ranks whose output the view shows
        self._began: float | None = None  # on this clock, once the ranks' processes run
        self._stall = _StallWatch(launch, limits.stall_warning, clock)

    def follow(self, goal: Goal | None = None) -> int | None:
        """Pump until the launch exits (its code) or ``goal`` holds (None). Raises
        ``JobTimeoutError`` / ``InitTimeoutError`` past the limits, everything killed."""
        while True:
            code = self.launch.poll()
            self.pump(final=code is not None)
            if code is not None:
                return code
            if goal is not None and goal(self.job, self.clock()):
                self.pump(final=True)  # an outcome is written after the rank's last output
                return None
            self.view.tick()  # redraw the clock between events (the display throttles)
            self._stall.check(self.view)
            self._check_deadlines()
            self.launch.wait(POLL)

    def close(self) -> None:
        """Let go of the ranks' files (the job is over, or this phase of a pool)."""
        self._events.close()
        for follower in self._logs.values():
            follower.close()

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def pump(self, final: bool = False, *, events_only: bool = False) -> None:
        """Take in what happened since the last look: notices, events, output.
        ``events_only``: fold the events into the record, and leave the notices and
        the output for a view that will show them (a pool's status between calls)."""
        launch, job, view = self.launch, self.job, self.view
        if job.hosts is None and launch.hosts:  # Slurm's nodes, once allocated
            job.hosts = launch.hosts
        if not events_only:
            for notice in launch.take_notices():
                view.notice(notice)
        for event in self._events.poll():
            _apply(event, job)
            view.event(event)
            if event.kind != EventKind.HEARTBEAT:
                self._stall.progress()
        if events_only:
            return
        for rank in range(job.world_size) if view.all_ranks else [0]:
            follower = self._logs.get(rank)
            if follower is None:  # from the start of its log: a view set later sees it all
                follower = self._logs[rank] = LogFollower(self._folder.log(rank))
            text = follower.read(final)
            if text:
                view.output(rank, text)
                self._stall.progress()

    def _check_deadlines(self) -> None:
        limits = self.limits
        if self._began is None:
            if self.launch.started_at is None:  # still in Slurm's queue: the limits count
                return                          # from the start of the ranks' processes
            self._began = self.clock()  # on this clock (a launch keeps time.monotonic)
        elapsed = self.clock() - self._began
        if limits.timeout is not None and elapsed > limits.timeout:
            raise self._stop(_timeout_error, limits.timeout)
        if (limits.init_timeout is not None and elapsed > limits.init_timeout
                and any(r.state in NOT_JOINED for r in self.job.ranks)):
            raise self._stop(_init_timeout_error, limits.init_timeout)

    def _stop(self, error: Callable[[Job, float, str], BaseException],
              limit: float) -> BaseException:
        dumps = rankstacks.collect(self.launch)  # before the kill: where each is stuck
        self.launch.kill()
        self.pump(final=True)
        self.job.status = JobState.TIMEOUT
        return error(self.job, limit, rankstacks.report(dumps) if dumps else "")


class _StallWatch:
    """Warns once when no rank made progress for ``seconds`` and one waits in a
    collective: the likeliest hang in DDP (a rank skipped a collective, or is still
    in its data loader). Nothing is killed."""

    def __init__(self, launch: Launcher, seconds: float | None, clock: Callable[[], float]):
        self.launch = launch
        self.seconds = seconds
        self.clock = clock
        self.last = clock()
        self.warned = False

    def progress(self) -> None:
        self.last = self.clock()

    def check(self, view: Display) -> None:
        quiet = self.clock() - self.last
        if self.seconds is None or self.warned or quiet < self.seconds:
            return
        self.last = self.clock()  # look again after as long, if not now
        dumps = rankstacks.collect(self.launch)
        waiting = [r for r, dump in sorted(dumps.items())
                   if rankstacks.in_collective(rankstacks.main_thread(dump))]
        if not waiting:
            return
        self.warned = True
        view.notice(
            f"[nbdist] no rank has made progress for {quiet:.0f}s and rank(s) "
            f"{', '.join(map(str, waiting))} wait in a collective: the job may be stuck "
            f"(a rank that skipped a collective, or one still loading data). It goes on; "
            f"where each rank is:\n{rankstacks.report(dumps)}")


def _apply(event: Event, job: Job) -> None:
    """Fold a rank's status into the job record."""
    body = event.body
    if not isinstance(body, Status) or not 0 <= event.rank < len(job.ranks):
        return
    status = job.ranks[event.rank]
    status.state = body.state
    if body.pid is not None:
        status.pid = body.pid
        status.host = body.host
    if body.exitcode is not None:
        status.exitcode = body.exitcode
    if body.error is not None:
        status.error = body.error
    if status.state == RankState.DONE:
        status.exitcode = 0


def _last_lines(job: Job, ranks: list[int]) -> str:
    """The last log lines of ``ranks``, one block per rank, for timeout errors."""
    return "\n".join(
        f"--- rank {r} ---\n{tail(Path(job.ranks[r].log), 5) or '(no output)'}"
        for r in ranks)


def _timeout_error(job: Job, timeout: float, where: str) -> JobTimeoutError:
    running = [r.rank for r in job.ranks if r.state not in REPORTED]
    lines = _last_lines(job, running)
    stacks = f"\nWhere each rank was:\n{where}" if where else ""
    return JobTimeoutError(
        f"job {job.id} ran past timeout={timeout:g}s and was killed; ranks still "
        f"running: {running}.{stacks}\nTheir last log lines:\n{lines}",
        timeout=timeout, running_ranks=running, stacks=where)


def _init_timeout_error(job: Job, timeout: float, where: str) -> InitTimeoutError:
    # the ranks that never reached init_process_group, else those stuck inside it
    missing = ([r.rank for r in job.ranks if r.state in (RankState.PENDING, RankState.STARTING)]
               or [r.rank for r in job.ranks if r.state in NOT_JOINED])
    joined = [r.rank for r in job.ranks if r.rank not in missing]
    hosts, on_hosts, silent = _hosts_not_joined(job, missing)
    lines = _last_lines(job, missing)
    stacks = f"\nWhere each rank was:\n{where}" if where else ""
    return InitTimeoutError(
        f"ranks {missing}{on_hosts} did not join the process group within init_timeout="
        f"{timeout:g}s (joined: {joined}); everything was killed. Code that runs before "
        f"the function (imports of the arguments' modules) or a blocked network "
        f"rendezvous are the usual causes.{silent}{stacks}\nTheir last log lines:\n{lines}",
        timeout=timeout, missing_ranks=missing, stacks=where, hosts=hosts)


def _hosts_not_joined(job: Job, missing: list[int]) -> tuple[list[str], str, str]:
    """On several hosts: the hosts to blame for ``missing`` ranks, where they were
    (" on host2") and the hosts none of whose ranks started, with the last lines their
    torchrun and relay wrote. A rank that started said where it runs."""
    if not job.hosts or len(job.hosts) < 2:
        return [], "", ""
    heard = {r.host for r in job.ranks if r.host}
    stuck = {r.host for r in job.ranks if r.rank in missing and r.host}
    silent = [h for h in job.hosts if h not in heard]
    log = tail(JobDir(job.dir).launcher_log, 200).splitlines() if silent else []
    words = ""
    for host in silent:
        said = [line for line in log if line.startswith(f"[{host}] ")][-5:]
        words += (f"\nNo rank started on {host}; the last lines from there:\n  "
                  + ("\n  ".join(said) or "(none)"))
    blamed = [h for h in job.hosts if h in stuck or h in silent]
    on = " on " + ", ".join(h for h in job.hosts if h in stuck) if stuck else ""
    return blamed, on, words
