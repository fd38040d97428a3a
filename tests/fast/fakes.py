"""A launch whose ranks are scripts, on a clock that moves only when asked.

:class:`FakeLaunch` has the Launcher interface (``nbdist/launch/__init__.py``) over a
real job folder. Its ranks write what real ranks write — events through
``ChannelWriter``, their logs, ``ErrorRecord`` files, results through
``payload.dump_outputs``, ``failures.json`` as torchrun's agent does, faulthandler
dumps on SIGUSR1 — so the supervisor, a pool and ``diagnose`` read them as they read a
real job. Nothing sleeps: ``wait(t)`` moves the :class:`FakeClock` on by ``t`` and plays
every rank's script up to then, in time order across ranks.

A rank's script is a list of steps played in order; only :class:`Sleep` takes time::

    FakeLaunch(job, spec, clock, tasks=[
        {0: [Say("epoch 1\\n"), Sleep(2), Done(42)],    # the first task (a cold job's only)
         1: [Sleep(1), Fail(ValueError("bad"))]},
        {1: [Hang("collective")]},                      # the next post; rank 0: Done(None)
    ])

Before its first task a rank starts (``STARTING`` with its pid, ``JOINING``, ``READY``)
unless ``startup`` scripts it otherwise. A pool's rank takes each post in turn, the
newest one once it is free, as it reads its FIFO; the health check
(``_worker.check_health``, recognised by unpickling the task's payload) is answered
with the world size unless ``health`` scripts it otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sysconfig
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import nbdist
from nbdist import payload
from nbdist._worker import check_health  # imports no torch: check_health does, when run
from nbdist.channel import ChannelWriter
from nbdist.display import Display
from nbdist.job import Job, RankStatus
from nbdist.jobdir import JobDir, write_bytes_atomic
from nbdist.protocol import ErrorRecord, EventBody, RankExit, Spec, Status, encode_exits
from nbdist.states import RankState

HOST = "fakehost"


class FakeClock:
    """A monotonic clock that only :meth:`advance` moves."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- the steps of a script ---------------------------------------------------------------
@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Say:
    """Print ``text`` (into the rank's log for its task, as a real rank's fd 1 does)."""

    text: str


@dataclass(frozen=True)
class Emit:
    """Any event (progress, metrics, a status)."""

    body: EventBody


@dataclass(frozen=True)
class Started:
    """The process is up: STARTING with its pid and host."""


@dataclass(frozen=True)
class Joined:
    """``init_process_group`` returned: JOINING, then READY."""


@dataclass(frozen=True)
class Done:
    """The function returned ``value``: a result (rank 0's, or every rank's with
    return_all), then DONE."""

    value: Any = None


@dataclass(frozen=True)
class Fail:
    """The function raised ``exc``: an error record, then FAILED (a cold job's rank then
    exits 1, and torchrun tears the job down)."""

    exc: BaseException


@dataclass(frozen=True)
class Crash:
    """The process dies without a word (``-9``: SIGKILL); torchrun tears the job down."""

    exitcode: int


@dataclass(frozen=True)
class Hang:
    """Stuck for good, at ``where`` ("collective", "user", "joining"), as its stack
    shows. ``answers``: whether SIGINT reaches it as a KeyboardInterrupt; by default
    only in the user's own Python code (C++ in a collective does not return to it)."""

    where: str = "collective"
    answers: bool | None = None

    @property
    def interruptible(self) -> bool:
        return self.where == "user" if self.answers is None else self.answers


@dataclass(frozen=True)
class _Task:
    """A task begins in ``folder`` (internal: the launch inserts it)."""

    folder: JobDir
    return_all: bool


@dataclass(frozen=True)
class _Leave:
    """A pool's stop: the rank leaves its loop and exits 0 (internal)."""


# --- the fake launch -------------------------------------------------------------------
class _Rank:
    def __init__(self, rank: int, at: float, steps: list):
        self.rank = rank
        self.pid = 40000 + rank
        self.at = at  # the clock time its script has reached
        self.steps: deque = deque(steps)
        self.alive = True
        self.ready = False  # joined the process group
        self.task: _Task | None = None  # the task it runs now
        self.hang: Hang | None = None
        self.post: tuple[float, list] | None = None  # the newest post not taken yet

    def take_post(self) -> None:
        """Once free, start on the newest post (as a rank reads its FIFO)."""
        if not self.steps and self.post is not None and self.ready and self.task is None:
            posted_at, steps = self.post
            self.post = None
            self.at = max(self.at, posted_at)
            self.steps.extend(steps)

    def runnable(self, now: float) -> bool:
        return self.alive and self.hang is None and bool(self.steps) and self.at <= now

    @property
    def where(self) -> str:
        if self.hang is not None:
            return self.hang.where
        if self.task is not None:
            return "user"
        return "idle" if self.ready else "joining"


