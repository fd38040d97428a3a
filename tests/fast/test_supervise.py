"""The supervision loop's rules, with scripted ranks on a fake clock (fakes.py)."""

from __future__ import annotations

import signal

import pytest

from nbdist.errors import InitTimeoutError, JobTimeoutError
from nbdist.protocol import Progress, Status
from nbdist.states import EventKind, JobState, RankState
from nbdist.supervise import POLL, Limits, Supervisor, TaskOver, ranks_ready

from .fakes import (Crash, Done, Emit, FakeClock, FakeLaunch, Fail, Hang, RecordingDisplay,
                    Say, Sleep, Started, make_job, make_spec)


@pytest.fixture
def clock():
    return FakeClock()


def cold_job(clock, *, all_ranks=False, limits=Limits(), world_size=2, **script):
    """A cold job's launch, record, display and supervisor, nothing played yet."""
    folder, job = make_job(world_size)
    launch = FakeLaunch(folder, make_spec(world_size), clock, **script)
    view = RecordingDisplay(all_ranks=all_ranks)
    return launch, job, view, Supervisor(launch, job, view, limits, clock=clock)


def statuses(view, rank):
    return [e.body.state for (e,) in view.of("event")
            if e.rank == rank and e.kind == EventKind.STATUS]


# --- a job that ends -------------------------------------------------------------------
def test_the_launch_exit_code_is_returned_and_events_are_folded_into_the_record(
        clock):
    launch, job, view, watch = cold_job(clock, tasks=[{
        0: [Say("hello from 0\n"), Sleep(1), Done(42)],
        1: [Say("hello from 1\n"), Sleep(2), Done()]}])
    assert watch.follow() == 0
    assert 2 <= clock() - launch.started_at <= 2 + 2 * POLL
    for rank in job.ranks:
        assert (rank.state, rank.pid, rank.host, rank.exitcode) == (
            RankState.DONE, 40000 + rank.rank, "fakehost", 0)
    expected = [RankState.STARTING, RankState.JOINING, RankState.READY, RankState.RUNNING,
                RankState.DONE]
    assert statuses(view, 0) == expected and statuses(view, 1) == expected
    assert launch.kills == 0


def test_a_failed_rank_is_folded_with_its_exit_code_and_error(clock):
    launch, job, view, watch = cold_job(clock, tasks=[{
        1: [Sleep(1), Fail(ValueError("bad shard"))], 0: [Hang("collective")]}])
    assert watch.follow() == 1  # torchrun's exit code: it tore the job down
    failed = job.ranks[1]
    assert (failed.state, failed.exitcode, failed.error) == (RankState.FAILED, 1, "ValueError")
    assert job.ranks[0].state == RankState.RUNNING  # no outcome: diagnose says killed


def test_events_reach_the_view_in_the_order_each_rank_wrote_them(clock):
    bars = [Emit(Progress(bar=0, n=n, total=5)) for n in range(5)]
    launch, job, view, watch = cold_job(clock, tasks=[{
        0: [b for step in bars for b in (step, Sleep(0.01))] + [Done()],
        1: [*bars, Done()]}])
    watch.follow()
    for rank in (0, 1):
        seen = [e.body.n for (e,) in view.of("event")
                if e.rank == rank and e.kind == EventKind.PROGRESS]
        assert seen == [0, 1, 2, 3, 4]
    times = [e.time for (e,) in view.of("event")]
    assert times == sorted(times)  # the ranks interleaved by time


def test_rank_0_output_reaches_the_view_and_other_ranks_stay_in_their_logs(clock):
    launch, job, view, watch = cold_job(clock, tasks=[{
        0: [Say("epoch 1\n"), Sleep(1), Say("epoch 2\r"), Say("done\n"), Done()],
        1: [Say("rank 1 talks\n"), Done()]}])
    watch.follow()
    assert view.text(0) == "epoch 1\nepoch 2\rdone\n"
    assert view.text(1) == ""
    assert job.log(1) == "rank 1 talks\n"


def test_every_rank_output_reaches_the_view_with_all_ranks(clock):
    launch, job, view, watch = cold_job(clock, all_ranks=True, tasks=[{
        0: [Say("zero\n"), Done()], 1: [Say("one\n"), Done()]}])
    watch.follow()
    assert (view.text(0), view.text(1)) == ("zero\n", "one\n")


