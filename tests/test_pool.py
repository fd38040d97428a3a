"""Warm pools: ranks kept up between calls, with every failure injected for real.

Each test starts one pool (one torchrun launch, ~4 s) and checks many tasks on it; a
task costs milliseconds. The autouse fixture in conftest.py fails a test whose pool
leaves a process behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import _thread

import pytest
import torch
import torch.distributed as dist

import nbdist
from conftest import kill_caller, wait_gone
from helpers import job_dirs, rank_states, run_script, start_script
from nbdist.plan import plan_launch
from nbdist.pool import KEPT, LOST


def whoami(scale=1):
    return {"rank": nbdist.rank() * scale, "world": dist.get_world_size(), "pid": os.getpid()}


def raise_on(ranks, message="bad batch"):
    if nbdist.rank() in ranks:
        raise ValueError(message)
    return "finished"


def fail_then_wait_in_collective():
    if nbdist.rank() == 1:
        raise KeyError("rank 1 gave up")
    dist.all_reduce(torch.ones(1))  # never completes: rank 1 is not coming


def crash_rank1():
    if nbdist.rank() == 1:
        os._exit(7)
    dist.barrier()


def sleep_in_python(seconds):
    print(f"rank {nbdist.rank()} sleeping", flush=True)
    time.sleep(seconds)


def rank1_sleeps_rank0_waits_in_collective():
    if nbdist.rank() == 1:
        time.sleep(600)  # answers SIGINT at once
    dist.all_reduce(torch.ones(1))  # rank 0: stuck in C++, cannot answer


def big_result(mib):
    return torch.ones(mib << 18)  # float32: 4 bytes each


def ranks_pids(pool):
    return [r["pid"] for r in pool.status()["ranks"]]


def test_warm_tasks_keep_the_run_distributed_contract(nbdist_home):
    with nbdist.Pool(nprocs=2) as pool:
        first = pool.run(whoami, display="none")
        assert first["rank"] == 0 and first["world"] == 2
        pids = ranks_pids(pool)
        started = time.perf_counter()
        values = pool.run(whoami, 10, return_all=True, display="none")
        warm = time.perf_counter() - started
        assert [v["rank"] for v in values] == [0, 10]
        assert sorted(v["pid"] for v in values) == sorted(pids)  # the same processes
        assert warm < 1.0, warm  # milliseconds really; the benchmark measures it

        # every task is a job of its own: record, folder, result
        job = nbdist.last_job()
        assert job.pool is not None and job.status == "succeeded"
        assert nbdist.load_result(job.dir)[1]["rank"] == 10
        assert torch.equal(pool.run(big_result, 1, display="none"), torch.ones(1 << 18))

        # an exception on every rank, then on one while the other finishes: the pool
        # stays up (the health check ran), its ranks the same
        for ranks in ([0, 1], [1]):
            with pytest.raises(ValueError, match="bad batch") as info:
                pool.run(raise_on, ranks, display="none")
            assert info.value.nbdist_rank in ranks
            assert KEPT in info.value.__notes__
            assert ranks_pids(pool) == pids
        started = time.perf_counter()
        assert pool.run(raise_on, [], display="none") == "finished"
        assert time.perf_counter() - started < 1.0
        assert pool.status()["tasks"] == 6
        assert [r["state"] for r in pool.status()["ranks"]] == ["idle", "idle"]
        pool_dir = pool.status()["dir"]
    assert not pool.alive and not os.path.exists(pool_dir)  # close() removes its folder
    assert wait_gone(pids, 5) < 5
    with pytest.raises(nbdist.InvalidArgumentError, match="this pool is closed"):
        pool.run(whoami, display="none")


@pytest.mark.slow
def test_a_crash_a_stuck_collective_and_a_timeout_each_cost_the_pool(nbdist_home):
    pool = nbdist.Pool(nprocs=2)
    try:
        pool.run(whoami, display="none")
        old = ranks_pids(pool)
        with pytest.raises(nbdist.WorkerCrashedError, match="exit code 7") as info:
            pool.run(crash_rank1, display="none")
        assert info.value.rank == 1 and LOST in info.value.__notes__
        assert wait_gone(old, 5) < 5 and not pool.alive

        # the next call starts a new pool
        assert pool.run(whoami, display="none")["world"] == 2
        old = ranks_pids(pool)
        started = time.monotonic()
        with pytest.raises(KeyError, match="rank 1 gave up") as info:
            pool.run(fail_then_wait_in_collective, display="none")
        assert LOST in info.value.__notes__  # rank 0 never left its all_reduce
        assert time.monotonic() - started < 10
        assert wait_gone(old, 5) < 5

        assert pool.run(whoami, display="none")["world"] == 2
        old = ranks_pids(pool)
        with pytest.raises(nbdist.JobTimeoutError) as info:
            pool.run(sleep_in_python, 600, timeout=3, display="none")
        assert LOST in info.value.__notes__ and info.value.running_ranks == [0, 1]
        assert wait_gone(old, 5) < 5
    finally:
        pool.close()


def _interrupt_when_running(home, before, when):
    """Interrupt the main thread once both ranks of a new task run."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = [d for d in job_dirs(home) if d not in before]
        states = rank_states(new[-1]) if new else {}
        if len(states) == 2 and all(s["state"] == "running" for s in states.values()):
            break
        time.sleep(0.02)
    time.sleep(0.3)  # into the function
    when.append(time.monotonic())
    _thread.interrupt_main()


