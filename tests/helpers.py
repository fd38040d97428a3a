"""Small helpers the tests share: waiting on job state from outside, child scripts."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from nbdist.jobdir import EVENTS
from nbdist.protocol import Status, decode_event

from conftest import kill_caller

REPO = Path(__file__).resolve().parents[1]


def job_dirs(home: str) -> list[Path]:
    jobs = Path(home) / "jobs"
    return sorted(jobs.iterdir()) if jobs.exists() else []


def rank_states(job_dir: Path) -> dict[int, dict]:
    """Latest status of each rank of a job (state, and pid and host from its first
    event), read from its events files as the caller does."""
    states: dict[int, dict] = {}
    for path in job_dir.iterdir():
        found = EVENTS.fullmatch(path.name)
        if not found:
            continue
        rank = int(found.group(1))
        for line in path.read_bytes().splitlines():
            event = decode_event(rank, line)
            if event is not None and isinstance(event.body, Status):
                fields = {k: v for k, v in vars(event.body).items() if v is not None}
                states[rank] = {**states.get(rank, {}), **fields}
    return states


def wait_for_ranks(home: str, state: str, nprocs: int, timeout: float = 60) -> Path:
    """Wait until every rank of the newest job reached ``state``; return the job dir."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dirs = job_dirs(home)
        if dirs:
            states = rank_states(dirs[-1])
            if len(states) == nprocs and all(s["state"] == state for s in states.values()):
                return dirs[-1]
        time.sleep(0.05)
    raise TimeoutError(f"ranks did not reach {state!r} in {timeout}s")


def worker_pids(job_dir: Path) -> list[int]:
    return [s["pid"] for s in rank_states(job_dir).values()]


def kill_caller_once_running(caller: subprocess.Popen, home: str, nranks: int,
                             record_property) -> float:
    """SIGKILL a caller script once its job's ``nranks`` ranks run (as a dead kernel);
    seconds until those ranks are gone."""
    try:
        job_dir = wait_for_ranks(home, "running", nranks)
        return kill_caller(caller, worker_pids(job_dir), record_property)
    finally:
        caller.kill()
        caller.wait()


def agents() -> list[psutil.Process]:
    """This process's torchrun agents (``nbdist._agent``) now."""
    return [child for child in psutil.Process().children()
            if "nbdist._agent" in " ".join(_cmdline(child))]


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:  # a child that just ended (a zombie, or gone)
        return []


def start_script(code: str, **popen) -> subprocess.Popen:
    """Run ``code`` as a __main__ script in a child Python, from the repo root."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                            env={**os.environ}, **popen)


def run_script(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = start_script(code, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@dataclass
class Usage:
    """What this process holds: open fds (by what they point at), threads, child
    processes and RSS; ``grown_since`` names what is new, so a leak says what leaked."""

    fds: dict[int, str]
    threads: int  # the OS's count: torch's and zmq's threads too
    named: dict[int, str]  # Python's threads, by ident
    children: list[str]
    rss: int

    @classmethod
    def now(cls) -> Usage:
        gc.collect()  # objects of earlier tests may still hold fds: count only live ones
        fds = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # the fd listdir itself used, closed since
                pass
        me = psutil.Process()
        children = [" ".join(_cmdline(p)[:4]) for p in me.children(recursive=True)]
        return cls(fds, me.num_threads(), {t.ident: t.name for t in threading.enumerate()},
                   children, me.memory_info().rss)

    def grown_since(self, before: Usage) -> list[str]:
        grown = []
        if len(self.fds) > len(before.fds):
            grown += [f"fd {fd} -> {target}" for fd, target in self.fds.items()
                      if before.fds.get(fd) != target]
        if self.threads > before.threads:
            grown += [f"{self.threads - before.threads} more threads, Python's new ones: "
                      f"{[n for i, n in self.named.items() if i not in before.named]}"]
        return grown + [f"process {c}" for c in self.children if c not in before.children]