# --- deadlines -------------------------------------------------------------------------
def test_timeout_kills_and_names_the_running_ranks_with_their_stacks(clock):
    launch, job, view, watch = cold_job(clock, limits=Limits(timeout=10), tasks=[{
        0: [Say("stuck?\n"), Hang("collective")], 1: [Sleep(1), Hang("user")]}])
    with pytest.raises(JobTimeoutError) as info:
        watch.follow()
    exc = info.value
    assert 10 < clock() - launch.started_at <= 10 + 2 * POLL
    assert exc.running_ranks == [0, 1] and exc.timeout == 10
    assert "ranks still running: [0, 1]" in str(exc)
    assert "rank 0: waiting in all_reduce (torch/distributed/distributed_c10d.py:2950)" \
        in exc.stacks
    assert "rank 1: at <nbdist-cell In[3]> line 7 in <module>" in exc.stacks
    assert "Where each rank was:\n" + exc.stacks in str(exc)
    assert "--- rank 0 ---\nstuck?" in str(exc)  # their last log lines
    assert launch.kills == 1 and launch.poll() is not None
    assert launch.signals[0][1] == signal.SIGUSR1  # the stacks, before the kill
    assert job.status == JobState.TIMEOUT


def test_timeout_names_only_the_ranks_still_running(clock):
    launch, job, view, watch = cold_job(clock, limits=Limits(timeout=5), tasks=[{
        0: [Done(1)], 1: [Hang("collective")]}])
    with pytest.raises(JobTimeoutError) as info:
        watch.follow()
    assert info.value.running_ranks == [1]
    assert "rank 0" not in info.value.stacks  # it had exited: nothing to signal


def test_init_timeout_names_the_ranks_that_did_not_join(clock):
    launch, job, view, watch = cold_job(
        clock, world_size=3, limits=Limits(init_timeout=30, timeout=100),
        startup={1: [Started(), Hang("joining")], 2: [Hang("joining")]})
    with pytest.raises(InitTimeoutError) as info:
        watch.follow()
    exc = info.value
    assert 30 < clock() - launch.started_at <= 30 + 2 * POLL
    assert exc.missing_ranks == [1, 2]
    assert "ranks [1, 2] did not join the process group within init_timeout=30s " \
           "(joined: [0])" in str(exc)
    assert "rank 1: in _create_c10d_store (torch/distributed/rendezvous.py:189), before " \
           "the user's code" in exc.stacks
    assert launch.kills == 1 and job.status == JobState.TIMEOUT


def test_init_timeout_does_not_apply_once_every_rank_joined(clock):
    launch, job, view, watch = cold_job(clock, limits=Limits(init_timeout=1),
                                        tasks=[{0: [Sleep(5), Done()]}])
    assert watch.follow() == 0


# --- stalls ----------------------------------------------------------------------------
def stall_notices(view):
    return [text for (text,) in view.of("notice") if "no rank has made progress" in text]


def test_a_stall_with_a_rank_in_a_collective_warns_once_with_the_stacks_and_goes_on(
        clock):
    launch, job, view, watch = cold_job(clock, limits=Limits(stall_warning=5),
                                        tasks=[{0: [Hang("collective")], 1: [Hang("user")]}])
    assert watch.follow(lambda job, now: now - launch.started_at > 30) is None
    notices = stall_notices(view)
    assert len(notices) == 1
    assert "rank(s) 0 wait in a collective" in notices[0]
    assert "rank 0: waiting in all_reduce" in notices[0]
    assert "rank 1: at <nbdist-cell In[3]> line 7" in notices[0]
    assert launch.kills == 0 and launch.poll() is None  # the job goes on


def test_no_stall_warning_when_no_rank_waits_in_a_collective(clock):
    launch, job, view, watch = cold_job(clock, limits=Limits(stall_warning=5),
                                        tasks=[{0: [Hang("user")], 1: [Hang("user")]}])
    watch.follow(lambda job, now: now - launch.started_at > 30)
    assert stall_notices(view) == []
    # it looked again every stall_warning seconds, not at every poll
    looks = [t for t, sig in launch.signals if sig == signal.SIGUSR1]
    assert 4 <= len(looks) <= 6


