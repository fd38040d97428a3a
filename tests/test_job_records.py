"""What a user reads about past jobs: ``jobs()`` as a table, ``last_job()`` after a
restart, a record at a glance (synthetic records: no launch)."""

from __future__ import annotations

import subprocess
import sys
import time

from helpers import REPO
from nbdist.job import Job, JobList, RankStatus, format_seconds, jobs
from nbdist.jobdir import JobDir


def saved(status: str, states: list[str], *, pool: str | None = None, took: float = 4.2,
          error: str | None = None) -> Job:
    folder = JobDir.create()
    job = Job(id=folder.id, dir=str(folder.path), world_size=len(states), backend="gloo",
              status=status, pool=pool, error=error, started=time.time() - took,
              ranks=[RankStatus(r, state=s) for r, s in enumerate(states)])
    job.ended = job.started + took
    job.save()
    return job


def test_jobs_read_as_a_table_and_a_new_process_finds_the_last_job():
    cold = saved("failed", ["done", "failed"], error="ValueError: bad value")
    task = saved("succeeded", ["done", "done"], pool="20261203-150101-523-9f20", took=0.006)
    stopped = saved("interrupted", ["stopped", "stopped"], pool=task.pool, took=1.25)

    listed = jobs()
    assert isinstance(listed, JobList) and [j.id for j in listed] == [stopped.id, task.id,
                                                                      cold.id]
    lines = repr(listed).splitlines()
    assert lines[0].split() == ["job", "what", "status", "ranks", "took", "error"]
    assert lines[1].split()[:8] == [stopped.id, "task", "of", "pool", task.pool,
                                    "interrupted", "2", "stopped"]
    assert " 6 ms" in lines[2] and "1 done, 1 failed" in lines[3]
    assert lines[3].endswith("ValueError: bad value")
    assert "<table>" in listed._repr_html_() and "task of pool" in listed._repr_html_()
    assert repr(JobList()).startswith("no jobs yet")
    assert repr(cold).startswith(f"<job {cold.id} failed: ValueError: bad value in 4.2 s; "
                                 f"2 ranks (1 done, 1 failed);")

    # a restarted kernel: no job ran in this process, the newest saved one is the last
    out = subprocess.run([sys.executable, "-c", "import nbdist; print(nbdist.last_job().id)"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == stopped.id, out


def test_durations_read_at_a_glance():
    assert [format_seconds(s) for s in (0.0064, 0.5, 4.21, 65, 3725)] == \
        ["6 ms", "500 ms", "4.2 s", "1:05", "1:02:05"]
