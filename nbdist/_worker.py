"""What every rank runs: load the payload, join the process group, call the function.

A cold job's rank serves one call and exits; a pool's rank joins once and serves one
task after another (each in its own job folder), as loky's ``_process_worker`` does.
Outcome of a rank, as the caller reads it back from the job (or task) directory:

* success      → ``result-rank-N.pt`` and one ``result-rank-N.NAME.pt`` per value
                 (rank 0, or every rank with ``return_all``; ``payload.Outputs``)
* an exception → ``error-rank-N.pkl`` (the exception, its traceback, rank, time)
* a crash      → nothing; torchrun's agent records the exit code or signal

A cold job's failing rank exits at once instead of tearing the process group down
politely: the peers may be stuck in a collective, and torchrun's agent kills them
when one rank dies. A pool's rank reports "failed" and waits for the next task; the
caller decides whether the pool is still sound (``pool.py``).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
import types
from typing import Any, Callable

from nbdist import frameworks, payload, runtime
from nbdist.channel import ChannelWriter
from nbdist.jobdir import JobDir, check_private, write_bytes_atomic
from nbdist.protocol import ErrorRecord, Heartbeat, Post, Spec
from nbdist.states import RankState

HEARTBEAT = 5.0
WATCH_INTERVAL = 0.5
PAYLOAD_POLL = 0.005


def main(job_dir: str) -> None:
    job = JobDir(job_dir)
    spec = job.read_spec()
    rank = int(os.environ["RANK"])
    _dump_stacks_on_signal(job.stacks(rank))  # before the caller knows the pid to signal
    channel = ChannelWriter(job.events(rank), bell=job.bell)
    channel.status(RankState.STARTING, pid=os.getpid(), host=host())
    runtime._attach(channel)
    _start_watchdog(channel, caller=spec.caller_pid)
    if spec.pool:
        _serve_pool(job, spec, rank, channel)
    else:
        _serve_one(job, spec, rank, channel)
    _destroy_process_group()
    channel.status(RankState.DONE)
    channel.close()
    _exit_after_atexit()


def _exit_after_atexit() -> None:
    """Leave without the interpreter's teardown, once atexit handlers have run.

    That teardown garbage-collects torch's hundreds of thousands of objects (~0.7 s on
    a small machine) before torchrun sees the rank exit, and after a DDP job it aborts
    about one run in six ("terminate called without an active exception", SIGABRT:
    torch's C++ objects destroyed in the wrong order, pytorch#190489), which turned a
    finished job into a crash. The handlers the user's code registered still run.
    """
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:  # as the interpreter does: wait for non-daemon threads
        shutdown()  # (an asynchronous checkpoint writer)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve_one(job: JobDir, spec: Spec, rank: int, channel: ChannelWriter) -> None:
    """A cold job: load the payload, join, run it once. A failure ends the process."""
    def run() -> Any:
        fn, args, kwargs = _load_payload(job, rank)
        channel.status(RankState.JOINING)
        _join(spec)
        channel.status(RankState.READY)
        channel.status(RankState.RUNNING)
        return fn(*args, **kwargs)

    error = _run_and_record(job, rank, channel, run, save=rank == 0 or spec.return_all)
    if error is not None:
        _exit_now(channel, 1, error=type(error).__name__)


def _serve_pool(pool: JobDir, spec: Spec, rank: int, channel: ChannelWriter) -> None:
    """A pool's rank: join once, then run every task the caller posts until it says stop.

    A task's files (payload, log, events, result, error) are in its own job folder; a
    task that raises leaves the rank serving. The caller writes each task's
    :class:`Post` into the rank's FIFO, so an idle rank sleeps in ``read`` and answers
    at once.
    """
    try:
        channel.status(RankState.JOINING)
        _join(spec)
    except BaseException as exc:
        _record_error(pool, rank, exc)
        _exit_now(channel, 1, error=type(exc).__name__)
    channel.status(RankState.READY)
    # the caller's SIGINT is for the user's code only (_interruptible); arriving a
    # moment late, it must not kill the rank in nbdist's own code
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wake = os.open(pool.wake(rank), os.O_RDWR)  # RDWR: open never blocks, read never EOFs
    served = 0
    pending = b""
    while True:
        post, pending = Post.latest(pending + os.read(wake, 4096))
        if post is None or post.seq <= served:
            continue
        served = post.seq
        if post.stop:
            break
        _run_task(JobDir(post.task), pool, rank, post.return_all, channel)
    os.close(wake)


@contextlib.contextmanager
def _interruptible() -> Any:
    """While the user's function runs, SIGINT raises KeyboardInterrupt in it."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_task(task: JobDir, pool: JobDir, rank: int, return_all: bool,
              pool_channel: ChannelWriter) -> None:
    channel = ChannelWriter(task.events(rank), bell=pool.bell)
    runtime._attach(channel)
    with _output_to(task.log(rank)):
        channel.status(RankState.RUNNING, pid=os.getpid(), host=host())

        def run() -> Any:
            fn, args, kwargs = _load_payload(task, rank)
            with _interruptible():
                return fn(*args, **kwargs)

        error = _run_and_record(task, rank, channel, run, save=rank == 0 or return_all)
    # after the log is complete: the caller reads an outcome as "all output is there"
    if error is None:
        channel.status(RankState.DONE)
    else:
        channel.status(RankState.FAILED, error=type(error).__name__)
    channel.close()
    runtime._attach(pool_channel)


