"""Shared fixtures: a private NBDIST_HOME per test, and the no-leftover-process check.

Every test runs with ``NBDIST_HOME`` pointing into its own temporary folder. All job
files — and so every rank's command line, which names its ``entry.py`` — live under it,
so after the test any process whose command line mentions that folder is a leftover,
even one that was orphaned and re-parented away from us.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest

LEFTOVER_GRACE = 10.0  # seconds a test's processes get to disappear after it ends


def processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(text in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def leftovers(home: str, own_children_before: set[int]) -> list[psutil.Process]:
    """Our new children, and any process naming the test's folder or one of its jobs:
    on the test "hosts" (sshd, slurmd) a job's relay and ranks run in folders of their
    own, named by the job's id."""
    me = psutil.Process()
    children = [c for c in me.children(recursive=True)
                if c.pid not in own_children_before and c.status() != psutil.STATUS_ZOMBIE]
    found = children + processes_mentioning(home)
    jobs = os.path.join(home, "jobs")
    for job_id in os.listdir(jobs) if os.path.isdir(jobs) else ():
        found += processes_mentioning(job_id)
    return list({p.pid: p for p in found}.values())


@pytest.fixture(autouse=True)
def nbdist_home(tmp_path, monkeypatch):
    """A private job folder for this test; fails the test if it leaves processes behind."""
    home = str(tmp_path / "nbdist-home")
    monkeypatch.setenv("NBDIST_HOME", home)
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    yield home
    deadline = time.monotonic() + LEFTOVER_GRACE
    left = leftovers(home, before)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = leftovers(home, before)
    for proc in left:  # clean up for the next test, but still fail this one
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()) for p in left if p.is_running()]}"


def wait_gone(pids, timeout: float) -> float:
    """Wait until none of ``pids`` is alive (zombies count as gone); return seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not any(_alive(pid) for pid in pids):
            break
        time.sleep(0.02)
    return time.monotonic() - start


def kill_caller(caller, pids, record_property) -> float:
    """SIGKILL a caller script (as a dead kernel); seconds until its ``pids`` are gone."""
    caller.kill()
    caller.wait()
    gone = wait_gone(pids, 10)
    record_property("seconds_until_all_gone", round(gone, 2))
    return gone


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
