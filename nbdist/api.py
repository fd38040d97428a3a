"""``run_distributed``: validate → pack → launch → supervise → unpack.

::

    run_distributed(fn, *args, nprocs=2)
      │ plan_job: check arguments, pick nprocs / devices / backend (nothing started)
      │ _pack_and_launch: cloudpickle fn, args, kwargs into a fresh private job
      │   directory; torchrun starts once all is pickled, while tensor bytes are written
      ▼
    Launch (launcher.py): torchrun → every rank runs _worker.main (payload loaded)
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from nbdist import display as displays
from nbdist import frameworks, payload, rankstacks
from nbdist.channel import ChannelReader, LogFollower
from nbdist.errors import InitTimeoutError, InvalidArgumentError, JobTimeoutError
from nbdist.job import Job, RankStatus, diagnose, prune_jobs
from nbdist.jobdir import JobDir, tail, write_json_atomic
from nbdist.launcher import Launch, entry_script
from nbdist.states import NOT_JOINED, REPORTED, EventKind, JobState, RankState

DEFAULT_INIT_TIMEOUT = 300.0
# seconds without progress (no event but heartbeats, no output) after which a job
# whose rank waits in a collective is reported as stalled, once
DEFAULT_STALL_WARNING = 120.0
POLL = 0.05  # seconds between looks at the job while it runs
FIRST_POLL = 0.001  # the first looks, doubling up to POLL


_last_job: Job | None = None
_running: Launch | None = None  # the launch supervise() follows now, for stacks()


@dataclass(frozen=True)
class Plan:
    """The validated shape of a job."""

    nprocs: int
    device: str  # "cuda" | "cpu"
    backend: str
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES for the workers
    timeout: float | None
    init_timeout: float | None


def run_distributed(fn: Callable, *args: Any, nprocs: int | None = None,
                    gpus: int | str | Sequence[int] | None = None,
                    backend: str | None = None, timeout: float | None = None,
                    init_timeout: float | None = DEFAULT_INIT_TIMEOUT,
                    env: dict[str, str] | None = None, return_all: bool = False,
                    display: str = "auto", all_ranks: bool = False,
                    stall_warning: float | None = DEFAULT_STALL_WARNING,
                    debug: bool = False, **kwargs: Any) -> Any:
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
    plan = plan_job(fn, nprocs=nprocs, gpus=gpus, backend=backend, timeout=timeout,
                    init_timeout=init_timeout)
    check_seconds("stall_warning", stall_warning)
    env = debug_env(env, debug)
    view = displays.create(display, all_ranks=all_ranks)
    prune_jobs()
    job_dir = JobDir.create()
    job = Job(id=job_dir.id, dir=str(job_dir.path), nprocs=plan.nprocs,
              backend=plan.backend, return_all=return_all,
              ranks=[RankStatus(r, log=str(job_dir.log(r))) for r in range(plan.nprocs)])
    launch = _pack_and_launch(job_dir, fn, args, kwargs, plan, return_all, env)
    try:
        remember(job)
        view.start(job)
        supervise(launch, job, view, timeout=plan.timeout, init_timeout=plan.init_timeout,
                  stall_warning=stall_warning)
        if launch.poll() != 0:
            job.status = JobState.FAILED
            raise diagnose(job, launch.poll())
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


def running_launch() -> Launch | None:
    """The launch of the job (or pool task) running in this process now, if any."""
    return _running


def last_job() -> Job | None:
    """The record of the latest job started in this process (also while it runs)."""
    return _last_job


def remember(job: Job) -> None:
    global _last_job
    _last_job = job


def plan_job(fn: Callable, *, nprocs: int | None, gpus: int | str | Sequence[int] | None,
             backend: str | None, timeout: float | None,
             init_timeout: float | None) -> Plan:
    """Check the arguments and decide the job's shape; raises before anything starts."""
    check_callable(fn)
    return plan_launch(nprocs=nprocs, gpus=gpus, backend=backend, timeout=timeout,
                       init_timeout=init_timeout)


