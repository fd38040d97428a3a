"""Everything that can go wrong in a job, each with the error the user must see.

One table of faults injected for real (exceptions, signals, hangs, killed parents);
each row: what the ranks do, the exception expected, what it must say, a time bound.
The autouse fixture in conftest.py fails any test that leaves a process behind.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
import types
import _thread
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import nbdist
from conftest import wait_gone
from helpers import (agents, job_dirs, kill_caller_once_running, start_script,
                     wait_for_ranks, worker_pids)
from nbdist.job import Job, read_error
from nbdist.jobdir import JobDir


class CustomError(Exception):
    def __init__(self, message, code=0):
        super().__init__(message)
        self.code = code


class UnpicklableError(Exception):
    def __init__(self, a, b):  # pickle calls cls(*args) with one arg: cannot rebuild
        super().__init__(f"{a} and {b}")


def fail_on_rank1_while_rank0_waits(exc):
    dist.barrier()
    if nbdist.rank() == 1:
        time.sleep(0.5)
        raise exc
    dist.all_reduce(torch.ones(1))  # rank 0 is stuck here when rank 1 dies


def raise_unpicklable():
    if nbdist.rank() == 1:
        raise UnpicklableError("x", "y")
    time.sleep(60)


def kill_self(sig):
    dist.barrier()
    if nbdist.rank() == 1:
        print("about to be killed", flush=True)
        os.kill(os.getpid(), sig)
    # rank 0 waits in a collective: gloo raises "Connection closed by peer" here,
    # which must not pass for the root cause
    dist.barrier()
    time.sleep(60)


def exit_hard(code):
    dist.barrier()
    if nbdist.rank() == 0:
        print("leaving without a word", flush=True)
        os._exit(code)
    dist.barrier()
    time.sleep(60)


def two_failures():
    dist.barrier()
    if nbdist.rank() == 1:
        raise KeyError("first")
    # raise once rank 1's error is recorded, before torchrun can tear this rank down
    first = Path(sys.argv[0]).with_name("error-rank-1.pkl")  # beside entry.py
    deadline = time.monotonic() + 30
    while not first.exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    raise RuntimeError("second")


def rank0_waits_in_barrier_rank1_sleeps():
    if nbdist.rank() == 1:
        print("rank 1 sleeping", flush=True)
        time.sleep(600)  # never reaches the barrier
    dist.barrier()


def sleep_forever():
    print(f"rank {nbdist.rank()} sleeping", flush=True)
    time.sleep(600)


def mismatched_collectives():
    if nbdist.rank() == 0:
        dist.all_reduce(torch.ones(3))
    else:
        dist.barrier()  # not what rank 0 calls: with debug=True torch says so at once


def return_generator():
    return (i for i in range(3))


def noop():
    return "ok"


class DiesWhilePickled:
    def __reduce__(self):
        print("killed while writing the result", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def die_while_saving_result():
    return {"weights": torch.ones(1_000_000), "bomb": DiesWhilePickled()}


class StallWhenUnpickled:
    """Stalls the ranks whose ``$variable`` is ``value`` (``RANK`` 1, ``NBDIST_HOST``
    host2) while they unpickle the job: before they can join the process group."""

    def __init__(self, variable: str, value: str):
        self.variable, self.value = variable, value

    def __reduce__(self):
        return (_stall_where, (self.variable, self.value))


def _stall_where(variable: str, value: str):
    if os.environ.get(variable) == value:
        time.sleep(600)
    return None


def _ghost_value():
    """An object whose class lives in a module the workers cannot import."""
    module = types.ModuleType("ghost_module")
    exec("class Ghost:\n    pass\n", module.__dict__)
    sys.modules["ghost_module"] = module
    return module.Ghost()


FAULTS = {
    # id: (fn, args, run_distributed kwargs, expected type, text in message, rank, bound s)
    "exception-peer-in-collective": (
        fail_on_rank1_while_rank0_waits, (ValueError("bad value"),), {},
        ValueError, "bad value", 1, 5),
    "custom-exception-class": (
        fail_on_rank1_while_rank0_waits, (CustomError("custom", code=7),), {},
        CustomError, "custom", 1, 5),
    "exception-that-cannot-come-back": (
        raise_unpicklable, (), {}, nbdist.RemoteError, "UnpicklableError", 1, 5),
    "sigkill": (kill_self, (signal.SIGKILL,), {},
                nbdist.WorkerCrashedError, "SIGKILL", 1, 5),
    "sigsegv": (kill_self, (signal.SIGSEGV,), {},
                nbdist.WorkerCrashedError, "SIGSEGV", 1, 5),
    "os-exit": (exit_hard, (3,), {}, nbdist.WorkerCrashedError, "exit code 3", 0, 5),
    "two-ranks-fail": (two_failures, (), {}, KeyError, "first", 1, 5),
    "timeout": (rank0_waits_in_barrier_rank1_sleeps, (), {"timeout": 15},
                nbdist.JobTimeoutError, "rank 1 sleeping", None, 3),
    "init-hang": (lambda x: None, (StallWhenUnpickled("RANK", "1"),), {"init_timeout": 15},
                  nbdist.InitTimeoutError, "ranks [1] did not join", None, 3),
    "module-missing-on-workers": (lambda x: None, ("ghost",), {},
                                  ModuleNotFoundError, "ghost_module", None, 5),
    "killed-while-writing-result": (die_while_saving_result, (), {},
                                    nbdist.WorkerCrashedError, "SIGKILL", 0, 5),
    "unpicklable-result": (return_generator, (), {}, nbdist.PicklingError,
                           "generator", 0, 5),
    "mismatched-collectives": (mismatched_collectives, (), {"debug": True}, RuntimeError,
                               "the ranks called different collectives: rank ", None, 5),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault(fault, record_property):
    fn, args, options, expected, text, rank, bound = FAULTS[fault]
    if fault == "module-missing-on-workers":
        args = (_ghost_value(),)
    started = time.time()
    with pytest.raises(expected) as info:
        nbdist.run_distributed(fn, *args, nprocs=2, display="none", **options)
    ended = time.time()
    exc = info.value
    message = str(exc) + "\n".join(getattr(exc, "__notes__", []))
    assert text in message, message
    if rank is not None:
        assert getattr(exc, "rank", getattr(exc, "nbdist_rank", None)) == rank
        record = read_error(JobDir(nbdist.last_job().dir), rank)
        # an exception leaves an error record, a crash none
        assert (record is None) == (expected is nbdist.WorkerCrashedError), record
        if record is not None:  # bound from the raise to the caller's error
            record_property("seconds_from_raise_to_error", round(ended - record.time, 2))
            assert ended - record.time <= bound
    record_property("seconds_total", round(ended - started, 2))
    if "timeout" in options:
        assert options["timeout"] <= ended - started <= options["timeout"] + bound
    if "init_timeout" in options:
        assert exc.missing_ranks == [1]
        assert options["init_timeout"] <= ended - started <= options["init_timeout"] + bound
    if fault == "custom-exception-class":
        assert type(exc) is CustomError and exc.code == 7
    if fault in ("exception-peer-in-collective", "custom-exception-class"):
        assert "fail_on_rank1_while_rank0_waits" in str(exc.__cause__)  # remote traceback
        assert any("rank 1 of 2" in note for note in exc.__notes__)
    if fault == "exception-that-cannot-come-back":
        assert exc.type_name.endswith("UnpicklableError") and "x and y" in str(exc)
    if isinstance(exc, nbdist.WorkerCrashedError):
        assert exc.log_tail.strip().endswith(
            ("about to be killed", "leaving without a word", "killed while writing the result"))
    if fault == "two-ranks-fail":
        assert any("also failed after it: rank 0 (RuntimeError)" in note
                   for note in exc.__notes__), exc.__notes__
    if fault == "module-missing-on-workers":
        assert "while loading the job's function and arguments" in message
    if fault == "timeout":  # where each rank was: rank 0 in the barrier, rank 1 asleep
        assert exc.running_ranks == [0, 1]
        assert "rank 0: waiting in barrier" in exc.stacks, exc.stacks
        assert re.search(r"rank 1: at \S+test_failures.py line \d+ in "
                         r"rank0_waits_in_barrier_rank1_sleeps", exc.stacks), exc.stacks
        assert "time.sleep(600)  # never reaches the barrier" in exc.stacks
        assert exc.stacks in str(exc)
    if fault == "mismatched-collectives":  # torch's own check races: either form
        assert re.search(r"rank [01] called \w+ \(collective #0[^;]*\); rank [01] called \w+",
                         message), message
    if fault == "init-hang":  # rank 1 is stuck unpickling, before init_process_group
        assert re.search(r"rank 1: at \S+ line \d+ in _stall_where", exc.stacks), exc.stacks
    job = nbdist.last_job()
    if fault == "killed-while-writing-result":  # never a half-written result
        assert not JobDir(job.dir).result(0).exists()
    assert job.status in ("failed", "timeout")
    assert os.path.isdir(job.dir)  # logs are kept


def test_bad_arguments_are_refused_before_anything_starts(nbdist_home):
    import threading as th

    with pytest.raises(nbdist.PicklingError, match=r"keyword argument 'lock'.*lock") as info:
        nbdist.run_distributed(noop, 1, lock=th.Lock(), nprocs=2)
    assert info.value.name == "keyword argument 'lock'"
    with pytest.raises(nbdist.PicklingError, match=r"argument 0"):
        nbdist.run_distributed(noop, th.Lock(), nprocs=2)
    with pytest.raises(nbdist.InvalidArgumentError, match=r"nprocs=2"):
        nbdist.run_distributed(noop, gpus=2)
    with pytest.raises(nbdist.InvalidArgumentError, match="positive integer"):
        nbdist.run_distributed(noop, nprocs=0)
    with pytest.raises(nbdist.InvalidArgumentError, match="needs a function"):
        nbdist.run_distributed("train.py", nprocs=2)
    with pytest.raises(nbdist.InvalidArgumentError, match="needs GPUs"):
        nbdist.run_distributed(noop, nprocs=2, backend="nccl")
    with pytest.raises(nbdist.InvalidArgumentError, match="timeout"):
        nbdist.run_distributed(noop, nprocs=2, timeout=-1)
    # none of these started a job
    assert all(not (d / "entry.py").exists() for d in job_dirs(nbdist_home))


def _interrupt_when_running(home, when: list[float]):
    wait_for_ranks(home, "running", 2)
    when.append(time.monotonic())
    _thread.interrupt_main()


@pytest.mark.slow
def test_interrupt_kills_everything_fast_and_next_run_works(nbdist_home, record_property):
    when: list[float] = []
    threading.Thread(target=_interrupt_when_running, args=(nbdist_home, when),
                     daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        nbdist.run_distributed(sleep_forever, nprocs=2, display="none")
    pids = worker_pids(job_dirs(nbdist_home)[-1])
    assert len(pids) == 2
    wait_gone(pids, 5)
    gone = time.monotonic() - when[0]  # from the stop button to the last process gone
    record_property("seconds_until_all_gone", round(gone, 2))
    assert gone <= 2.0
    job = nbdist.last_job()
    assert job.status == "interrupted"
    # no rank is left "running" in the record, in memory or saved
    assert [r.state for r in job.ranks] == ["killed", "killed"]
    assert [r.state for r in Job.load(job.dir).ranks] == ["killed", "killed"]
    assert nbdist.run_distributed(noop, nprocs=2, display="none") == "ok"


@pytest.mark.slow
def test_killed_caller_takes_its_workers_along(nbdist_home, record_property):
    caller = start_script("""
        import time, nbdist
        def sleep():
            time.sleep(600)
        nbdist.run_distributed(sleep, nprocs=2)
    """)
    assert kill_caller_once_running(caller, nbdist_home, 2, record_property) < 10


def _kill_agent_when_running(home):
    wait_for_ranks(home, "running", 2)
    agents()[0].kill()


@pytest.mark.slow
def test_killed_torchrun_is_an_error_and_leaves_no_worker(nbdist_home, record_property):
    threading.Thread(target=_kill_agent_when_running, args=(nbdist_home,),
                     daemon=True).start()
    with pytest.raises(nbdist.LaunchError, match="SIGKILL"):
        nbdist.run_distributed(sleep_forever, nprocs=2, display="none")
    gone = wait_gone(worker_pids(job_dirs(nbdist_home)[-1]), 2)
    record_property("seconds_until_all_gone", round(gone, 2))
    assert gone < 2


def rank1_late_to_the_barrier(seconds, progress):
    if progress:  # a job that reports progress while it waits is not stalled
        for _ in nbdist.track(range(int(seconds / 0.1)), desc="wait"):
            time.sleep(0.1)
    elif nbdist.rank() == 1:
        time.sleep(seconds)
    dist.barrier()
    return "done"


@pytest.mark.slow
def test_a_stall_in_a_collective_is_said_once_and_the_job_goes_on(capsys):
    assert nbdist.run_distributed(rank1_late_to_the_barrier, 5, False, nprocs=2,
                                  display="plain", stall_warning=1.5) == "done"
    out = capsys.readouterr().out
    assert out.count("[nbdist] no rank has made progress for") == 1, out
    assert "rank(s) 0 wait in a collective" in out
    assert "rank 0: waiting in barrier" in out and "rank 1: at " in out
    assert nbdist.run_distributed(rank1_late_to_the_barrier, 4, True, nprocs=2,
                                  display="plain", stall_warning=1.5) == "done"
    assert "no rank has made progress" not in capsys.readouterr().out