class FakeLaunch:
    """The Launcher interface, its ranks played from scripts (see the module's doc).

    What the owner did to it is kept for the tests: ``kills`` (how many), ``signals``
    and ``posts`` (``(clock time, what)``)."""

    hosts = None  # this machine

    def __init__(self, job: JobDir, spec: Spec, clock: FakeClock, *,
                 tasks: list[dict[int, list]] = (), startup: dict[int, list] | None = None,
                 health: dict[int, list] | None = None, interrupt_at: float | None = None):
        self.job = job
        self.spec = spec
        self.clock = clock
        self.pool = spec.pool
        self.world_size = spec.world_size
        self.tasks = deque(tasks)
        self.health = health or {}
        self.interrupt_at = interrupt_at  # wait() raises KeyboardInterrupt there, once
        self.started_at = clock()
        self.exitcode: int | None = None
        self.notices: list[str] = []
        self.kills = 0
        self.signals: list[tuple[float, signal.Signals]] = []
        self.posts: list[tuple[float, str]] = []
        startup = startup or {}
        self.ranks = [_Rank(r, clock(), startup.get(r, [Started(), Joined()]))
                      for r in range(self.world_size)]
        if not self.pool:  # a cold job: its one task, in the job's own folder
            script = self.tasks.popleft() if self.tasks else {}
            for rank in self.ranks:
                rank.steps.extend([_Task(job, spec.return_all),
                                   *script.get(rank.rank, [Done()])])

    # --- the Launcher interface ------------------------------------------------------
    def poll(self) -> int | None:
        return self.exitcode

    def wait(self, timeout: float) -> None:
        if self.interrupt_at is not None and self.clock() + timeout >= self.interrupt_at:
            self.clock.advance(max(0.0, self.interrupt_at - self.clock()))
            self.interrupt_at = None
            self._play()
            raise KeyboardInterrupt
        self.clock.advance(timeout)
        self._play()

    def kill(self) -> None:
        self.kills += 1
        if self.exitcode is None:
            self._end(-signal.SIGTERM, {})  # torchrun's agent, terminated

    def signal(self, sig: signal.Signals) -> list[int]:
        self.signals.append((self.clock(), sig))
        live = self.live_ranks()
        for rank in (self.ranks[r] for r in live):
            if sig == signal.SIGUSR1:
                with open(self.job.stacks(rank.rank), "a") as f:
                    f.write(faulthandler_dump(rank.where, self.job))
            elif sig == signal.SIGINT and rank.task is not None and (
                    rank.hang is None or rank.hang.interruptible):
                # a pool's idle rank ignores SIGINT; in the user's code it raises there
                rank.hang = None
                rank.steps = deque([Fail(KeyboardInterrupt())])
                rank.at = max(rank.at, self.clock())
        return live

    def post(self, task: JobDir | None, return_all: bool, *, stop: bool = False) -> None:
        if stop:
            what, script = "stop", {}
        elif _is_health_check(task):
            what, script = "health", {r: [Done(self.world_size)] for r in range(self.world_size)}
            script.update(self.health)
        else:
            what, script = "task", self.tasks.popleft() if self.tasks else {}
        self.posts.append((self.clock(), what))
        for rank in self.ranks:
            steps = [_Leave()] if stop else [_Task(task, return_all),
                                             *script.get(rank.rank, [Done()])]
            rank.post = (self.clock(), steps)  # a newer post replaces one not read yet

    def live_ranks(self) -> list[int]:
        return [r.rank for r in self.ranks if r.alive] if self.exitcode is None else []

    def take_notices(self) -> list[str]:
        notices, self.notices = self.notices, []
        return notices

    def lost_hosts(self) -> dict[str | None, str]:
        return {}

    # --- the ranks -------------------------------------------------------------------
    def _play(self) -> None:
        now = self.clock()
        while self.exitcode is None:
            for rank in self.ranks:
                rank.take_post()
            runnable = [r for r in self.ranks if r.runnable(now)]
            if not runnable:
                return
            rank = min(runnable, key=lambda r: (r.at, r.rank))  # the earliest step first
            self._step(rank, rank.steps.popleft())

    def _step(self, rank: _Rank, step: Any) -> None:
        folder = rank.task.folder if rank.task is not None else self.job
        if isinstance(step, Sleep):
            rank.at += step.seconds
        elif isinstance(step, Say):
            with open(folder.log(rank.rank), "a") as f:
                f.write(step.text)
        elif isinstance(step, Emit):
            self._emit(rank, folder, step.body)
        elif isinstance(step, Started):
            self._emit(rank, folder, Status(RankState.STARTING, pid=rank.pid, host=HOST))
        elif isinstance(step, Joined):
            self._emit(rank, folder, Status(RankState.JOINING))
            self._emit(rank, folder, Status(RankState.READY))
            rank.ready = True
        elif isinstance(step, _Task):
            rank.task = step
            # a pool's rank says where it runs the task in the task's own events
            self._emit(rank, step.folder, Status(RankState.RUNNING, pid=rank.pid, host=HOST)
                       if self.pool else Status(RankState.RUNNING))
        elif isinstance(step, Done):
            if rank.rank == 0 or rank.task.return_all:
                payload.dump_outputs(payload.Outputs({payload.RETURN_VALUE: step.value}),
                                     folder.result(rank.rank),
                                     functools.partial(folder.result_part, rank.rank),
                                     strict=True)
            self._emit(rank, folder, Status(RankState.DONE))
            self._task_over(rank, 0)
        elif isinstance(step, Fail):
            self._record_error(rank, folder, step.exc)
            name = type(step.exc).__name__
            self._emit(rank, folder, Status(RankState.FAILED, error=name) if self.pool
                       else Status(RankState.FAILED, exitcode=1, error=name))
            self._task_over(rank, 1)
        elif isinstance(step, Crash):
            self._end(1, {rank.rank: step.exitcode})
        elif isinstance(step, Hang):
            rank.hang = step
        elif isinstance(step, _Leave):
            self._emit(rank, self.job, Status(RankState.DONE))
            self._exit(rank, 0)
        else:
            raise TypeError(f"not a step: {step!r}")

    def _emit(self, rank: _Rank, folder: JobDir, body: EventBody) -> None:
        writer = ChannelWriter(folder.events(rank.rank))  # no bell: wait() sleeps not
        with contextlib.closing(writer):
            writer.emit(body)

    def _record_error(self, rank: _Rank, folder: JobDir, exc: BaseException) -> None:
        name = type(exc).__name__
        tb = ('Traceback (most recent call last):\n  File "<nbdist-cell In[3]>", line 7, '
              f"in <module>\n{name}: {exc}\n")
        if rank.rank != 0:  # as _worker does: rank 0's output is shown anyway
            with open(folder.log(rank.rank), "a") as f:
                f.write(tb)
        record = ErrorRecord(rank=rank.rank, host=HOST, pid=rank.pid, time=time.time(),
                             type=f"{type(exc).__module__}.{type(exc).__qualname__}",
                             message=str(exc), traceback=tb, exception=payload.dumps(exc),
                             collective=False)
        write_bytes_atomic(folder.error(rank.rank), record.encode())

    def _task_over(self, rank: _Rank, code: int) -> None:
        rank.task = None
        if not self.pool:  # a cold job's rank leaves after its one task
            self._exit(rank, code)

    def _exit(self, rank: _Rank, code: int) -> None:
        rank.alive = False
        if code != 0:  # torchrun's agent stops every other rank, records, exits 1
            self._end(1, {rank.rank: code})
        elif not any(r.alive for r in self.ranks):
            self.exitcode = 0

    def _end(self, code: int, failed: dict[int, int]) -> None:
        """The agent is gone: ``failed`` ranks exited so, the live rest by its SIGTERM
        (or, killed itself, it records nothing)."""
        if failed:
            torn_down = {r.rank: -signal.SIGTERM for r in self.ranks if r.alive}
            exits = {**torn_down, **failed}
            write_bytes_atomic(self.job.failures, encode_exits({
                r: RankExit(exitcode=c, pid=self.ranks[r].pid,
                            local_rank=r % self.spec.ranks_per_host,
                            timestamp=int(time.time()))
                for r, c in sorted(exits.items())}))
        for rank in self.ranks:
            rank.alive = False
        self.exitcode = code