def check_callable(fn: Any) -> None:
    if not callable(fn):
        raise InvalidArgumentError(
            f"nbdist needs a function to run on the ranks, got {type(fn).__name__} {fn!r}")


def debug_env(env: dict[str, str] | None, debug: bool) -> dict[str, str] | None:
    """``env`` plus torch's collective checks when ``debug``."""
    return {**(env or {}), "TORCH_DISTRIBUTED_DEBUG": "DETAIL"} if debug else env


def check_seconds(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, (int, float)) or value <= 0):
        raise InvalidArgumentError(f"{name} must be a positive number of seconds, "
                                   f"got {value!r}")


def plan_launch(*, nprocs: int | None, gpus: int | str | Sequence[int] | None,
                backend: str | None, timeout: float | None,
                init_timeout: float | None) -> Plan:
    """The shape of a launch (a job or a pool), checked; raises before anything starts."""
    if nprocs is not None and (not isinstance(nprocs, int) or nprocs < 1):
        raise InvalidArgumentError(f"nprocs must be a positive integer, got {nprocs!r}")
    check_seconds("timeout", timeout)
    check_seconds("init_timeout", init_timeout)
    device_ids = _parse_gpus(gpus)
    if device_ids is None and nprocs is None and _cuda_count() > 0:
        device_ids = list(range(_cuda_count()))  # default: one rank per visible GPU
    if device_ids is not None:
        _check_gpus(device_ids, gpus, nprocs)
        nprocs = len(device_ids)
    device = "cuda" if device_ids is not None else "cpu"
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    if backend == "nccl" and device == "cpu":
        raise InvalidArgumentError(
            "backend='nccl' needs GPUs; pass gpus=N, or use backend='gloo' on the CPU")
    visible = None
    if gpus is not None:
        # ids count within what the caller sees, as torch.cuda numbers them
        current = os.environ.get("CUDA_VISIBLE_DEVICES")
        names = current.split(",") if current else [str(i) for i in range(max(device_ids) + 1)]
        visible = ",".join(names[i] for i in device_ids)
    return Plan(nprocs=nprocs or 2, device=device, backend=backend,
                visible_devices=visible, timeout=timeout, init_timeout=init_timeout)


def _parse_gpus(gpus: int | str | Sequence[int] | None) -> list[int] | None:
    if gpus is None:
        return None
    if isinstance(gpus, bool):
        raise InvalidArgumentError(f"gpus must be a count or device ids, got {gpus!r}")
    if isinstance(gpus, int):
        if gpus < 1:
            raise InvalidArgumentError(f"gpus must be at least 1, got {gpus}")
        return list(range(gpus))
    if isinstance(gpus, str):
        text = gpus.strip()
        if text.isdigit() and "," not in text:
            return _parse_gpus(int(text))
        parts = [p.strip() for p in text.split(",") if p.strip()]
    else:
        parts = list(gpus)
    try:
        ids = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"gpus={gpus!r}: expected a count (2) or device ids ('0,1' or [0, 1])") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise InvalidArgumentError(f"gpus={gpus!r}: device ids must be distinct and >= 0")
    return ids


