"""The record of a job — what ran, how each rank ended — and what went wrong, if anything.

A :class:`Job` is kept in memory while the job runs, saved as ``job.json`` in its
directory at the end, and read back by :func:`nbdist.jobs` / :func:`nbdist.load_result`
after a kernel restart.

:func:`diagnose` turns the evidence left in the job directory (error records written by
ranks, exit codes recorded by torchrun's agent, logs) into the one exception the user
sees: the *root cause*. A rank's own exception outranks a crash reported by the agent,
which outranks a communication error (a peer's death seen from the other side: gloo's
"Connection closed by peer", NCCL's, a ``DistError``, whatever its Python type), which
outranks a rank torchrun terminated while tearing the job down. Within a kind, the
first in time wins.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from nbdist import payload
from nbdist.errors import (LaunchError, PicklingError, RemoteError, RemoteTraceback,
                           WorkerCrashedError)
from nbdist.jobdir import JobDir, base_dir, check_private, tail, write_json_atomic
from nbdist.protocol import ErrorRecord, RankExit, decode_exits
from nbdist.states import FINAL, JobState, RankState

LOG_TAIL_LINES = 20
ENV_KEEP = "NBDIST_KEEP_JOBS"
DEFAULT_KEEP = 50
STALE_UNFINISHED = 7 * 24 * 3600  # a folder without job.json this old is a dead caller's
PRUNE_EVERY = 16  # pool tasks between two prunes of one process's
_calls = 0  # prune_now_and_then's, in this process


@dataclass
class RankStatus:
    rank: int
    state: RankState = RankState.PENDING
    pid: int | None = None
    host: str | None = None
    exitcode: int | None = None
    log: str = ""  # path of the rank's log file
    error: str | None = None  # the type name of the exception it reported, if any

    @property
    def signal_name(self) -> str | None:
        return _signal_name(self.exitcode)


@dataclass
class Job:
    """What nbdist knows about one job. ``nbdist.last_job()`` returns the latest."""

    id: str
    dir: str
    world_size: int  # ranks in all (hosts x ranks per host)
    backend: str
    return_all: bool = False
    status: JobState = JobState.RUNNING
    started: float = field(default_factory=time.time)
    ended: float | None = None
    ranks: list[RankStatus] = field(default_factory=list)
    error: str | None = None  # one line: the exception the caller saw
    result_loaded: bool = False
    pool: str | None = None  # the pool's id, for a task of a warm pool
    # the hosts the ranks run on, as the caller named them (None: this machine only);
    # which rank landed on which host each rank reports (RankStatus.host)
    hosts: list[str] | None = None

    def take_result(self) -> Any:
        """The value the caller returns: rank 0's, or every rank's with ``return_all``."""
        ranks = list(range(self.world_size)) if self.return_all else [0]
        values = read_results(JobDir(self.dir), ranks)
        self.status = JobState.SUCCEEDED
        self.result_loaded = True
        return values if self.return_all else values[0]

    def fail(self, exc: BaseException) -> None:
        """Record the exception the caller is about to see."""
        if self.status == JobState.RUNNING:
            self.status = JobState.FAILED
        self.error = f"{type(exc).__name__}: {exc}".splitlines()[0]

    def mark_stopped(self) -> None:
        """Once its processes are gone: a rank that had not finished was killed; after
        an interrupt, one that stopped with the ``KeyboardInterrupt`` was stopped."""
        for rank in self.ranks:
            if rank.state not in (RankState.PENDING, *FINAL):
                rank.state = RankState.KILLED
            elif (self.status == JobState.INTERRUPTED and rank.state == RankState.FAILED
                    and rank.error == "KeyboardInterrupt"):
                rank.state = RankState.STOPPED

    @property
    def duration(self) -> float:
        return (self.ended or time.time()) - self.started

    def log(self, rank: int = 0) -> str:
        """Everything rank ``rank`` printed."""
        path = Path(self.ranks[rank].log)
        return path.read_text(errors="replace") if path.exists() else ""

    def save(self) -> None:
        # not fsynced: a record, not a result (whose loss a crash of the machine costs
        # as much); an fsync was most of a warm task's time
        # vars, not dataclasses.asdict: its deep copy was a tenth of a warm task's time
        record = {**vars(self), "ranks": [vars(r) for r in self.ranks]}
        write_json_atomic(JobDir(self.dir).record, record, durable=False)

    @classmethod
    def load(cls, job_dir: str | os.PathLike) -> "Job":
        data = json.loads(JobDir(job_dir).record.read_text())
        if "nprocs" in data:  # a record of nbdist before 0.2
            data["world_size"] = data.pop("nprocs")
        data["status"] = JobState(data["status"])
        data["ranks"] = [RankStatus(**{**r, "state": RankState(r["state"])})
                         for r in data["ranks"]]
        return cls(**data)

    @property
    def nprocs(self) -> int:
        """Deprecated: :attr:`world_size`."""
        warnings.warn("Job.nprocs is Job.world_size now", DeprecationWarning, stacklevel=2)
        return self.world_size

    def ranks_text(self) -> str:
        """``2 done``, ``1 done, 1 failed``: how the ranks ended, counted."""
        counts: dict[str, int] = {}
        for rank in self.ranks:
            counts[rank.state] = counts.get(rank.state, 0) + 1
        return ", ".join(f"{n} {state}" for state, n in counts.items())

    def __repr__(self) -> str:
        what = f"task of pool {self.pool}" if self.pool else "job"
        error = f": {self.error}" if self.error else ""
        return (f"<{what} {self.id} {self.status}{error} in {format_seconds(self.duration)}; "
                f"{self.world_size} ranks ({self.ranks_text()}); {self.dir}>")


def jobs() -> "JobList":
    """Past jobs with a saved record, newest first (job ids sort by creation time),
    shown as a table.

    Example: ``nbdist.jobs()[0]`` is the latest finished job, also after a restart.
    """
    return JobList(_saved())


def newest_job() -> Job | None:
    """The newest job with a saved record, if any (a restarted kernel's last job)."""
    return next(_saved(), None)


def _saved() -> Iterator[Job]:
    for path in sorted(base_dir().iterdir(), reverse=True):
        if JobDir(path).record.exists():
            try:
                yield Job.load(path)
            except (ValueError, TypeError, KeyError):
                continue  # a record from an incompatible version


class JobList(list):
    """A list of :class:`Job` records that reads as a table, one job a line."""

    COLUMNS = ("job", "what", "status", "ranks", "took", "error")

    def rows(self) -> list[tuple[str, ...]]:
        return [(job.id, f"task of pool {job.pool}" if job.pool else "job", job.status,
                 job.ranks_text(), format_seconds(job.duration), job.error or "")
                for job in self]

    def __repr__(self) -> str:
        if not self:
            return "no jobs yet (nbdist.jobs() lists the jobs kept on disk)"
        rows = [self.COLUMNS, *self.rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.COLUMNS))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                         for row in rows)

    def _repr_html_(self) -> str:
        import html

        head = "".join(f"<th>{c}</th>" for c in self.COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                       for row in self.rows())
        return f"<table><tr>{head}</tr>{body}</table>"