def _is_health_check(task: JobDir) -> bool:
    # the payload is a plain pickle (no tensors); unpickling imports nbdist._worker,
    # which imports torch only when its functions run
    try:
        fn = payload.load(task.payload)[0]
    except FileNotFoundError:  # a test that posts a folder without a payload
        return False
    return fn is check_health


# --- what rankstacks reads -------------------------------------------------------------
_LIB = sysconfig.get_paths()["purelib"]
_STDLIB = sysconfig.get_paths()["stdlib"]
_WORKER = os.path.join(os.path.dirname(nbdist.__file__), "_worker.py")
_TORCH_C10D = f"{_LIB}/torch/distributed/distributed_c10d.py"
CELL = "<nbdist-cell In[3]>"
_INNER = {  # where a rank is -> its innermost frames (file, line, function)
    "collective": [(_TORCH_C10D, 2950, "all_reduce"),
                   (f"{_LIB}/torch/distributed/c10d_logger.py", 81, "wrapper"),
                   (CELL, 12, "<module>"), (_WORKER, 135, "run"),
                   (_WORKER, 190, "_run_and_record"), (_WORKER, 140, "_run_task"),
                   (_WORKER, 118, "_serve_pool")],
    "user": [(CELL, 7, "<module>"), (_WORKER, 135, "run"), (_WORKER, 190, "_run_and_record"),
             (_WORKER, 140, "_run_task"), (_WORKER, 118, "_serve_pool")],
    "joining": [(f"{_LIB}/torch/distributed/rendezvous.py", 189, "_create_c10d_store"),
                (_TORCH_C10D, 1580, "init_process_group"), (_WORKER, 250, "_join")],
    "idle": [(_WORKER, 118, "_serve_pool")],
}