@contextlib.contextmanager
def _output_to(path) -> Any:
    """Send this process's stdout and stderr (fds 1 and 2) to ``path`` meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)


def _run_and_record(job: JobDir, rank: int, channel: ChannelWriter,
                    run: Callable[[], Any], *, save: bool) -> BaseException | None:
    """Run the user's code; save its result, or record its exception and return it."""
    try:
        result = run()
        runtime.flush_metrics()
        if save:
            _save_result(job, rank, result)
    except SystemExit as exc:
        if exc.code not in (0, None):
            _exit_now(channel, exc.code if isinstance(exc.code, int) else 1)
        if save:
            _save_result(job, rank, None)
    except BaseException as exc:
        if isinstance(exc, EOFError):
            exc.add_note("[nbdist] the ranks have no standard input: input() cannot ask "
                         "anyone there. Set the value in the notebook instead (a variable "
                         "the cell reads, or an argument of the function).")
        runtime.flush_metrics()  # the last values before the failure are worth seeing
        _record_error(job, rank, exc)
        return exc
    return None


def check_health() -> int:
    """A pool's health check after a failed task: one all_reduce over every rank.

    Returns the world size if the process group still works and its collectives are
    in step; the caller gives it ~2 s.
    """
    import torch
    import torch.distributed as dist

    ones = torch.ones(1, device=runtime.device())  # nccl reduces GPU tensors only
    dist.all_reduce(ones)
    return int(ones.item())


def _load_payload(job: JobDir, rank: int) -> tuple:
    # torchrun starts while the caller still writes the tensors' bytes (see
    # api._pack_and_launch); the file appears whole, by rename. Should the caller die
    # meanwhile, the watchdog ends this rank.
    while not job.payload.exists():
        time.sleep(PAYLOAD_POLL)
    try:
        check_private(job.path)  # unpickling runs code: only from the user's own files
        check_private(job.payload)
        _accept_users_init()  # first: unpickling binds the names the user's code calls
        return payload.load(job.payload)
    except Exception as exc:
        exc.add_note(f"[nbdist] while loading the job's function and arguments on rank "
                     f"{rank}: every module they use must be importable on the workers "
                     f"(same Python, working directory and sys.path as the caller).")
        raise


def _join(spec: Spec) -> None:
    """Join the process group and make frameworks' code find it (the user's own
    ``init_process_group`` was made to when the payload was loaded)."""
    _init_process_group(spec)
    frameworks.on_rank(spec)


def _init_process_group(spec: Spec) -> None:
    import torch
    import torch.distributed as dist

    if spec.device == "cuda":
        torch.cuda.set_device(runtime.local_rank())
    # torch >= 2.1 has no barrier after init: a rank returns as soon as its own gloo
    # sockets are connected, and if it then exits or destroys its group (a function that
    # returns or raises without a collective) while a peer is still in connectFullMesh,
    # that peer fails with "Connection closed by peer" (likelier under load; pytorch
    # PR 61396). torch's store barrier after init makes every rank wait for all; only
    # for nbdist's own call, not the user's new_group() calls.
    previous = os.environ.get("TORCH_DIST_INIT_BARRIER")
    os.environ["TORCH_DIST_INIT_BARRIER"] = "1"
    try:
        dist.init_process_group(spec.backend)
    finally:
        if previous is None:
            del os.environ["TORCH_DIST_INIT_BARRIER"]
        else:
            os.environ["TORCH_DIST_INIT_BARRIER"] = previous