def format_seconds(seconds: float) -> str:
    """``12 ms``, ``4.2 s``, ``3:05``: a duration read at a glance."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def prune_now_and_then() -> None:
    """:func:`prune_jobs` at every ``PRUNE_EVERY``-th call: a warm pool's tasks come
    milliseconds apart, each with a folder, and listing the folders costs more than a
    task. Counted, not timed: a thousand tasks between two prunes would leave the jobs
    folder a directory of thousands, slower to create in ever after (ext4 never shrinks
    one)."""
    global _calls
    _calls += 1
    if _calls % PRUNE_EVERY == 1:
        prune_jobs()


def prune_jobs(keep: int | None = None) -> list[str]:
    """Delete old job folders, keeping the newest ``keep`` (``$NBDIST_KEEP_JOBS``, 50).

    Never deleted: a job whose result was not loaded yet (a finished training run
    must not vanish before the user had it) and a job that may still be running.
    Returns the deleted folders.
    """
    if keep is None:
        keep = int(os.environ.get(ENV_KEEP, DEFAULT_KEEP))
    with os.scandir(base_dir()) as entries:  # no stat per folder: scandir knows its type
        folders = sorted(Path(e.path) for e in entries if e.is_dir(follow_symlinks=False))
    deleted = []
    for path in folders[:max(0, len(folders) - keep)]:
        job_dir = JobDir(path)
        if job_dir.record.exists():
            try:
                record = Job.load(path)
            except (ValueError, TypeError, KeyError):
                record = None
            unloaded = (record is not None and record.status == JobState.SUCCEEDED
                        and not record.result_loaded)
            if unloaded:
                continue
        elif time.time() - path.stat().st_mtime < STALE_UNFINISHED:
            continue
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(str(path))
    return deleted


def load_result(job_dir: str | os.PathLike, *, rank: int | None = None):
    """Load the return value of a finished job, e.g. after a kernel restart.

    Returns rank 0's value, the list of all ranks' values for a ``return_all`` job, or
    the value of ``rank``. Example::

        job = nbdist.jobs()[0]  # the newest
        state = nbdist.load_result(job.dir)
    """
    job_dir = JobDir(job_dir)
    check_private(job_dir.path)
    record = Job.load(job_dir.path) if job_dir.record.exists() else None
    if rank is not None:
        ranks = [rank]
    else:
        ranks = list(range(record.world_size)) if record and record.return_all else [0]
    values = read_results(job_dir, ranks, status=record.status if record else None)
    if record is not None and not record.result_loaded:
        record.result_loaded = True
        record.save()
    return values if rank is None and record and record.return_all else values[0]


def read_results(job_dir: JobDir, ranks: list[int], status: str | None = None) -> list:
    """The saved return values of ``ranks``, checking each file is the user's own.

    A function's value comes back as itself (or raises :class:`PicklingError` naming
    it if it cannot be loaded here); a cell's names as :class:`payload.Outputs`.
    """
    values = []
    for r in ranks:
        if not job_dir.result(r).exists():
            why = f" (job status: {status})" if status else ""
            raise FileNotFoundError(
                f"job {job_dir.id} has no result from rank {r}{why}; "
                f"its logs are in {job_dir.path}")
        outputs = payload.load_outputs(job_dir.result(r), functools.partial(job_dir.result_part, r))
        values.append(_single_value(outputs, r, job_dir))
    return values


def _single_value(outputs: payload.Outputs, rank: int, job_dir: JobDir):
    name = payload.RETURN_VALUE
    if name in outputs.values:
        return outputs.values[name]
    if name in outputs.skipped:
        raise PicklingError(
            f"the return value of rank {rank}: {outputs.skipped[name]}. Return plain data "
            f"instead (a state_dict, model.module, tensors, numbers); the saved file stays "
            f"in {job_dir.path}.", name=name)
    return outputs  # a cell's names


def _signal_name(exitcode: int | None) -> str | None:
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def read_failures(job_dir: JobDir) -> dict[int, RankExit]:
    """Per-rank exit codes recorded by torchrun's agent (see ``_agent.py``)."""
    try:
        return decode_exits(job_dir.failures.read_bytes())
    except FileNotFoundError:
        return {}


