"""``run_distributed``: validate → pack → launch → supervise → unpack.

::

    run_distributed(fn, *args, nprocs=2)
      │ plan_launch: check arguments, pick ranks / devices / backend / hosts (plan.py)
      │ _pack_and_launch: cloudpickle fn, args, kwargs into a fresh private job
      │   directory; torchrun starts once all is pickled, while tensor bytes are written
      ▼
    a launch (launch/): torchrun here, or an agent per host over ssh / Slurm →
      │ every rank runs _worker.main (payload loaded)
      │ supervise: poll torchrun, stream rank logs and events to the display,
      │             enforce timeout / init_timeout (with every rank's stack), warn
      │             on a stall; an interrupt kills everything (run_distributed's finally)
      ▼
    rank 0's result loaded from the job directory, or the root-cause exception raised
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from nbdist import display as displays
from nbdist import launch as launchers
from nbdist import payload, rankstacks
from nbdist.channel import ChannelReader, LogFollower
from nbdist.errors import InitTimeoutError, JobTimeoutError
from nbdist.job import Job, RankStatus, diagnose, prune_jobs
from nbdist.jobdir import JobDir, tail, write_json_atomic
from nbdist.launch import Launcher
from nbdist.launch.local import entry_script
from nbdist.plan import Plan, check_callable, check_seconds, debug_env, plan_launch
from nbdist.states import NOT_JOINED, REPORTED, EventKind, JobState, RankState

DEFAULT_INIT_TIMEOUT = 300.0
# seconds without progress (no event but heartbeats, no output) after which a job
# whose rank waits in a collective is reported as stalled, once
DEFAULT_STALL_WARNING = 120.0
POLL = 0.05  # seconds between looks at the job while it runs
FIRST_POLL = 0.001  # the first looks, doubling up to POLL


_last_job: Job | None = None
_running: Launcher | None = None  # the launch supervise() follows now, for stacks()


def run_distributed(fn: Callable, *args: Any, nprocs: int | None = None,
                    gpus: int | str | Sequence[int] | None = None,
                    backend: str | None = None, timeout: float | None = None,
                    init_timeout: float | None = DEFAULT_INIT_TIMEOUT,
                    env: dict[str, str] | None = None, return_all: bool = False,
                    display: str = "auto", all_ranks: bool = False,
                    stall_warning: float | None = DEFAULT_STALL_WARNING,
                    debug: bool = False, hosts: str | Sequence[str] | None = None,
                    ssh_options: Sequence[str] | None = None,
                    slurm: dict[str, Any] | bool | None = None, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` on every rank of a torchrun job; return rank 0's value.

    The default process group is initialised before ``fn`` runs and destroyed after;
    the ranks start in this working directory with this ``sys.path``. Example::

        def train(epochs, lr=0.1):
            model = DDP(Net())
            ...
            return model.module.state_dict()

        state = nbdist.run_distributed(train, 3, lr=0.05, nprocs=2)

    Args:
        fn: the function every rank runs (it may be defined in a notebook cell).
        *args, **kwargs: its arguments, pickled once and memory-mapped by every rank.
        nprocs: number of processes (default: one per visible GPU, else 2).
        gpus: GPUs to use, one process each: a count (``2``) or device ids
            (``"0,1"``, ``[0, 1]``); sets ``CUDA_VISIBLE_DEVICES`` for the ranks.
        backend: process group backend (default ``"nccl"`` with GPUs, else ``"gloo"``).
        timeout: seconds; past it every rank is killed and :class:`JobTimeoutError`
            raised, naming the ranks still running and their last log lines.
        init_timeout: seconds for every rank to join the process group
            (:class:`InitTimeoutError` names those that did not).
        env: extra environment variables for the ranks.
        return_all: return a list of every rank's value, indexed by rank.
        display: ``"auto"`` (widgets in a notebook, rich in a terminal, else plain),
            ``"notebook"``, ``"terminal"``, ``"plain"`` or ``"none"``.
        all_ranks: stream every rank's output, prefixed ``[rank N]`` (default: rank 0's).
        stall_warning: seconds without progress (no ``track``/``report`` event, no
            output) after which, if a rank waits in a collective, the display warns
            once with every rank's stack; the job goes on. ``None``: never.
        debug: torch's collective checks (``TORCH_DISTRIBUTED_DEBUG=DETAIL``): ranks
            that call different collectives fail at once, and the error says which.
        hosts: run on these machines, reached with the system ``ssh`` client
            (``["gpu1", "gpu2"]``); ``nprocs``/``gpus`` then count per host, and the
            world is hosts x nprocs. Every host needs the same Python and packages.
        ssh_options: extra ``ssh`` arguments (``["-F", "ssh_config"]``); default
            from ``$NBDIST_SSH_OPTIONS``.
        slurm: run as a Slurm job step with ``srun``: ``{"nodes": 2, "partition":
            "gpu", "time": "1:00:00", "account": "A", "args": [...]}``; inside an
            allocation its nodes are used, outside one nbdist asks for it.

    Returns:
        rank 0's return value (``return_all``: all of them), tensors on the CPU and
        ``DistributedDataParallel`` unwrapped to its module, also inside objects.

    Raises:
        the rank's own exception type, with its traceback as ``__cause__`` and a note
        naming the rank (:class:`RemoteError` if it cannot be rebuilt here);
        :class:`WorkerCrashedError` for a rank killed by a signal or ``os._exit``;
        :class:`JobTimeoutError`, :class:`InitTimeoutError`, :class:`LaunchError`;
        :class:`InvalidArgumentError` and :class:`PicklingError` before anything
        starts; ``KeyboardInterrupt`` after stopping every process of the job.
    """
    check_callable(fn)
    plan = plan_launch(nprocs=nprocs, gpus=gpus, backend=backend, timeout=timeout,
                       init_timeout=init_timeout, hosts=hosts, ssh_options=ssh_options,
                       slurm=slurm)
    check_seconds("stall_warning", stall_warning)
    env = debug_env(env, debug)
    view = displays.create(display, all_ranks=all_ranks)
    prune_jobs()
    job_dir = JobDir.create()
    job = new_job(job_dir, plan, return_all)
    launch = _pack_and_launch(job_dir, fn, args, kwargs, plan, return_all, env)
    try:
        remember(job)
        view.start(job)
        supervise(launch, job, view, timeout=plan.timeout, init_timeout=plan.init_timeout,
                  stall_warning=stall_warning)
        if launch.poll() != 0:
            job.status = JobState.FAILED
            raise diagnose(job, launch.poll(), lost=launch.lost_hosts())
        return job.take_result()
    except KeyboardInterrupt:
        job.status = JobState.INTERRUPTED
        raise
    except BaseException as exc:
        job.fail(exc)
        raise
    finally:
        launch.kill()
        job.mark_stopped()
        # every rank is gone: the input is spent (a 1 GiB dataset passed in would
        # otherwise stay on disk for the next $NBDIST_KEEP_JOBS jobs)
        job_dir.payload.unlink(missing_ok=True)
        job.ended = time.time()
        job.save()
        view.stop(job)