def faulthandler_dump(where: str, job: JobDir) -> str:
    """What ``faulthandler.dump_traceback(all_threads=True)`` writes for a rank at
    ``where``: the watchdog thread, then the main thread, innermost frame first."""
    watchdog = [(f"{_STDLIB}/threading.py", 331, "wait"), (_WORKER, 392, "watch"),
                (f"{_STDLIB}/threading.py", 1012, "run"),
                (f"{_STDLIB}/threading.py", 1075, "_bootstrap_inner"),
                (f"{_STDLIB}/threading.py", 1032, "_bootstrap")]
    main = [*_INNER[where], (_WORKER, 57, "main"), (str(job.entry), 22, "<module>")]

    def block(title: str, frames: list) -> str:
        return (f"{title} (most recent call first):\n"
                + "".join(f'  File "{file}", line {line} in {fn}\n' for file, line, fn in frames)
                + "\n")

    return (block("Thread 0x00007f3a5b7fe640", watchdog)
            + block("Current thread 0x00007f3a6c1b2740", main))


# --- helpers for the tests -------------------------------------------------------------
def make_spec(world_size: int = 2, *, pool: bool = False, return_all: bool = False) -> Spec:
    return Spec(ranks_per_host=world_size, world_size=world_size, backend="gloo",
                device="cpu", cwd=os.getcwd(), sys_path=(), return_all=return_all,
                pool=pool)


def make_job(world_size: int = 2) -> tuple[JobDir, Job]:
    """A new job folder (named as nbdist names them: rankstacks tells its entry.py from
    the user's by that) and the record a caller keeps for it."""
    folder = JobDir.create()
    return folder, Job(id=folder.id, dir=str(folder.path), world_size=world_size, backend="gloo",
               ranks=[RankStatus(r, log=str(folder.log(r))) for r in range(world_size)])


class RecordingDisplay(Display):
    """A display that keeps every call, in order, as ``(method, *arguments)``."""

    def __init__(self, *, all_ranks: bool = False):
        super().__init__(all_ranks=all_ranks)
        self.calls: list[tuple] = []

    def start(self, job):
        self.calls.append(("start", job))

    def output(self, rank, text):
        self.calls.append(("output", rank, text))

    def event(self, event):
        self.calls.append(("event", event))

    def notice(self, text):
        self.calls.append(("notice", text))

    def stop(self, job):
        self.calls.append(("stop", job))

    def of(self, method: str) -> list[tuple]:
        """The arguments of every call of ``method``."""
        return [call[1:] for call in self.calls if call[0] == method]

    def text(self, rank: int = 0) -> str:
        return "".join(text for r, text in self.of("output") if r == rank)
