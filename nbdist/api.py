"""``run_distributed``: validate → pack → launch → supervise → unpack.

::

    run_distributed(fn, *args, nprocs=2)
      │ plan_launch: check arguments, pick ranks / devices / backend / hosts (plan.py)
      │ rank_spec: what the ranks start from (protocol.Spec: cwd, sys.path, environment)
      │ _pack_and_launch: cloudpickle fn, args, kwargs into a fresh private job
      │   directory; torchrun starts once all is pickled, while tensor bytes are written
      ▼
    a launch (launch/): torchrun here, or an agent per host over ssh / Slurm →
      │ every rank runs _worker.main (payload loaded)
      │ Supervisor.follow (supervise.py): rank logs and events to the display,
      │   timeout / init_timeout (with every rank's stack), a stall warning; an
      │   interrupt kills everything (run_distributed's finally)
      ▼
    rank 0's result loaded from the job directory, or the root-cause exception raised
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from nbdist import display as displays
from nbdist import launch as launchers
from nbdist import payload
from nbdist.job import Job, RankStatus, diagnose, newest_job, prune_jobs
from nbdist.jobdir import JobDir
from nbdist.launch import Launcher
from nbdist.plan import (Plan, check_callable, check_seconds, debug_env, plan_launch,
                         rank_spec, warn_if_caller_gpu)
from nbdist.protocol import Spec
from nbdist.session import SESSION
from nbdist.states import JobState
from nbdist.supervise import Limits, Supervisor

DEFAULT_INIT_TIMEOUT = 300.0
# seconds without progress (no event but heartbeats, no output) after which a job
# whose rank waits in a collective is reported as stalled, once
DEFAULT_STALL_WARNING = 120.0


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
    warn_if_caller_gpu(plan)
    check_seconds("stall_warning", stall_warning)
    spec = rank_spec(plan, debug_env(env, debug), return_all=return_all)
    view = displays.create(display, all_ranks=all_ranks)
    prune_jobs()
    job_dir = JobDir.create()
    job = new_job(job_dir, plan, return_all)
    launch = _pack_and_launch(job_dir, fn, args, kwargs, spec, plan)
    try:
        SESSION.remember(job)
        view.start(job)
        limits = Limits(plan.timeout, plan.init_timeout, stall_warning)
        with Supervisor(launch, job, view, limits) as watch, SESSION.following(launch):
            code = watch.follow()
        if code != 0:
            job.status = JobState.FAILED
            raise diagnose(job, code, lost=launch.lost_hosts())
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


def last_job() -> Job | None:
    """The record of the latest job started in this process (also while it runs), or,
    in a process that started none yet (a restarted kernel), the newest one saved."""
    return SESSION.last_job() or newest_job()


def new_job(job_dir: JobDir, plan: Plan, return_all: bool, pool: str | None = None) -> Job:
    """The record of a job (or a pool's task) about to run in ``job_dir``."""
    return Job(id=job_dir.id, dir=str(job_dir.path), world_size=plan.world_size,
               backend=plan.backend, return_all=return_all, pool=pool,
               hosts=list(plan.hosts) if plan.hosts else None,
               ranks=[RankStatus(r, log=str(job_dir.log(r)))
                      for r in range(plan.world_size)])


def _pack_and_launch(job_dir: JobDir, fn: Callable, args: tuple, kwargs: dict,
                     spec: Spec, plan: Plan) -> Launcher:
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
            job_dir.write_spec(spec)
            started.append(launchers.start(job_dir, spec, plan))
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
