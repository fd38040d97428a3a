"""The job directory: one private folder per job, shared by the caller and its workers.

::

    $NBDIST_HOME/jobs/<job-id>/        (0700, owned by the user)
        spec.json          what the ranks start from (protocol.Spec, by the caller)
        payload.pt         fn, args, kwargs (cloudpickle; inside torch.save with tensors)
        entry.py           the script torchrun starts on every rank (entry_script)
        launcher.log       torchrun's own output
        rank-N.log         everything rank N printed (stdout and stderr, in order)
        events-rank-N.jsonl  status / progress / metrics of rank N   (channel.py)
        bell               a FIFO the ranks ring when ready, done or failed: the caller
                           waits on it
        result-rank-N.pt   index of rank N's result (rank 0 only unless return_all)
        result-rank-N.NAME.pt  one value of it: the return value, or a cell's name
        error-rank-N.pkl   rank N's exception record (protocol.ErrorRecord)
        failures.json      per-rank exit codes as torchrun's agent saw them (RankExit)
        stacks-rank-N.txt  rank N's Python stacks, dumped on SIGUSR1 (rankstacks.py)
        job.json           the final :class:`Job` record
        wake-rank-N        a pool's: the FIFO that brings rank N its tasks
                           (protocol.Post; each task has a job folder of its own)

On a host that runs ranks for a caller elsewhere (``hosts=``, ``slurm=``), the host's
relay keeps its own copy while the job runs, and removes it after::

    $NBDIST_HOME/hosts/<machine>/<job-id>@<host index>/   spec, entry, payload, what
        relay.pid                                its ranks write (mirrored back to the
        modules/<sys.path index>/                caller's folder); the caller's modules
        tasks/<task-id>/                         (shipping.py); a pool's tasks

Every record another process reads is written atomically (temp file, rename; fsynced
where losing it to a crash of the machine would matter), so a reader sees either
nothing or the whole file, never half of it. The entry script is written before
torchrun starts, so nothing reads it half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import Any, Iterator

from nbdist.protocol import Spec

ENV_HOME = "NBDIST_HOME"
JOB_ID = re.compile(r"\d{8}-\d{6}-\d{3}-[0-9a-f]+")  # JobDir.create's ids

# What the ranks write, by how it travels from a host to the caller (launch/relay.py):
# files that grow, the events (sent last), and records written whole, by rename.
# A new per-rank file that the caller reads belongs in one of them.
GROWING = re.compile(r"rank-\d+\.log|stacks-rank-\d+\.txt")
EVENTS = re.compile(r"events-rank-(\d+)\.jsonl")
RECORDS = re.compile(r"result-rank-\d+(\.[\w.-]+)?\.pt|error-rank-\d+\.pkl|failures\.json")
FAILURES = "failures.json"  # every host's agent writes its own ranks': merged (relay.Sink)
PAYLOAD = "payload.pt"  # the one file the caller sends its hosts
LOG = "rank-{}.log"  # by rank: the entry script opens it before Python imports anything
ENTRY = "entry.py"  # the script torchrun runs (rankstacks tells its frames from the user's)
HOST_COPY = re.compile(f"(?:{JOB_ID.pattern})@\\d+")  # a relay's copy of a job (host_copy)


def base_dir() -> Path:
    """The per-user folder holding every job (``$NBDIST_HOME`` or ``~/.cache/nbdist``)."""
    return _private_folder("jobs")


def host_dir() -> Path:
    """On a host that runs ranks for a caller elsewhere: where its copies of that
    caller's job folders live while the job runs (``launch/relay.py``)."""
    return _private_folder("hosts")


def _private_folder(name: str) -> Path:
    home = os.environ.get(ENV_HOME)
    if home:
        root = Path(home).expanduser()
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(cache) / "nbdist"
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_private(folder)
    return folder


def check_private(path: Path) -> None:
    """Refuse a path another user owns or can write: loading from it runs their code."""
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(
            f"{path} belongs to another user (uid {st.st_uid}); nbdist will not load "
            f"pickles from it. Set {ENV_HOME} to a folder of your own.")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            f"{path} is writable by other users; nbdist will not load pickles from it. "
            f"Run `chmod go-w {path}` or set {ENV_HOME} to a private folder.")


@contextlib.contextmanager
def atomic_path(path: Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place.

    The rename alone makes readers on this machine (they share the page cache) see the
    whole file or nothing. ``durable`` also fsyncs it first, so that it survives a crash
    of the machine: worth it for small records, not for bulk data (payload, results),
    where it costs about a second per GiB.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    with atomic_path(path, durable=durable) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def write_json_atomic(path: Path, obj: Any, *, durable: bool = True) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=1).encode(), durable=durable)