def interrupt_next_task(home) -> list[float]:
    when: list[float] = []
    threading.Thread(target=_interrupt_when_running, args=(home, job_dirs(home), when),
                     daemon=True).start()
    return when


@pytest.mark.slow
def test_an_interrupt_reaches_the_ranks_and_the_pool_survives_unless_they_cannot_answer(
        nbdist_home, record_property):
    pool = nbdist.Pool(nprocs=2)
    try:
        pool.run(whoami, display="none")
        pids = ranks_pids(pool)
        when = interrupt_next_task(nbdist_home)
        with pytest.raises(KeyboardInterrupt) as info:
            pool.run(sleep_in_python, 600, display="none")
        record_property("seconds_interrupt_to_error", round(time.monotonic() - when[0], 2))
        assert time.monotonic() - when[0] < 3
        assert "[nbdist] every rank stopped its task; the pool is still up" in \
            "\n".join(info.value.__notes__)
        assert ranks_pids(pool) == pids and pool.alive
        interrupted = nbdist.last_job()
        assert interrupted.status == "interrupted"
        # the ranks stopped their task on request: not "failed"
        assert [r.state for r in interrupted.ranks] == ["stopped", "stopped"], interrupted
        assert "2 stopped" in repr(nbdist.jobs()).splitlines()[1]
        assert pool.run(whoami, display="none")["world"] == 2

        # rank 0 waits in C++ (a collective), where no KeyboardInterrupt can reach it
        interrupt_next_task(nbdist_home)
        with pytest.raises(KeyboardInterrupt) as info:
            pool.run(rank1_sleeps_rank0_waits_in_collective, display="none")
        assert LOST in info.value.__notes__
        assert wait_gone(pids, 5) < 5
    finally:
        pool.close()


@pytest.mark.slow
def test_a_pool_dies_with_its_caller_and_at_interpreter_exit(nbdist_home, record_property):
    caller = start_script("""
        import time, nbdist
        pool = nbdist.Pool(nprocs=2)
        pool.run(nbdist.rank, display="none")
        print([r["pid"] for r in pool.status()["ranks"]], flush=True)
        time.sleep(600)
    """, stdout=subprocess.PIPE, text=True)
    try:
        pids = eval(caller.stdout.readline())
        assert len(pids) == 2
        assert kill_caller(caller, pids, record_property) < 10
    finally:
        caller.kill()
        caller.wait()
    # no close(): the interpreter's exit closes the pool
    leaver = start_script("""
        import nbdist
        pool = nbdist.Pool(nprocs=2)
        pool.run(nbdist.rank, display="none")
        print([r["pid"] for r in pool.status()["ranks"]], flush=True)
    """, stdout=subprocess.PIPE, text=True)
    out, _ = leaver.communicate(timeout=120)
    assert leaver.returncode == 0
    assert wait_gone(eval(out.strip().splitlines()[-1]), 5) < 5


@pytest.mark.slow
def test_a_hundred_warm_tasks_leak_nothing(nbdist_home, record_property):
    """In a fresh Python of its own, as the soak test (test_reliability.py says why)."""
    proc = run_script("""
        import json, sys
        sys.path.insert(0, "tests")
        import nbdist
        from helpers import Usage
        from test_pool import whoami

        with nbdist.Pool(nprocs=2) as pool:
            for _ in range(6):  # warm up caches (imports, the first job folders)
                pool.run(whoami, display="none")
            before = Usage.now()
            for _ in range(100):
                pool.run(whoami, display="none")
            after = Usage.now()
        print(json.dumps([(after.rss - before.rss) / 2**20, after.grown_since(before),
                          len(after.children)]))
    """, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grown_mib, grown, children = json.loads(proc.stdout.splitlines()[-1])
    record_property("rss_growth_mib", round(grown_mib, 2))
    assert not grown, grown  # fds, threads or processes that outlived their task
    assert children == 3  # torchrun's agent and 2 ranks
    assert grown_mib <= 5, grown_mib


def test_a_cell_may_leave_out_what_the_pool_decides(monkeypatch):
    """On a GPU pool, a cell without options (or with the pool's own) is fine."""
    from types import SimpleNamespace

    from nbdist import plan as plan_module
    from nbdist.pool import check_options

    monkeypatch.setattr(plan_module, "_cuda_count", lambda: 2)
    pool = SimpleNamespace(plan=plan_launch(nprocs=None, gpus=None, backend=None,
                                                timeout=None, init_timeout=None))
    assert (pool.plan.device, pool.plan.backend, pool.plan.ranks_per_host) == ("cuda", "nccl", 2)
    check_options(pool, nprocs=None, gpus=None, backend=None)
    check_options(pool, nprocs=2, gpus=None, backend="nccl")
    pool.plan = plan_launch(nprocs=None, gpus="0,1", backend=None, timeout=None,
                                init_timeout=None)
    check_options(pool, nprocs=None, gpus="0,1", backend=None)
    for asked, said in ((dict(nprocs=1), "1 ranks"), (dict(gpus=[1]), "GPUs 1"),
                        (dict(backend="gloo"), "backend gloo")):
        options = {"nprocs": None, "gpus": None, "backend": None, **asked}
        with pytest.raises(nbdist.InvalidArgumentError, match=f"the pool has 2 ranks on "
                                                              f"GPUs 0,1 \\(nccl\\); "
                                                              f"this asks for {said}"):
            check_options(pool, **options)
