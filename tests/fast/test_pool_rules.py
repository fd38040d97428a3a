"""A pool's failure rules (pool.py), its launches played by FakeLaunch on a fake clock.

What keeps a pool: a task that raises on some ranks while the others finish, once a
health check passes; an interrupt every rank answers. What tears it down, with the
LOST note: a crash, a failed health check, a rank still stuck FAILURE_GRACE after a
peer failed that does not answer SIGINT, an interrupt not answered within
INTERRUPT_GRACE. The next run then starts a new launch.
"""

from __future__ import annotations

import os
import signal

import pytest

import nbdist
from nbdist import pool as pools
from nbdist.display import Display
from nbdist.errors import InitTimeoutError, JobTimeoutError, WorkerCrashedError
from nbdist.states import JobState, RankState
from nbdist.supervise import POLL

from .fakes import (Crash, Done, FakeClock, FakeLaunch, Fail, Hang, Joined,
                    RecordingDisplay, Say, Sleep, Started)


def work(*args, **kwargs):
    """The function every run ships (the scripts decide what the ranks do)."""


class Launches:
    """Stands in for ``nbdist.launch.start``: each start plays the next queued script."""

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.started: list[FakeLaunch] = []
        self.queued: list[dict] = []

    def then(self, **script) -> "Launches":
        self.queued.append(script)
        return self

    def start(self, job, spec, plan) -> FakeLaunch:
        script = self.queued.pop(0) if self.queued else {}
        self.started.append(FakeLaunch(job, spec, self.clock, **script))
        return self.started[-1]

    @property
    def last(self) -> FakeLaunch:
        return self.started[-1]


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def launches(monkeypatch, clock):
    launches = Launches(clock)
    monkeypatch.setattr(nbdist.launch, "start", launches.start)
    return launches


@pytest.fixture
def make_pool(launches, clock):
    made = []

    def make(*, init_timeout: float | None = None, **script) -> nbdist.Pool:
        launches.then(**script)
        made.append(nbdist.Pool(nprocs=2, init_timeout=init_timeout, clock=clock))
        return made[-1]

    yield make
    for pool in made:
        pool.close()


def notes(exc: BaseException) -> list[str]:
    return getattr(exc, "__notes__", [])


def posts(launch: FakeLaunch) -> list[str]:
    return [what for _, what in launch.posts]


def test_every_rank_done_gives_rank_0_value(make_pool, launches):
    pool = make_pool(tasks=[{0: [Say("hi\n"), Sleep(1), Done({"loss": 0.1})],
                             1: [Done("rank 1's")]},
                            {0: [Done(7)]}])
    assert pool.run(work, display="none") == {"loss": 0.1}
    assert pool.run(work, display="none") == 7
    assert pool.alive and pool.tasks == 2
    assert len(launches.started) == 1 and posts(launches.last) == ["task", "task"]
    assert nbdist.last_job().status == JobState.SUCCEEDED


def test_return_all_gives_every_rank_value(make_pool):
    pool = make_pool(tasks=[{0: [Done("a")], 1: [Done("b")]}])
    assert pool.run(work, return_all=True, display="none") == ["a", "b"]


def test_a_task_that_raises_on_one_rank_keeps_the_pool_once_healthy(make_pool, launches):
    pool = make_pool(tasks=[{0: [Sleep(1), Done()], 1: [Fail(KeyError("shard 3"))]},
                            {0: [Done("next")]}])
    with pytest.raises(KeyError, match="shard 3") as info:
        pool.run(work, display="none")
    assert pools.KEPT in notes(info.value)
    assert pools.LOST not in notes(info.value)
    assert any("rank 1 of 2" in str(info.value.__cause__) for _ in [0])
    assert posts(launches.last) == ["task", "health"]
    assert pool.alive and launches.last.kills == 0
    job = nbdist.last_job()
    assert job.status == JobState.FAILED
    assert [r.state for r in job.ranks] == [RankState.DONE, RankState.FAILED]
    assert pool.run(work, display="none") == "next"  # the same ranks, still up
    assert len(launches.started) == 1


@pytest.mark.parametrize("health", [
    {1: [Hang("collective")]},  # the process group is broken: the check times out
    {0: [Done(1)]},  # the all_reduce summed the wrong ranks
    {1: [Fail(RuntimeError("Connection closed by peer"))]},
], ids=["stuck", "wrong-sum", "raises"])
def test_a_failed_health_check_tears_the_pool_down(make_pool, launches, health):
    pool = make_pool(tasks=[{1: [Fail(ValueError("bad"))]}], health=health)
    with pytest.raises(ValueError) as info:
        pool.run(work, display="none")
    assert pools.LOST in notes(info.value) and pools.KEPT not in notes(info.value)
    first = launches.last
    assert posts(first) == ["task", "health"]
    assert first.kills >= 1 and not pool.alive
    assert pool.run(work, display="none") is None  # a new pool
    assert len(launches.started) == 2 and launches.last is not first