_last_ms = 0  # the newest job id's millisecond in this process (JobDir.create)


class JobDir:
    """Paths of one job's folder (the caller creates it, the workers fill it)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def create(cls) -> "JobDir":
        global _last_ms
        jobs = base_dir()
        # sorts by creation time, to the millisecond; unique thanks to the random tail.
        # Two jobs of one process never share a millisecond, so "newest" (jobs(),
        # retention) is never decided by the random tail.
        ms = _last_ms = max(int(time.time() * 1000), _last_ms + 1)
        job_id = (time.strftime("%Y%m%d-%H%M%S", time.localtime(ms / 1000))
                  + f"-{ms % 1000:03d}-{secrets.token_hex(2)}")
        path = jobs / job_id
        path.mkdir(mode=0o700)
        return cls(path)

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def spec(self) -> Path:
        return self.path / "spec.json"

    @property
    def payload(self) -> Path:
        return self.path / PAYLOAD

    @property
    def entry(self) -> Path:
        return self.path / ENTRY

    @property
    def launcher_log(self) -> Path:
        return self.path / "launcher.log"

    @property
    def failures(self) -> Path:
        return self.path / FAILURES

    @property
    def record(self) -> Path:
        return self.path / "job.json"

    @property
    def bell(self) -> Path:
        return self.path / "bell"

    def wake(self, rank: int) -> Path:
        return self.path / f"wake-rank-{rank}"

    def log(self, rank: int) -> Path:
        return self.path / LOG.format(rank)

    def stacks(self, rank: int) -> Path:
        return self.path / f"stacks-rank-{rank}.txt"

    def events(self, rank: int) -> Path:
        return self.path / f"events-rank-{rank}.jsonl"

    def result(self, rank: int) -> Path:
        return self.path / f"result-rank-{rank}.pt"

    def result_part(self, rank: int, name: str) -> Path:
        return self.path / f"result-rank-{rank}.{name.replace(' ', '-')}.pt"

    def error(self, rank: int) -> Path:
        return self.path / f"error-rank-{rank}.pkl"

    def write_spec(self, spec: Spec) -> None:
        """What the ranks start from, and the entry script that applies it."""
        write_bytes_atomic(self.spec, spec.encode(), durable=False)
        self.entry.write_text(entry_script(self, spec))

    def read_spec(self) -> Spec:
        return Spec.decode(self.spec.read_bytes())

    # a relay's copy of a job on its host (``_remote.py``)
    @property
    def relay_pid(self) -> Path:
        """Its relay's pid: a folder whose relay is gone is an orphan."""
        return self.path / "relay.pid"

    @property
    def modules(self) -> Path:
        """The caller's own modules, one folder per ``sys.path`` entry they came from."""
        return self.path / "modules"

    def task_folder(self, task_id: str) -> "JobDir":
        """A pool's task, inside the pool's folder."""
        return JobDir(self.path / "tasks" / task_id)

    def __repr__(self) -> str:
        return f"JobDir({str(self.path)!r})"


def host_copy(job_id: str, index: int) -> str:
    """The folder name of a relay's copy of job ``job_id`` on the ``index``-th host."""
    return f"{job_id}@{index}"


def entry_script(job: JobDir, spec: Spec) -> str:
    """The script torchrun runs on every rank: redirect output, then enter the worker."""
    log_pattern = str(job.path / LOG)
    return f'''\
# Generated by nbdist for job {job.id}: torchrun runs this file on every rank.
import os, sys

# Everything the rank prints, from here on and from C code too, goes to its log file:
# a file never fills up and blocks the rank like a pipe would.
_log = os.open({log_pattern!r}.format(os.environ["RANK"]),
               os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
os.dup2(_log, 1)
os.dup2(_log, 2)
os.close(_log)
# Work like the caller: same working directory, its sys.path first.
try:
    os.chdir({spec.cwd!r})
except OSError as exc:  # another host without the caller's folder
    print(f"[nbdist] cannot enter the caller's working directory here ({{exc}}); "
          f"running in {{os.getcwd()}}", file=sys.stderr, flush=True)
sys.path[:0] = [p for p in {list(spec.sys_path)!r} if p not in sys.path]

from nbdist._worker import main

main({str(job.path)!r})
'''


def size_of(path: Path) -> int:
    """The size of a file another process writes, 0 while it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def tail(path: Path, lines: int = 20, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a text file (empty if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])
