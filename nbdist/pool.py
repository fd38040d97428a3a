"""``nbdist.Pool``: ranks kept up between calls, the process group formed once.

::

    Pool(nprocs=2)        plan → pool folder (spec, entry, a FIFO per rank) → torchrun;
      │                   the ranks join the process group, then sleep on their FIFO
      ▼
    pool.run(fn, *args)   a task: a job folder of its own with the payload; its
      │                   protocol.Post, written into every rank's FIFO, wakes them
      ▼
    every rank: load, call, result / error record, log and events in the task folder,
      │         then "done" / "failed", ringing the bell (_worker._serve_pool)
      ▼
    Supervisor.follow(TaskOver): rank 0's value, or the root cause. After a failure, a
    health check (one all_reduce, ~2 s at most): the pool stays up with its ranks'
    state, or it is torn down and the user is told.

Pool lifetime and task lifetime are two things: the pool folder holds what lives as
long as the ranks (torchrun's log, start-up output, exit codes), each task's folder
what one call produced, so ``last_job()``, ``load_result()`` and the display work per
task as for a cold job. What tears a pool down: a rank that crashes (torchrun then
ends every rank), a collective still stuck after a peer failed, a timeout, an
interrupt the ranks do not answer within ``INTERRUPT_GRACE``, ``close()``, the
caller's exit or death. The next ``run`` starts a new pool.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import signal
import sys
import time
import warnings
from typing import Any, Callable, Sequence

from nbdist import api, rankstacks
from nbdist import display as displays
from nbdist import launch as launchers
from nbdist.errors import InvalidArgumentError, NbdistError
from nbdist.job import Job, diagnose, prune_now_and_then, read_results
from nbdist.jobdir import JobDir
from nbdist.launch import Launcher
from nbdist.plan import (check_callable, check_seconds, debug_env, plan_launch, rank_spec,
                         warn_if_caller_gpu)
from nbdist.session import SESSION
from nbdist.states import JobState, RankState
from nbdist.supervise import Limits, Supervisor, TaskOver, every_rank_reported, ranks_ready

FAILURE_GRACE = 2.0  # seconds the other ranks get to finish once one rank failed
INTERRUPT_GRACE = 2.0  # seconds the ranks get to answer SIGINT with KeyboardInterrupt
HEALTH_TIMEOUT = 2.0  # seconds for the health check after a failed task
CLOSE_GRACE = 2.0  # seconds the ranks get to leave politely on close()

LOST = ("[nbdist] the pool was torn down: its ranks and everything they held are "
        "gone; the next call starts a new pool")
KEPT = "[nbdist] the pool is still up: its ranks and their state are kept"


class Pool:
    """Ranks that stay up between calls: the second call runs in milliseconds.

    ``run`` has the :func:`nbdist.run_distributed` contract (rank 0's value,
    ``return_all``, ``timeout``, ``display``, the rank's own exception type)::

        with nbdist.Pool(nprocs=2) as pool:
            data = pool.run(load)           # start-up (3-4 s) is paid once
            pool.run(train, epochs=3)       # then each call costs milliseconds

    ``persist=True`` keeps each rank's ``%%distributed`` namespace between cells.
    ``hosts=``/``ssh_options=`` or ``slurm=`` put the ranks on several machines, as
    for :func:`nbdist.run_distributed` (``nprocs``/``gpus`` then count per host).
    The pool dies with this process, on :meth:`close`, and when one of its ranks
    crashes or one of its hosts is lost; the next :meth:`run` then starts a new one.
    ``clock`` is what its timeouts and grace periods count in: for tests, as
    :class:`~nbdist.supervise.Supervisor`'s.
    """

    def __init__(self, nprocs: int | None = None, *,
                 gpus: int | str | Sequence[int] | None = None, backend: str | None = None,
                 env: dict[str, str] | None = None, persist: bool = False,
                 init_timeout: float | None = api.DEFAULT_INIT_TIMEOUT, debug: bool = False,
                 hosts: str | Sequence[str] | None = None,
                 ssh_options: Sequence[str] | None = None,
                 slurm: dict[str, Any] | bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.plan = plan_launch(nprocs=nprocs, gpus=gpus, backend=backend, timeout=None,
                                init_timeout=init_timeout, hosts=hosts,
                                ssh_options=ssh_options, slurm=slurm)
        warn_if_caller_gpu(self.plan)
        self.persist = persist
        self.clock = clock  # a fake one in the fast tests: a 2 s grace then takes no time
        self.env = dict(debug_env(env, debug) or {})  # the user's dict may change later
        self.options = {"nprocs": nprocs, "gpus": gpus, "backend": backend, "debug": debug,
                        "hosts": hosts, "ssh_options": ssh_options, "slurm": slurm}
        self.tasks = 0  # tasks run on the current ranks
        self.kept_names: set[str] = set()  # persist: names the ranks' namespaces hold
        self.launch: Launcher | None = None
        self._dir: JobDir | None = None
        self._ranks: Job | None = None  # the pool's own record: its ranks' pids and states
        self._watch: Supervisor | None = None  # follows that record
        self._idle_since = time.monotonic()
        self.closed = False
        SESSION.add_pool(self)
        self._start()

    # --- what the user calls ---------------------------------------------------------
    @property
    def world_size(self) -> int:
        """Ranks in all (hosts x ranks per host)."""
        return self.plan.world_size

    @property
    def alive(self) -> bool:
        """Its ranks are up (on every host: one lost between calls counts as down)."""
        return (self.launch is not None and self.launch.poll() is None
                and not self.launch.lost_hosts())

    @property
    def nprocs(self) -> int:
        """Deprecated: :attr:`world_size` (the ranks in all), or ``plan.ranks_per_host``."""
        warnings.warn("Pool.nprocs is Pool.world_size now (ranks per host: "
                      "Pool.plan.ranks_per_host)", DeprecationWarning, stacklevel=2)
        return self.world_size

    def ready(self) -> "Pool":
        """Wait until every rank has joined the process group (the first :meth:`run`
        waits anyway, showing them start); returns the pool. What the launch says
        meanwhile (a Slurm queue, modules not sent to the hosts) is printed."""
        if not self.alive:
            self._restart_lost()
        self._wait_ready(_Notices())
        return self

    def run(self, fn: Callable, *args: Any, timeout: float | None = None,
            return_all: bool = False, display: str = "auto", all_ranks: bool = False,
            stall_warning: float | None = api.DEFAULT_STALL_WARNING, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on every rank of the pool; return rank 0's value."""
        check_callable(fn)
        if self.closed:
            raise InvalidArgumentError("this pool is closed; make a new nbdist.Pool")
        check_seconds("timeout", timeout)
        check_seconds("stall_warning", stall_warning)
        view = displays.create(display, all_ranks=all_ranks)
        if not self.alive:
            self._restart_lost()
        prune_now_and_then()
        task, job = self._new_task(return_all)
        api.write_payload(task, fn, args, kwargs, on_pickled=lambda: None)
        SESSION.remember(job)
        try:
            view.start(job)
            self._wait_ready(view)
            self.launch.post(task, return_all)
            return self._outcome(job, view, Limits(timeout=timeout,
                                                   stall_warning=stall_warning))
        except KeyboardInterrupt as exc:
            job.status = JobState.INTERRUPTED
            self._interrupted(job, exc)
            raise
        except BaseException as exc:
            job.fail(exc)
            raise
        finally:
            task.payload.unlink(missing_ok=True)
            job.mark_stopped()
            job.ended = time.time()
            job.save()
            view.stop(job)
            self._idle_since = time.monotonic()

    def status(self) -> dict[str, Any]:
        """What the pool holds: ranks (pid, state), device, tasks run, idle seconds."""
        if self._watch is not None and self.alive:  # their pids and states, once started
            self._watch.pump(events_only=True)  # notices and output: for the next run
        ranks = self._ranks.ranks if self._ranks is not None else []
        return {
            "alive": self.alive, "world_size": self.world_size,
            "ranks_per_host": self.plan.ranks_per_host, "backend": self.plan.backend,
            "device": self.plan.device, "visible_devices": self.plan.visible_devices,
            "hosts": (list(self.plan.hosts) if self.plan.hosts  # Slurm's: once allocated
                      else self.launch.hosts if self.launch is not None else None),
            "persist": self.persist, "tasks": self.tasks,
            "idle_seconds": round(time.monotonic() - self._idle_since, 1),
            "ranks": [{"rank": r.rank, "pid": r.pid, "host": r.host,
                       "state": RankState.IDLE if r.state == RankState.READY and self.alive
                       else r.state}
                      for r in ranks],
            "dir": str(self._dir.path) if self._dir is not None else None,
        }

    def close(self) -> None:
        """Stop the ranks (politely, then by signal) and remove the pool's folder.

        Idempotent; also called at interpreter exit.
        """
        self.closed = True
        SESSION.discard_pool(self)
        if self.launch is None:
            return
        if self.alive:
            with contextlib.suppress(OSError):
                self.launch.post(None, False, stop=True)
            deadline = time.monotonic() + CLOSE_GRACE
            while self.launch.poll() is None and time.monotonic() < deadline:
                self.launch.wait(0.05)
        self._stop()
        if self._dir is not None:
            shutil.rmtree(self._dir.path, ignore_errors=True)
        self._dir = None

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "up" if self.alive else "down"
        return (f"<nbdist.Pool {state} world_size={self.world_size} "
                f"backend={self.plan.backend} tasks={self.tasks}"
                f"{' persist' if self.persist else ''}>")

    # --- the pool's lifetime ---------------------------------------------------------
    def _start(self) -> None:
        pool = JobDir.create()
        try:
            spec = rank_spec(self.plan, self.env, pool=True)
            pool.write_spec(spec)
            self.launch = launchers.start(pool, spec, self.plan)
        except BaseException:
            self._stop()
            shutil.rmtree(pool.path, ignore_errors=True)
            raise
        self._dir = pool
        self._ranks = api.new_job(pool, self.plan, False)
        self._watch = Supervisor(self.launch, self._ranks, displays.create("none"),
                                 Limits(init_timeout=self.plan.init_timeout),
                                 clock=self.clock)
        self.tasks = 0
        self.kept_names = set()

    def _restart_lost(self) -> None:
        """The ranks are gone (a crash between calls): start new ones, and say so."""
        if self.launch is not None:
            warnings.warn("nbdist: the pool's ranks had exited; starting a new pool (rank "
                          "state is lost)", stacklevel=3)
            self._stop()
        self._start()

    def _stop(self) -> None:
        if self.launch is not None:
            self.launch.kill()
        if self._watch is not None:
            self._watch.close()
        self.launch = self._watch = None

    def _teardown(self, exc: BaseException) -> None:
        """Kill a pool whose ranks can no longer be trusted; keep its folder for its logs."""
        self._stop()
        exc.add_note(LOST)
        if self._ranks is not None and self._dir is not None:
            self._ranks.status = JobState.FAILED
            self._ranks.error = f"torn down: {type(exc).__name__}"
            self._ranks.mark_stopped()
            self._ranks.ended = time.time()
            self._ranks.save()
        self._dir = None

    def _wait_ready(self, view: displays.Display) -> None:
        """The first task waits for the ranks to join (the display shows them do it)."""
        record, watch = self._ranks, self._watch
        if ranks_ready(record, 0):
            return
        watch.view = view
        try:
            with SESSION.following(self.launch):
                code = watch.follow(ranks_ready)
        except NbdistError as exc:  # init timeout: everything is killed already
            self._teardown(exc)
            raise
        finally:
            watch.view = displays.create("none")
        if code is not None:
            exc = diagnose(record, code, lost=self.launch.lost_hosts())
            self._teardown(exc)
            raise exc

    # --- one task --------------------------------------------------------------------
    def _new_task(self, return_all: bool) -> tuple[JobDir, Job]:
        task = JobDir.create()
        return task, api.new_job(task, self.plan, return_all, pool=self._dir.id)

    def _outcome(self, job: Job, view: displays.Display, limits: Limits) -> Any:
        with Supervisor(self.launch, job, view, limits, clock=self.clock) as watch:
            try:
                with SESSION.following(self.launch):
                    code = watch.follow(TaskOver(FAILURE_GRACE))
            except NbdistError as exc:  # a timeout: everything is killed already
                self._teardown(exc)
                raise
            if code is not None:  # a rank crashed: torchrun ended every rank
                raise self._lost(job)
            if not every_rank_reported(job, 0):  # one failed, the others still run
                self.launch.signal(signal.SIGINT)
                self._wait_reported(watch, INTERRUPT_GRACE)
        self.tasks += 1
        if _all_done(job):
            return job.take_result()
        job.status = JobState.FAILED
        exc = diagnose(job, None)
        if self.launch.poll() is not None:
            raise self._lost(job)
        if every_rank_reported(job, 0) and self._healthy():
            exc.add_note(KEPT)
        else:
            self._teardown(exc)
        raise exc

    def _lost(self, job: Job) -> BaseException:
        """The error for a task whose ranks died with the pool (a crash, a kill)."""
        job.status = JobState.FAILED
        with contextlib.suppress(FileNotFoundError):  # the exit codes torchrun saw
            shutil.copy(self._dir.failures, JobDir(job.dir).failures)
        exc = diagnose(job, self.launch.poll(), lost=self.launch.lost_hosts())
        self._teardown(exc)
        return exc

    def _interrupted(self, job: Job, exc: KeyboardInterrupt) -> None:
        """Stop pressed: the ranks get a KeyboardInterrupt; those that do not answer
        within ``INTERRUPT_GRACE`` (stuck in C++, a collective) cost the pool."""
        if not self.alive:
            return
        if not ranks_ready(self._ranks, 0):  # still starting
            self._teardown(exc)
            return
        try:
            self.launch.signal(signal.SIGINT)
            with Supervisor(self.launch, job, displays.create("none"),
                            clock=self.clock) as watch:
                answered = self._wait_reported(watch, INTERRUPT_GRACE)
            if answered and self._healthy():
                exc.add_note("[nbdist] every rank stopped its task; " + KEPT[9:])
                return
            dumps = rankstacks.collect(self.launch)
            if dumps:
                exc.add_note("[nbdist] where the ranks were when they did not answer:\n"
                             + rankstacks.report(dumps))
        except BaseException:  # stop pressed again: no more waiting
            pass
        self._teardown(exc)

    def _wait_reported(self, watch: Supervisor, seconds: float) -> bool:
        """Follow until every rank reported or ``seconds`` passed: True if they did."""
        deadline = watch.clock() + seconds
        watch.follow(lambda job, now: every_rank_reported(job, now) or now > deadline)
        return every_rank_reported(watch.job, 0) and self.launch.poll() is None

    def _healthy(self) -> bool:
        """After a failed task: do the ranks still form a working process group?"""
        from nbdist._worker import check_health

        task, job = self._new_task(False)
        try:
            api.write_payload(task, check_health, (), {}, on_pickled=lambda: None)
            self.launch.post(task, False)
            with Supervisor(self.launch, job, displays.create("none"),
                            Limits(timeout=HEALTH_TIMEOUT), clock=self.clock) as watch:
                if watch.follow(every_rank_reported) is not None or not _all_done(job):
                    return False
            return read_results(task, [0])[0] == self.world_size
        except NbdistError:  # the health check timed out: everything is killed
            return False
        finally:
            shutil.rmtree(task.path, ignore_errors=True)


def _all_done(job: Job) -> bool:
    """Every rank of the task finished without an exception."""
    return all(r.state == RankState.DONE for r in job.ranks)


class _Notices(displays.Display):
    """Shows what a launch says about itself while nothing else is shown."""

    def notice(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def check_options(pool: Pool, *, nprocs: int | None, gpus: Any, backend: str | None,
                  hosts: Any = None, slurm: Any = None) -> None:
    """Raise if a call asks for another shape than the pool has (what it leaves out,
    the pool decides)."""
    have = pool.plan
    asked = []
    if nprocs is not None and nprocs != have.ranks_per_host:
        asked.append(f"{nprocs} ranks")
    if hosts is not None and plan_launch(
            nprocs=1, gpus=None, backend=None, timeout=None, init_timeout=None,
            hosts=hosts).hosts != have.hosts:
        asked.append(f"hosts {hosts}")
    if slurm and have.slurm is None:
        asked.append("Slurm")
    elif slurm and slurm.get("nodes") not in (None, have.nhosts):
        asked.append(f"{slurm['nodes']} Slurm nodes")
    if backend is not None and backend != have.backend:
        asked.append(f"backend {backend}")
    if gpus is not None:
        wanted = plan_launch(nprocs=None, gpus=gpus, backend=None, timeout=None,
                             init_timeout=None)
        if ((wanted.visible_devices, wanted.ranks_per_host)
                != (have.visible_devices, have.ranks_per_host)):
            asked.append(f"GPUs {wanted.visible_devices}")
    if asked:
        where = f"GPUs {have.visible_devices}" if have.visible_devices else have.device
        if have.nhosts > 1:
            where += f" on each of {', '.join(have.hosts or ['its Slurm nodes'])}"
        raise InvalidArgumentError(
            f"the pool has {have.ranks_per_host} ranks on {where} ({have.backend}); this "
            f"asks for {', '.join(asked)}")


@atexit.register
def _close_all() -> None:
    for pool in SESSION.pools():
        with contextlib.suppress(Exception):
            pool.close()
