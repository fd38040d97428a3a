"""Issue 6 hardening: interrupts in every phase, retention, privacy, soak, floods of output."""

from __future__ import annotations

import json
import os
import threading
import time
import _thread

import psutil
import pytest
import torch

import nbdist
from conftest import wait_gone
from helpers import agents, job_dirs, rank_states, run_script, worker_pids
from nbdist import payload
from nbdist.job import Job, RankStatus, prune_jobs
from nbdist.jobdir import JobDir
from test_failures import StallWhenUnpickled, noop


class InterruptWhilePacking:
    def __reduce__(self):
        raise KeyboardInterrupt  # as if the user pressed stop while pickling


def _interrupt_in_caller():
    if "RANK" not in os.environ:  # only when the caller unpickles the result
        raise KeyboardInterrupt
    return None


class InterruptWhileCollecting:
    def __reduce__(self):
        return (_interrupt_in_caller, ())


def return_interrupting_result():
    return InterruptWhileCollecting()


def _job_processes() -> list[int]:
    return [p.pid for p in psutil.Process().children(recursive=True)]


def _interrupt_when(home: str, phase: str, seen: list[int], when: list[float]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if phase in ("starting", "writing") and agents():
            break
        if phase == "init" and job_dirs(home) and any(
                s["state"] == "joining" for s in rank_states(job_dirs(home)[-1]).values()):
            break
        time.sleep(0.01)
    seen.extend(_job_processes())
    if job_dirs(home):
        seen.extend(worker_pids(job_dirs(home)[-1]))
    when.append(time.monotonic())
    _thread.interrupt_main()


PHASES = {
    # phase: (fn, args, interrupted from a thread?)
    "packing": (noop, (InterruptWhilePacking(),), False),
    "starting": (noop, (), True),
    # torchrun starts while the tensors' bytes are still written (64 of them: the
    # interrupt lands between two)
    "writing": (noop, ([torch.zeros(1 << 20) for _ in range(64)],), True),
    "init": (lambda x: None, (StallWhenUnpickled("RANK", "1"),), True),
    "collecting": (return_interrupting_result, (), False),
}


@pytest.mark.slow
def test_interrupt_in_every_phase_leaves_nothing(nbdist_home, record_property):
    """Stop pressed while packing, starting, joining and collecting (running: see
    test_failures): KeyboardInterrupt, every process gone within 2 s, next run works."""
    for phase, (fn, args, from_thread) in PHASES.items():
        seen: list[int] = []
        when: list[float] = []
        if from_thread:
            threading.Thread(target=_interrupt_when,
                             args=(nbdist_home, phase, seen, when), daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            nbdist.run_distributed(fn, *args, nprocs=2, display="none")
        interrupted = when[0] if when else time.monotonic()
        seen.extend(_job_processes())
        if phase in ("starting", "writing"):
            assert seen, "the interrupt came before torchrun started"
        wait_gone(seen, 5)
        gone = time.monotonic() - interrupted
        record_property(f"seconds_until_all_gone_{phase}", round(gone, 2))
        assert gone <= 2.0, phase
    assert nbdist.run_distributed(noop, nprocs=2, display="none") == "ok"


def flood(lines):
    import sys

    for i in range(lines):
        sys.stdout.write(f"line {i}\n")
    sys.stdout.flush()
    os.write(1, bytes(range(256)) * 4 + b"\n")  # binary garbage, not UTF-8
    print("x" * 1_000_000)  # one very long line
    print("the end")
    return lines


@pytest.mark.slow
def test_a_flood_of_output_is_delivered_whole_and_logged(capfd, record_property):
    lines = 1_000_000
    started = time.monotonic()
    assert nbdist.run_distributed(flood, lines, nprocs=2) == lines
    record_property("seconds_total", round(time.monotonic() - started, 2))
    out = capfd.readouterr().out.split("\n")
    got = [line for line in out if line.startswith("line ")]
    assert len(got) == lines and got[0] == "line 0" and got[-1] == f"line {lines - 1}"
    assert "x" * 1_000_000 in out and "the end" in out
    log = open(nbdist.last_job().ranks[0].log, "rb").read()
    assert bytes(range(256)) * 4 in log  # the log file keeps the exact bytes


@pytest.mark.slow
def test_back_to_back_jobs_do_not_leak(record_property):
    """Jobs run in a fresh Python of their own: in this one, what earlier tests left
    behind (a kernel client's sockets, an IPython shell's threads) opens and closes fds
    at times of its own, and a count would blame nbdist for it."""
    runs = int(os.environ.get("NBDIST_SOAK_JOBS", "6"))
    proc = run_script(f"""
        import json, sys
        sys.path.insert(0, "tests")
        import nbdist
        from helpers import Usage
        from test_failures import noop

        nbdist.run_distributed(noop, nprocs=2, display="none")  # warm-up: imports, caches
        before = Usage.now()
        for _ in range({runs}):
            assert nbdist.run_distributed(noop, nprocs=2, display="none") == "ok"
        after = Usage.now()
        print(json.dumps([len(after.fds) - len(before.fds), after.threads - before.threads,
                          (after.rss - before.rss) / 2**20, after.grown_since(before)]))
    """, timeout=60 + 30 * runs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fds, threads, grown_mib, grown = json.loads(proc.stdout.splitlines()[-1])
    record_property("growth_fds_threads_rss_mib", (fds, threads, round(grown_mib, 1)))
    assert not grown, grown  # fds, threads or processes that outlived their job
    assert grown_mib < 30, f"RSS grew by {grown_mib:.1f} MiB"


@pytest.mark.slow
def test_large_payload_warns(monkeypatch):
    monkeypatch.setattr(payload, "LARGE_PAYLOAD_BYTES", 1 << 20)
    with pytest.warns(UserWarning, match="loading large data inside the function"):
        nbdist.run_distributed(torch.numel, torch.zeros(1 << 19), nprocs=1, display="none")


def test_payload_hook_runs_once_after_pickling_and_before_the_file_exists(tmp_path):
    path = tmp_path / "payload.pt"
    calls = []
    size = payload.dump((noop, (torch.ones(3),), {}), path,
                        on_pickled=lambda: calls.append(path.exists()))
    assert calls == [False] and size == path.stat().st_size
    assert torch.equal(payload.load(path)[1][0], torch.ones(3))
    with pytest.raises(TypeError, match="pickle"):
        payload.dump(threading.Lock(), path, on_pickled=lambda: calls.append("late"))
    assert calls == [False]


def _fake_job(status: str, loaded: bool, result: bool = True) -> Job:
    job_dir = JobDir.create()
    job = Job(id=job_dir.id, dir=str(job_dir.path), world_size=1, backend="gloo",
              status=status, result_loaded=loaded, ranks=[RankStatus(0)])
    if result:
        payload.dump({"w": torch.ones(2)}, job_dir.result(0))
    job.save()
    return job


def test_job_ids_sort_in_creation_order_even_within_a_millisecond():
    ids = [JobDir.create().id for _ in range(50)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_retention_keeps_recent_jobs_and_unloaded_results():
    unloaded = _fake_job("succeeded", loaded=False)
    old = [_fake_job("succeeded", loaded=True) for _ in range(3)] + [
        _fake_job("failed", loaded=False, result=False)]
    recent = [_fake_job("succeeded", loaded=True) for _ in range(2)]
    deleted = prune_jobs(keep=2)
    assert sorted(deleted) == sorted(j.dir for j in old)
    # newest first
    assert [j.id for j in nbdist.jobs()] == [j.id for j in reversed(recent)] + [unloaded.id]
    assert torch.equal(nbdist.load_result(unloaded.dir)["w"], torch.ones(2))
    assert Job.load(unloaded.dir).result_loaded  # loaded now: the next prune may drop it


def test_refuses_to_unpickle_from_folders_others_can_write():
    job = _fake_job("succeeded", loaded=False)
    os.chmod(job.dir, 0o777)
    with pytest.raises(PermissionError, match="writable by other users"):
        nbdist.load_result(job.dir)
    os.chmod(job.dir, 0o700)
    os.chmod(JobDir(job.dir).result(0), 0o666)
    with pytest.raises(PermissionError, match="chmod go-w"):
        nbdist.load_result(job.dir)