def running_launch() -> Launcher | None:
    """The launch of the job (or pool task) running in this process now, if any."""
    return _running


def last_job() -> Job | None:
    """The record of the latest job started in this process (also while it runs)."""
    return _last_job


def remember(job: Job) -> None:
    global _last_job
    _last_job = job


def new_job(job_dir: JobDir, plan: Plan, return_all: bool, pool: str | None = None) -> Job:
    """The record of a job (or a pool's task) about to run in ``job_dir``."""
    return Job(id=job_dir.id, dir=str(job_dir.path), nprocs=plan.world_size,
               backend=plan.backend, return_all=return_all, pool=pool,
               hosts=list(plan.hosts) if plan.hosts else None,
               ranks=[RankStatus(r, log=str(job_dir.log(r)))
                      for r in range(plan.world_size)])


def _pack_and_launch(job_dir: JobDir, fn: Callable, args: tuple, kwargs: dict,
                     plan: Plan, return_all: bool, env: dict[str, str] | None) -> Launcher:
    """Write what the ranks need into the job directory and start torchrun.

    torchrun starts as soon as everything is pickled (an unpicklable value has been
    reported by then, with nothing started) while the tensors' bytes are still being
    written: its agent and ranks spend seconds importing torch before they read the
    payload, and wait for its file to appear.
    """
    started: list[Launcher] = []
    failed: list[Exception] = []

    def start() -> None:  # runs inside torch.save: an error here is not a pickling one
        try:
            write_spec(job_dir, plan, return_all)
            started.append(launchers.start(job_dir, plan, env))
        except Exception as exc:
            failed.append(exc)

    try:
        write_payload(job_dir, fn, args, kwargs, on_pickled=start)
        if failed:
            raise failed[0]
    except BaseException:
        for launch in started:  # the write failed or was interrupted after the start
            launch.kill()
        raise
    return started[0]