def _check_gpus(device_ids: list[int], gpus: Any, nprocs: int | None) -> None:
    available = _cuda_count()
    if available == 0:
        raise InvalidArgumentError(
            f"gpus={gpus!r} was requested, but this machine has no usable CUDA GPU "
            f"(torch.cuda.is_available() is False). To run on the CPU with the gloo "
            f"backend, use nprocs={len(device_ids)} instead.")
    if max(device_ids) >= available:
        raise InvalidArgumentError(
            f"gpus={gpus!r} asks for device {max(device_ids)}, but only {available} "
            f"GPU(s) are visible (ids 0..{available - 1}).")
    if nprocs is not None and nprocs != len(device_ids):
        raise InvalidArgumentError(
            f"nprocs={nprocs} does not match gpus={gpus!r} ({len(device_ids)} device(s)): "
            f"nbdist runs one process per GPU; drop nprocs or make them agree.")


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _pack_and_launch(job_dir: JobDir, fn: Callable, args: tuple, kwargs: dict,
                     plan: Plan, return_all: bool, env: dict[str, str] | None) -> Launch:
    """Write what the ranks need into the job directory and start torchrun.

    torchrun starts as soon as everything is pickled (an unpicklable value has been
    reported by then, with nothing started) while the tensors' bytes are still being
    written: its agent and ranks spend seconds importing torch before they read the
    payload, and wait for its file to appear.
    """
    started: list[Launch] = []
    failed: list[Exception] = []

    def start() -> None:  # runs inside torch.save: an error here is not a pickling one
        try:
            write_spec(job_dir, plan, return_all)
            started.append(Launch(job_dir, plan.nprocs, worker_env(plan, env)))
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
        "nprocs": plan.nprocs, "backend": plan.backend, "device": plan.device,
        "return_all": return_all, "caller_pid": os.getpid(), **more,
    })
    cwd = os.getcwd()
    sys_path = [os.path.abspath(p) if p else cwd for p in sys.path]
    job_dir.entry.write_text(entry_script(job_dir, cwd=cwd, sys_path=sys_path))


def worker_env(plan: Plan, extra: dict[str, str] | None) -> dict[str, str]:
    env = {**frameworks.launch_env(plan.device), **os.environ}
    env.update({k: str(v) for k, v in (extra or {}).items()})
    env["PYTHONUNBUFFERED"] = "1"  # prints reach the log (and the notebook) at once
    # torch without numpy warns at every import; the caller's own import said it once
    env["PYTHONWARNINGS"] = ",".join(filter(None, (env.get("PYTHONWARNINGS"),
                                                   "ignore:Failed to initialize NumPy")))
    # torchrun sets 1 anyway when unset, and prints a banner about it
    env.setdefault("OMP_NUM_THREADS", "1")
    env["NBDIST_DEVICE"] = plan.device
    if plan.backend == "gloo" and os.path.exists("/sys/class/net/lo"):
        # a single-machine job: keep gloo's sockets on loopback, not on whatever
        # interface the host name resolves to
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if plan.visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = plan.visible_devices
    return env


def supervise(launch: Launch, job: Job, view: displays.Display, *,
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
            elapsed = time.monotonic() - started
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

    def __init__(self, launch: Launch, view: displays.Display, seconds: float | None):
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


def _apply(event, job: Job, launch: Launch) -> None:
    if event.kind != EventKind.STATUS:
        return
    status = job.ranks[event.rank]
    status.state = RankState(event.data["state"])
    if "pid" in event.data:
        status.pid = event.data["pid"]
        status.host = event.data.get("host")
        launch.worker_pids[event.rank] = status.pid
    if "exitcode" in event.data:
        status.exitcode = event.data["exitcode"]
    if status.state == RankState.DONE:
        status.exitcode = 0


def _last_lines(job: Job, ranks: list[int]) -> str:
    """The last log lines of ``ranks``, one block per rank, for timeout errors."""
    return "\n".join(
        f"--- rank {r} ---\n{tail(Path(job.ranks[r].log), 5) or '(no output)'}"
        for r in ranks)


def _stacks(launch: Launch) -> str:
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
    lines = _last_lines(job, missing)
    stacks = f"\nWhere each rank was:\n{where}" if where else ""
    return InitTimeoutError(
        f"ranks {missing} did not join the process group within init_timeout="
        f"{timeout:g}s (joined: {joined}); everything was killed. Code that runs before "
        f"the function (imports of the arguments' modules) or a blocked network "
        f"rendezvous are the usual causes.{stacks}\nTheir last log lines:\n{lines}",
        timeout=timeout, missing_ranks=missing, stacks=where)