def _accept_users_init() -> None:
    """Make the user's own ``init_process_group`` (every tutorial has one) find the
    group nbdist set up: the same backend is a no-op, said once; another is an error.

    Without a group (nbdist's own call, or the user's after destroying it) it is
    torch's. Installed before the payload is unpickled and on every path to the
    function, as the names the user's code calls are bound then: PyTorch's DDP
    tutorial does ``from torch.distributed import init_process_group`` at the top of
    a module the function imports, and cloudpickle sends torch's function itself, a
    notebook global, by reference to ``torch.distributed.distributed_c10d`` (issue 18).
    Once per process: a pool's rank installs it for its first task.
    """
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    original = distributed_c10d.init_process_group
    if hasattr(original, "_nbdist_original"):
        return
    said = False

    @functools.wraps(original)
    def init_process_group(backend: Any = None, *args: Any, **kwargs: Any) -> None:
        nonlocal said
        if not dist.is_initialized():  # nbdist's own call, or the user's after destroying it
            return original(backend, *args, **kwargs)
        have = dist.get_backend()
        conflicts = [f"backend={backend!r}"] if backend and have not in str(backend).lower() else []
        for key, ours in (("world_size", dist.get_world_size()), ("rank", dist.get_rank())):
            if kwargs.get(key, -1) not in (-1, ours):
                conflicts.append(f"{key}={kwargs[key]!r}")
        if conflicts:
            raise ValueError(
                f"init_process_group({', '.join(conflicts)}): nbdist already initialised "
                f"the default process group (backend {have!r}, world size "
                f"{dist.get_world_size()}, this is rank {dist.get_rank()}). Drop the call "
                f"(the group is ready), or ask nbdist for what you need: backend='nccl' "
                f"comes with gpus=N (--gpus N), the world size with nprocs (--nprocs).")
        if not said:
            said = True
            print(f"[nbdist] init_process_group: the {have} process group nbdist set up "
                  f"is already initialised; your call does nothing", file=sys.stderr,
                  flush=True)

    init_process_group._nbdist_original = original
    distributed_c10d.init_process_group = dist.init_process_group = init_process_group
    # Modules imported before now that bound torch's function (today torch's own
    # device_mesh; a framework a .pth file or sitecustomize imports): one pass over
    # sys.modules, about a millisecond, so that no name left behind makes a second group.
    for module in list(sys.modules.values()):
        if (isinstance(module, types.ModuleType)
                and vars(module).get("init_process_group") is original):
            module.init_process_group = init_process_group


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _save_result(job: JobDir, rank: int, result: Any) -> None:
    single = not isinstance(result, payload.Outputs)  # a function's value, or a cell's names
    outputs = payload.Outputs({payload.RETURN_VALUE: result}) if single else result
    outputs.values = {name: payload.to_cpu(v) for name, v in outputs.values.items()}
    try:
        payload.dump_outputs(outputs, job.result(rank), functools.partial(job.result_part, rank),
                             strict=single)
    except Exception as exc:
        raise payload.unpicklable_error(
            f"return value of rank {rank}", payload.parts(result), exc,
            hint="Return plain data (tensors, state_dicts, numbers, lists) instead; "
                 f"the job's logs are kept in {job.path}.") from exc


def _record_error(job: JobDir, rank: int, exc: BaseException) -> None:
    import torch.distributed as dist

    frames = exc.__traceback__
    while frames is not None and frames.tb_next is not None and \
            frames.tb_frame.f_code.co_filename == __file__:
        frames = frames.tb_next  # start the traceback in the user's code, not ours
    tb = "".join(traceback.format_exception(type(exc), exc, frames))
    if rank != 0:  # rank 0's log is streamed to the caller, which re-raises it anyway
        print(tb, file=sys.stderr, flush=True)
    try:
        exc_bytes: bytes | None = payload.dumps(exc)
        pickle.loads(exc_bytes)
    except Exception:
        exc_bytes = None
    record = ErrorRecord(
        rank=rank, host=host(), pid=os.getpid(), time=time.time(),
        type=f"{type(exc).__module__}.{type(exc).__qualname__}", message=str(exc),
        traceback=tb, exception=exc_bytes,
        # an error of the communication layer is usually a consequence of a peer's
        # failure, not the root cause
        collective=isinstance(exc, getattr(dist, "DistError", ())))
    write_bytes_atomic(job.error(rank), record.encode())


def _exit_now(channel: ChannelWriter, code: int, error: str | None = None) -> None:
    channel.status(RankState.FAILED, exitcode=code, error=error)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _dump_stacks_on_signal(path) -> None:
    """On SIGUSR1, append every thread's Python stack to ``path`` (``rankstacks.py``).

    faulthandler's handler is C code: it answers while the rank is stuck in C++ too
    (a collective, a data loader's queue), where no Python handler would run.
    """
    import faulthandler

    stream = open(path, "a", buffering=1)  # kept open for the life of the process
    faulthandler.register(signal.SIGUSR1, file=stream, all_threads=True)


def host() -> str:
    """This rank's host as the caller named it (``launch/hosts.py`` sets it), else
    the machine's name."""
    return os.environ.get("NBDIST_HOST") or socket.gethostname()


def _start_watchdog(channel: ChannelWriter, caller: int | None) -> None:
    """Exit when torchrun's agent or the caller is gone; send heartbeats meanwhile.

    ``caller`` is None on another host than the caller's: a pid there is a stranger's.
    The agent there watches its relay, and the relay its link to the caller.
    """
    agent = os.getppid()

    def watch() -> None:
        last_beat = time.monotonic()
        while os.getppid() == agent and (caller is None or _pid_alive(caller)):
            time.sleep(WATCH_INTERVAL)
            if time.monotonic() - last_beat >= HEARTBEAT:
                channel.emit(Heartbeat())
                last_beat = time.monotonic()
        os.killpg(0, signal.SIGKILL)  # this rank and any dataloader workers it forked

    threading.Thread(target=watch, daemon=True, name="nbdist-watchdog").start()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