def write_payload(job_dir: JobDir, fn: Callable, args: tuple, kwargs: dict, *,
                   on_pickled: Callable[[], None]) -> None:
    """Pickle the function and its arguments into the job directory."""
    try:
        size = payload.dump((fn, args, kwargs), job_dir.payload, on_pickled=on_pickled)
    except Exception as exc:
        named = [("the function", fn)]
        for label, value in [*((f"argument {i}", a) for i, a in enumerate(args)),
                             *((f"keyword argument {k!r}", v) for k, v in kwargs.items())]:
            # name the part of a container that fails: "key 'lock' of argument 1"
            named += ([(f"{part} of {label}", v) for part, v in payload.parts(value)]
                      or [(label, value)])
        raise payload.unpicklable_error(
            "job", named, exc,
            hint="Create such objects (locks, open files, connections, generators) "
                 "inside the function instead of passing them in.") from None
    payload.warn_if_large(size, "payload (function and arguments)")


def write_spec(job_dir: JobDir, plan: Plan, return_all: bool, **more: Any) -> None:
    """Everything else the ranks read: the job's shape and the entry script."""
    write_json_atomic(job_dir.spec, {
        "nprocs": plan.nprocs, "world_size": plan.world_size, "backend": plan.backend,
        "device": plan.device, "return_all": return_all,
        # the ranks watch the caller's pid only where it is the caller's (one machine);
        # elsewhere each watches its link to the caller (launch/hosts.py)
        "caller_pid": None if plan.remote else os.getpid(), **more,
    })
    cwd = os.getcwd()
    sys_path = [os.path.abspath(p) if p else cwd for p in sys.path]
    job_dir.entry.write_text(entry_script(job_dir, cwd=cwd, sys_path=sys_path))