def read_error(job_dir: JobDir, rank: int) -> ErrorRecord | None:
    try:
        return ErrorRecord.decode(job_dir.error(rank).read_bytes())
    except FileNotFoundError:
        return None


def diagnose(job: Job, launcher_exitcode: int | None,
             lost: dict[str | None, str] | None = None) -> BaseException:
    """The exception to raise for a failed job: the root cause, peers mentioned.

    ``lost``: hosts that went away (``{host: why}``: the link to them broke, or they
    never started); only a rank's own exception outranks them.
    """
    job_dir = JobDir(job.dir)
    failures = read_failures(job_dir)
    for rank, failure in failures.items():
        if rank < len(job.ranks):
            job.ranks[rank].exitcode = failure.exitcode
    # (priority, time, rank, error record or None)
    suspects: list[tuple[int, float, int, ErrorRecord | None]] = []
    for status in job.ranks:
        record = read_error(job_dir, status.rank)
        if record is not None:
            suspects.append((2 if is_communication_error(record) else 0, record.time,
                             status.rank, record))
        elif status.rank in failures:
            failure = failures[status.rank]
            torn_down = failure.exitcode == -signal.SIGTERM
            status.state = RankState.KILLED if torn_down else RankState.CRASHED
            # the agent's timestamp is whole seconds; assume mid-second
            suspects.append((3 if torn_down else 1, failure.timestamp + 0.5,
                             status.rank, None))
    if lost and not any(priority == 0 for priority, *_ in suspects):
        return _lost_host_error(job, lost)
    if not suspects:
        return LaunchError(
            f"torchrun exited with {describe_exit(launcher_exitcode)} before any rank "
            f"reported an outcome. Its output:\n{tail(job_dir.launcher_log)}")
    suspects.sort(key=lambda s: (s[0], s[1]))
    _, _, rank, record = suspects[0]
    others = [s for s in suspects[1:] if s[0] < 3]
    if record is not None:
        exc = rebuild_exception(record, job)
    else:
        exc = _crash_error(job, rank)
    if others:
        exc.add_note("[nbdist] also failed after it: " + "; ".join(
            f"rank {r} ({rec.type_name if rec else describe_exit(job.ranks[r].exitcode)})"
            for _, _, r, rec in others))
    return exc