def test_a_rank_crash_tears_the_pool_down(make_pool, launches):
    pool = make_pool(tasks=[{0: [Say("loading\n"), Sleep(1), Crash(-9)],
                             1: [Hang("collective")]}])
    with pytest.raises(WorkerCrashedError) as info:
        pool.run(work, display="none")
    exc = info.value
    assert exc.rank == 0 and exc.signal_name == "SIGKILL"
    assert "loading" in exc.log_tail
    assert pools.LOST in notes(exc)
    assert not pool.alive and posts(launches.last) == ["task"]  # no health check
    assert pool.run(work, display="none") is None
    assert len(launches.started) == 2


def test_a_rank_that_never_reports_is_interrupted_after_the_grace_and_may_answer(
        make_pool, launches, clock):
    pool = make_pool(tasks=[{0: [Sleep(1), Fail(ValueError("rank 0 broke"))],
                             1: [Hang("user")]}])  # waits for rank 0 in Python code
    with pytest.raises(ValueError, match="rank 0 broke") as info:
        pool.run(work, display="none")
    launch = launches.last
    sigints = [t for t, sig in launch.signals if sig == signal.SIGINT]
    posted, _ = launch.posts[0]
    failed_at = posted + 1
    assert len(sigints) == 1
    assert failed_at + pools.FAILURE_GRACE < sigints[0] <= (
        failed_at + pools.FAILURE_GRACE + 2 * POLL)
    assert pools.KEPT in notes(info.value)
    assert any("also failed after it: rank 1 (KeyboardInterrupt)" in n
               for n in notes(info.value))
    assert pool.alive and posts(launch) == ["task", "health"]


def test_a_rank_stuck_in_a_collective_after_a_failure_costs_the_pool(make_pool, launches,
                                                                      clock):
    pool = make_pool(tasks=[{0: [Fail(ValueError("rank 0 broke"))],
                             1: [Hang("collective")]}])
    with pytest.raises(ValueError) as info:
        pool.run(work, display="none")
    assert pools.LOST in notes(info.value)
    launch = launches.last
    assert [sig for _, sig in launch.signals if sig == signal.SIGINT] == [signal.SIGINT]
    assert posts(launch) == ["task"]  # no health check for a rank that never came back
    assert launch.kills >= 1 and not pool.alive
    assert pool.run(work, display="none") is None and len(launches.started) == 2


def test_an_interrupt_every_rank_answers_keeps_the_pool(make_pool, launches, clock):
    pool = make_pool(tasks=[{0: [Hang("user")], 1: [Hang("user")]}],
                     interrupt_at=clock() + 3)
    with pytest.raises(KeyboardInterrupt) as info:
        pool.run(work, display="none")
    assert any("every rank stopped its task" in n for n in notes(info.value))
    assert pools.LOST not in notes(info.value)
    job = nbdist.last_job()
    assert job.status == JobState.INTERRUPTED
    assert [r.state for r in job.ranks] == [RankState.STOPPED, RankState.STOPPED]
    assert pool.alive and posts(launches.last) == ["task", "health"]
    assert pool.run(work, display="none") is None and len(launches.started) == 1


def test_an_interrupt_not_answered_in_time_tears_the_pool_down_saying_where_ranks_were(
        make_pool, launches, clock):
    pool = make_pool(tasks=[{0: [Hang("collective")], 1: [Hang("user")]}],
                     interrupt_at=clock() + 3)
    with pytest.raises(KeyboardInterrupt) as info:
        pool.run(work, display="none")
    launch = launches.last
    sigint = next(t for t, sig in launch.signals if sig == signal.SIGINT)
    assert sigint == pytest.approx(clock.now - pools.INTERRUPT_GRACE, abs=2 * POLL)
    where = next(n for n in notes(info.value) if "where the ranks were" in n)
    assert "rank 0: waiting in all_reduce" in where
    assert "rank 1: idle, waiting for the next task" in where  # it answered
    assert pools.LOST in notes(info.value)
    assert launch.kills >= 1 and not pool.alive
    assert nbdist.last_job().status == JobState.INTERRUPTED
    assert pool.run(work, display="none") is None and len(launches.started) == 2