def supervise(launch: Launcher, job: Job, view: displays.Display, *,
               timeout: float | None, init_timeout: float | None,
               until: Callable[[], bool] | None = None,
               stall_warning: float | None = None) -> None:
    """Follow ``job`` until torchrun exits or ``until()`` holds; raise on timeouts
    (after killing everything, with every rank's stack in the error); warn once when
    the job stalls in a collective (``stall_warning``).

    ``job`` may be a pool's task: its folder has the task's events and logs.
    """
    global _running
    job_dir = JobDir(job.dir)
    events = ChannelReader({r: job_dir.events(r) for r in range(job.nprocs)})
    shown = range(job.nprocs) if view.all_ranks else [0]
    logs = {r: LogFollower(job_dir.log(r)) for r in shown}
    started = time.monotonic()
    interval = FIRST_POLL
    stall = _StallWatch(launch, view, stall_warning)

    def pump(final: bool = False) -> None:
        if job.hosts is None and launch.hosts:  # Slurm's nodes, once allocated
            job.hosts = launch.hosts
        for notice in launch.take_notices():
            view.notice(notice)
        for event in events.poll():
            _apply(event, job, launch)
            view.event(event)
            if event.kind != EventKind.HEARTBEAT:
                stall.progress()
        for rank, follower in logs.items():
            text = follower.read(final)
            if text:
                view.output(rank, text)
                stall.progress()

    def stop(error: Callable[..., BaseException], limit: float) -> BaseException:
        where = _stacks(launch)  # before the kill: where each rank is stuck
        launch.kill()
        pump(final=True)
        job.status = JobState.TIMEOUT
        return error(job, limit, where)

    _running = launch
    try:
        while True:
            exited = launch.poll() is not None
            pump(final=exited)
            if exited:
                return
            if until is not None and until():
                pump(final=True)  # an outcome is written after the rank's last output
                return
            view.tick()  # redraw the clock between events (the display throttles itself)
            stall.check()
            # both count from the ranks' start, not from a wait in Slurm's queue
            elapsed = (0.0 if launch.started_at is None
                       else time.monotonic() - max(started, launch.started_at))
            if timeout is not None and elapsed > timeout:
                raise stop(_timeout_error, timeout)
            if (init_timeout is not None and elapsed > init_timeout
                    and any(r.state in NOT_JOINED for r in job.ranks)):
                raise stop(_init_timeout_error, init_timeout)
            # short naps at first: a pool's task is often over in milliseconds
            launch.wait(interval)
            interval = min(POLL, interval * 2)
    finally:
        _running = None


class _StallWatch:
    """Warns once when no rank made progress for ``seconds`` and one waits in a
    collective: the likeliest hang in DDP (a rank skipped a collective, or is still
    in its data loader). Nothing is killed."""

    def __init__(self, launch: Launcher, view: displays.Display, seconds: float | None):
        self.launch = launch
        self.view = view
        self.seconds = seconds
        self.last = time.monotonic()
        self.warned = False

    def progress(self) -> None:
        self.last = time.monotonic()

    def check(self) -> None:
        quiet = time.monotonic() - self.last
        if self.seconds is None or self.warned or quiet < self.seconds:
            return
        self.last = time.monotonic()  # look again after as long, if not now
        dumps = rankstacks.collect(self.launch)
        waiting = [r for r, dump in sorted(dumps.items())
                   if rankstacks.in_collective(rankstacks.main_thread(dump))]
        if not waiting:
            return
        self.warned = True
        self.view.notice(
            f"[nbdist] no rank has made progress for {quiet:.0f}s and rank(s) "
            f"{', '.join(map(str, waiting))} wait in a collective: the job may be stuck "
            f"(a rank that skipped a collective, or one still loading data). It goes on; "
            f"where each rank is:\n{rankstacks.report(dumps)}")


def _apply(event, job: Job, launch: Launcher) -> None:
    if event.kind != EventKind.STATUS:
        return
    status = job.ranks[event.rank]
    status.state = RankState(event.data["state"])
    if "pid" in event.data:
        status.pid = event.data["pid"]
        status.host = event.data.get("host")
        launch.note_rank(event.rank, status.pid, status.host)
    if "exitcode" in event.data:
        status.exitcode = event.data["exitcode"]
    if status.state == RankState.DONE:
        status.exitcode = 0


def _last_lines(job: Job, ranks: list[int]) -> str:
    """The last log lines of ``ranks``, one block per rank, for timeout errors."""
    return "\n".join(
        f"--- rank {r} ---\n{tail(Path(job.ranks[r].log), 5) or '(no output)'}"
        for r in ranks)


def _stacks(launch: Launcher) -> str:
    """Where each rank is, before a timeout kills them (see rankstacks.py)."""
    dumps = rankstacks.collect(launch)
    return rankstacks.report(dumps) if dumps else ""


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