def test_progress_keeps_the_stall_warning_quiet(clock):
    ticking = [step for n in range(20) for step in (Sleep(2), Emit(Progress(bar=0, n=n)))]
    launch, job, view, watch = cold_job(clock, limits=Limits(stall_warning=5),
                                        tasks=[{0: [Hang("collective")], 1: ticking}])
    watch.follow(lambda job, now: now - launch.started_at > 30)
    assert stall_notices(view) == []
    assert launch.signals == []  # never quiet for long enough to look


def test_output_counts_as_progress(clock):
    talking = [step for n in range(20) for step in (Sleep(2), Say(f"step {n}\n"))]
    launch, job, view, watch = cold_job(clock, limits=Limits(stall_warning=5),
                                        tasks=[{0: talking, 1: [Hang("collective")]}])
    watch.follow(lambda job, now: now - launch.started_at > 30)
    assert stall_notices(view) == []


# --- interrupts and goals ----------------------------------------------------------------
def test_a_keyboard_interrupt_from_wait_leaves_follow_as_it_came(clock):
    launch, job, view, watch = cold_job(clock, interrupt_at=clock() + 3,
                                        tasks=[{0: [Hang("user")], 1: [Hang("user")]}])
    with pytest.raises(KeyboardInterrupt):
        watch.follow()
    assert launch.kills == 0 and launch.signals == []  # what it means is the owner's call
    assert job.status == JobState.RUNNING


def pool_launch(clock, **script):
    pool, record = make_job()
    launch = FakeLaunch(pool, make_spec(pool=True), clock, **script)
    return launch, record


def test_ranks_ready_ends_follow_once_every_rank_joined(clock):
    launch, record = pool_launch(clock, startup={
        0: [Started(), Sleep(1), *[Emit(Status(s)) for s in (RankState.JOINING,
                                                              RankState.READY)]]})
    view = RecordingDisplay()
    assert Supervisor(launch, record, view, clock=clock).follow(ranks_ready) is None
    assert [r.state for r in record.ranks] == [RankState.READY, RankState.READY]
    assert 1 <= clock() - launch.started_at <= 1 + 2 * POLL
    assert launch.poll() is None


@pytest.mark.parametrize("grace", [0.5, 4.0])
def test_task_over_ends_grace_seconds_after_the_first_failure(clock, grace):
    launch, record = pool_launch(clock, tasks=[{
        0: [Sleep(1), Fail(ValueError("bad"))], 1: [Hang("collective")]}])
    Supervisor(launch, record, RecordingDisplay(), clock=clock).follow(ranks_ready)
    task, job = make_job()
    launch.post(task, False)
    posted = clock()
    assert Supervisor(launch, job, RecordingDisplay(), clock=clock).follow(
        TaskOver(grace)) is None
    assert [r.state for r in job.ranks] == [RankState.FAILED, RankState.RUNNING]
    failed_at = posted + 1
    assert failed_at + grace < clock() <= failed_at + grace + 2 * POLL


def test_task_over_ends_at_once_when_every_rank_reported(clock):
    launch, record = pool_launch(clock, tasks=[{
        0: [Sleep(1), Fail(ValueError("bad"))], 1: [Sleep(1.5), Done()]}])
    Supervisor(launch, record, RecordingDisplay(), clock=clock).follow(ranks_ready)
    task, job = make_job()
    launch.post(task, False)
    posted = clock()
    Supervisor(launch, job, RecordingDisplay(), clock=clock).follow(TaskOver(60))
    assert clock() - posted <= 1.5 + 2 * POLL
    assert [r.state for r in job.ranks] == [RankState.FAILED, RankState.DONE]


def test_a_crash_ends_follow_with_the_launch_exit_code(clock):
    launch, record = pool_launch(clock, tasks=[{0: [Sleep(1), Crash(-9)],
                                                          1: [Hang("collective")]}])
    Supervisor(launch, record, RecordingDisplay(), clock=clock).follow(ranks_ready)
    task, job = make_job()
    launch.post(task, False)
    assert Supervisor(launch, job, RecordingDisplay(), clock=clock).follow(TaskOver(2)) == 1


def test_launch_notices_reach_the_view(clock):
    launch, job, view, watch = cold_job(clock)
    launch.notices.append("waiting for a Slurm allocation")
    watch.follow()
    assert view.of("notice") == [("waiting for a Slurm allocation",)]