def test_a_timeout_tears_the_pool_down(make_pool, launches, clock):
    pool = make_pool(tasks=[{0: [Hang("collective")], 1: [Hang("user")]}])
    with pytest.raises(JobTimeoutError) as info:
        pool.run(work, timeout=5, display="none")
    assert info.value.running_ranks == [0, 1]
    assert "rank 0: waiting in all_reduce" in info.value.stacks
    assert pools.LOST in notes(info.value)
    assert launches.last.kills >= 1 and not pool.alive
    assert nbdist.last_job().status == JobState.TIMEOUT


def test_ranks_that_do_not_join_tear_the_pool_down(make_pool, launches):
    pool = make_pool(init_timeout=10, startup={1: [Started(), Hang("joining")]})
    with pytest.raises(InitTimeoutError) as info:
        pool.run(work, display="none")
    assert info.value.missing_ranks == [1]
    assert pools.LOST in notes(info.value)
    assert posts(launches.last) == []  # the task was never posted
    assert not pool.alive


def test_ranks_lost_between_calls_are_restarted_with_a_warning(make_pool, launches):
    # rank 0 dies a while after its task, while the pool is idle
    pool = make_pool(tasks=[{0: [Done(1), Sleep(10), Crash(-9)]}])
    assert pool.run(work, display="none") == 1
    launches.last.wait(20)  # time passes between the calls
    assert not pool.alive
    with pytest.warns(UserWarning, match="pool's ranks had exited"):
        assert pool.run(work, display="none") is None
    assert len(launches.started) == 2 and pool.alive


def test_status_says_what_the_pool_holds(make_pool):
    pool = make_pool()
    pool.run(work, display="none")
    status = pool.status()
    assert status["alive"] and status["tasks"] == 1 and status["world_size"] == 2
    assert [(r["rank"], r["pid"], r["host"], r["state"]) for r in status["ranks"]] == [
        (0, 40000, "fakehost", RankState.IDLE), (1, 40001, "fakehost", RankState.IDLE)]


def test_close_asks_the_ranks_to_leave_and_removes_the_pool_folder(make_pool, launches):
    pool = make_pool()
    pool.run(work, display="none")
    launch, folder = launches.last, pool.status()["dir"]
    pool.close()
    assert posts(launch) == ["task", "stop"]
    assert launch.poll() == 0  # they left on their own, before any kill
    assert not pool.alive and not os.path.exists(folder)
    pool.close()  # idempotent
    with pytest.raises(nbdist.InvalidArgumentError, match="closed"):
        pool.run(work, display="none")


def test_an_interrupt_while_the_ranks_start_tears_the_pool_down(make_pool, launches, clock):
    pool = make_pool(startup={0: [Started(), Sleep(5), Joined()]}, interrupt_at=clock() + 1)
    with pytest.raises(KeyboardInterrupt) as info:
        pool.run(work, display="none")
    assert pools.LOST in notes(info.value)
    assert launches.last.signals == []  # nothing to ask: no rank serves tasks yet
    assert launches.last.kills >= 1 and not pool.alive


def test_the_view_shows_the_ranks_start_then_the_task(make_pool, monkeypatch):
    views = []

    def create(mode="auto", *, all_ranks=False):
        views.append(RecordingDisplay(all_ranks=all_ranks) if mode == "auto" else Display())
        return views[-1]

    monkeypatch.setattr(nbdist.display, "create", create)
    pool = make_pool(tasks=[{0: [Say("step 1\n"), Sleep(1), Say("step 2\n"), Done(3)]},
                            {0: [Say("again\n"), Done(4)]}])
    assert pool.run(work) == 3
    first = next(v for v in views if isinstance(v, RecordingDisplay))
    job = nbdist.last_job()
    assert first.text(0) == "step 1\nstep 2\n"
    assert [call[0] for call in first.calls if call[0] in ("start", "stop")] == [
        "start", "stop"]
    assert first.of("start") == [(job,)] and first.of("stop") == [(job,)]
    shown = [(e.rank, e.body.state) for (e,) in first.of("event") if e.rank == 0]
    assert shown == [(0, RankState.STARTING), (0, RankState.JOINING), (0, RankState.READY),
                     (0, RankState.RUNNING), (0, RankState.DONE)]
    assert pool.run(work) == 4
    second = [v for v in views if isinstance(v, RecordingDisplay)][1]
    assert second.text(0) == "again\n"  # only this task's output
    assert [(e.rank, e.body.state) for (e,) in second.of("event") if e.rank == 0] == [
        (0, RankState.RUNNING), (0, RankState.DONE)]  # the ranks were up already
