"""Where every rank is: each rank's Python stack, on demand or when a job is stuck.

Every rank registers ``faulthandler`` on ``SIGUSR1`` (``_worker.py``): the handler is C
code, so a rank answers even while it waits in C++ (a collective, a queue). The caller
signals each rank, reads what it appended to ``stacks-rank-N.txt``, and tells, per
rank, the user's frames first::

    rank 0: waiting in all_reduce (torch/distributed/distributed_c10d.py:2950), at <nbdist-cell In[5]> line 12
        <nbdist-cell In[5]>, line 12 in <module>:  dist.all_reduce(t)
        + 4 frames of torch, nbdist
    rank 1: at <nbdist-cell In[5]> line 7 in <module>:  time.sleep(60)

Used by timeouts (``JobTimeoutError.stacks``), a pool's interrupt that the ranks do
not answer, and :func:`stacks` (``nbdist.stacks()``, ``%distributed stacks``).
"""

from __future__ import annotations

import contextlib
import linecache
import os
import re
import signal
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from nbdist.jobdir import ENTRY, HOST_COPY, JOB_ID, size_of
from nbdist.session import SESSION

SIGNAL = signal.SIGUSR1
DUMP_WAIT = 1.0  # seconds the ranks get to write their stacks
# a job's folder, or a relay's copy of it on a host
_JOB_FOLDER = re.compile(f"{JOB_ID.pattern}|{HOST_COPY.pattern}")
_FRAME = re.compile(r'^\s+File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<fn>.+)$')
_LIBRARY_DIRS = tuple({os.path.realpath(p) + os.sep for p in (
    sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
    sysconfig.get_paths()["platlib"], os.path.dirname(os.path.abspath(__file__)))})


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    function: str

    @property
    def user(self) -> bool:
        """The user's code (a cell, a notebook function, their modules), not a library's."""
        if self.file.startswith("<"):
            return self.file.startswith("<nbdist-cell")
        path = Path(self.file)
        if path.name == ENTRY and _JOB_FOLDER.fullmatch(path.parent.name):
            return False  # the script nbdist generated for the job (here, or on a host)
        return not os.path.realpath(path).startswith(_LIBRARY_DIRS)

    @property
    def where(self) -> str:
        return f"{self.file} line {self.line} in {self.function}"

    def source(self) -> str:
        return linecache.getline(self.file, self.line).strip()


def collect(launch) -> dict[int, str]:
    """Signal the launch's ranks and return what each dumped, as text."""
    # on another host, the dump reaches the caller's file through the host's relay
    files = {r: launch.job.stacks(r) for r in launch.live_ranks()}
    offsets = {r: size_of(path) for r, path in files.items()}
    launch.signal(SIGNAL)
    deadline = time.monotonic() + DUMP_WAIT
    sizes: dict[int, int] = {}
    while time.monotonic() < deadline:  # until every file grew and stopped growing
        time.sleep(0.05)
        now = {r: size_of(path) for r, path in files.items()}
        if now == sizes and all(now[r] > offsets[r] for r in files):
            break
        sizes = now
    found = {}
    for rank, path in files.items():
        with contextlib.suppress(OSError), open(path, "rb") as f:
            f.seek(offsets[rank])
            found[rank] = f.read().decode("utf-8", errors="replace")
    return found


def main_thread(dump: str) -> list[Frame]:
    """The frames of the rank's main thread (the one that ran the entry script),
    innermost first, from one faulthandler dump."""
    threads = [[Frame(m["file"], int(m["line"]), m["fn"]) for m in map(_FRAME.match, block)
                if m] for block in _blocks(dump)]
    for frames in threads:
        if frames and frames[-1].file.endswith(ENTRY):
            return frames
    return threads[0] if threads else []


def _blocks(dump: str) -> list[list[str]]:
    blocks: list[list[str]] = []
    for line in dump.splitlines():
        if "thread 0x" in line.lower() or line.startswith("Stack (most recent"):
            blocks.append([])
        elif blocks:
            blocks[-1].append(line)
    return blocks


def summary(frames: list[Frame]) -> str:
    """``waiting in all_reduce (...), at <nbdist-cell In[5]> line 12``."""
    if not frames:
        return "no stack (the rank did not answer)"
    user = [f for f in frames if f.user]
    inner = frames[0]
    if not user:
        if inner.function == "_serve_pool":
            return "idle, waiting for the next task"
        return f"in {inner.function} ({_short(inner.file)}:{inner.line}), before the user's code"
    if inner.user:
        return f"at {inner.where}"
    return f"waiting in {inner.function} ({_short(inner.file)}:{inner.line}), at {user[0].where}"


def in_collective(frames: list[Frame]) -> bool:
    """The rank waits in torch.distributed (a collective) or in a DDP backward pass."""
    inner = next((f for f in frames if not f.file.endswith(("threading.py", "queue.py"))),
                 None)
    return inner is not None and not inner.user and any(
        part in inner.file for part in ("torch/distributed/", "torch/autograd/"))


def report(dumps: dict[int, str]) -> str:
    """Every rank's place, the user's frames first, then how many library frames."""
    lines = []
    for rank in sorted(dumps):
        frames = main_thread(dumps[rank])
        lines.append(f"rank {rank}: {summary(frames)}")
        for frame in (f for f in frames if f.user):
            text = frame.source()
            lines.append(f"    {frame.file}, line {frame.line} in {frame.function}"
                         + (f":  {text}" if text else ""))
        libraries = sorted({_package(f.file) for f in frames if not f.user})
        if libraries:
            lines.append(f"    + {sum(not f.user for f in frames)} frames of "
                         f"{', '.join(libraries)}")
    return "\n".join(lines)


def _short(path: str) -> str:
    parts = Path(path).parts
    for anchor in ("site-packages", "nbdist"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + (anchor == "site-packages"):])
    return Path(path).name


def _package(path: str) -> str:
    """``torch``, ``nbdist``, ``threading``...: what a library frame belongs to."""
    if Path(path).name == ENTRY:  # not a user frame: the job's generated script
        return "nbdist"
    return _short(path).split("/")[0].removesuffix(".py") or "python"


def stacks() -> str:
    """Where every rank of the job running now (or of this process's pools) is.

    Example, from a thread while a job runs, or ``%distributed stacks``::

        print(nbdist.stacks())
    """
    launches = SESSION.running()
    if not launches:
        return "[nbdist] no job or pool is running in this process"
    return "\n".join(report(collect(launch)) for launch in launches)