# What gloo, NCCL and c10d say when a peer went away or a collective never completed.
# torch raises these as RuntimeError as often as DistError; either way they are the
# consequence of another rank's failure, when there is one, not its cause.
_COMMUNICATION = re.compile(
    r"connection (closed|reset|refused) by peer|broken pipe|connectFullMesh|"
    r"\[gloo\]|/gloo/|\bnccl\b|ProcessGroup\w*|c10d|timed out waiting|"
    r"socket (timeout|closed)|watchdog", re.IGNORECASE)


_COMMUNICATION_TYPES = ("builtins.RuntimeError", "builtins.OSError",
                        "builtins.ConnectionError", "builtins.ConnectionResetError",
                        "builtins.BrokenPipeError", "builtins.TimeoutError", "torch.")


def is_communication_error(record: ErrorRecord) -> bool:
    """True for an error of the communication layer (a peer's death seen from here):
    a DistError, or what torch raises as RuntimeError & co. with gloo's/NCCL's words."""
    return record.collective or (record.type.startswith(_COMMUNICATION_TYPES)
                                 and bool(_COMMUNICATION.search(record.message)))


def rebuild_exception(record: ErrorRecord, job: Job) -> BaseException:
    """The worker's exception, as its own type, with the remote traceback as cause."""
    rank = record.rank
    where = f"rank {rank} of {job.world_size} (host {record.host}, pid {record.pid})"
    exc: BaseException | None
    try:
        exc = payload.loads(record.exception) if record.exception else None
    except Exception:
        exc = None
    if exc is None:
        exc = RemoteError(record.type, record.message, rank=rank,
                          traceback=record.traceback)
    exc.__cause__ = RemoteTraceback(
        f"\n\nTraceback on {where}:\n\"\"\"\n{record.traceback}\"\"\"")
    mismatch = _mismatched_collectives(record.message)
    if mismatch:
        exc.add_note(mismatch)
    exc.nbdist_rank = rank  # type: ignore[attr-defined]
    exc.nbdist_traceback = record.traceback  # type: ignore[attr-defined]
    exc.add_note(f"[nbdist] raised on {where}; logs in {job.dir}")
    return exc


_FINGERPRINT = re.compile(r"Rank (\d+) is running collective: CollectiveFingerPrint\("
                          r"SequenceNumber=(\d+),? ?OpType=(\w+)(?:, TensorShape=\[([^\]]*)\])?")


def _mismatched_collectives(message: str) -> str | None:
    """torch's DETAIL report of mismatched collectives, in one readable line."""
    if "Detected mismatch between collectives" not in message:
        return None
    calls = [f"rank {rank} called {op.lower()} (collective #{seq}"
             + (f", tensor shape [{shape}])" if shape is not None else ")")
             for rank, seq, op, shape in _FINGERPRINT.findall(message)]
    return ("[nbdist] the ranks called different collectives: " + "; ".join(calls)
            + ". Every rank must call the same collectives in the same order (a "
            "collective under `if rank == 0:` is the usual cause).") if calls else None


def _lost_host_error(job: Job, lost: dict[str | None, str]) -> LaunchError:
    host, why = next(iter(lost.items()))
    if host is None:  # the launcher's own failure (Slurm refused the allocation)
        return LaunchError(why)
    ranks = [r.rank for r in job.ranks if r.host == host]
    on = f" (ranks {', '.join(map(str, ranks))})" if ranks else ""
    exc = LaunchError(f"host {host}{on}: {why}", host=host)
    if len(lost) > 1:
        exc.add_note("[nbdist] also lost: " + "; ".join(
            f"host {h}: {w.splitlines()[0]}" for h, w in list(lost.items())[1:]))
    return exc


def _crash_error(job: Job, rank: int) -> WorkerCrashedError:
    status = job.ranks[rank]
    log_tail = tail(Path(status.log), LOG_TAIL_LINES)
    hint = ""
    if status.signal_name == "SIGKILL":
        hint = (" SIGKILL often means the machine ran out of memory (the kernel's OOM "
                "killer); check `dmesg` or reduce the batch size.")
    shown = log_tail if log_tail else "(the log is empty)"
    several = len({r.host for r in job.ranks if r.host}) > 1
    on = f" on host {status.host}" if several else ""
    return WorkerCrashedError(
        f"rank {rank}{on} died without a Python exception: {describe_exit(status.exitcode)}."
        f"{hint}\nLast lines of its log ({status.log}):\n{shown}",
        rank=rank, exitcode=status.exitcode, signal_name=status.signal_name,
        log_tail=log_tail)


def describe_exit(exitcode: int | None) -> str:
    """An exit code in words: ``killed by SIGKILL``, ``exit code 1``."""
    name = _signal_name(exitcode)
    if name:
        return f"killed by {name}"
    return f"exit code {exitcode}"
