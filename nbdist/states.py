"""The one vocabulary of states and event kinds, as torch elastic's ``WorkerState``.

Every module — worker, caller, job record, displays and their style tables — names a
state through these enums. They are ``StrEnum``: a member equals its string, so the
JSON of events and job records stays plain text and a record read back compares
equal to the members.

A rank goes PENDING (nothing heard yet) → STARTING (process up) → JOINING (in
``init_process_group``) → READY (group formed; a pool's rank idles here between tasks)
→ RUNNING → DONE or FAILED (raised). From the caller's evidence: CRASHED (died without
an exception), KILLED (stopped by nbdist or torchrun's teardown); STOPPED is how a
display shows a rank that was still running when its job ended another way, and how
the record of an interrupted task keeps a rank that stopped with the KeyboardInterrupt.
"""

from __future__ import annotations

from enum import StrEnum


class RankState(StrEnum):
    PENDING = "pending"
    STARTING = "starting"
    JOINING = "joining"
    READY = "ready"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CRASHED = "crashed"
    KILLED = "killed"
    STOPPED = "stopped"
    IDLE = "idle"  # a pool's rank between tasks, as `%distributed status` says


NOT_JOINED = (RankState.PENDING, RankState.STARTING, RankState.JOINING)
REPORTED = (RankState.DONE, RankState.FAILED)  # outcomes a rank reports itself
FINAL = (RankState.DONE, RankState.FAILED, RankState.CRASHED, RankState.KILLED,
         RankState.STOPPED)


class JobState(StrEnum):
    """A job's (or a pool task's) status in its record."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"


class EventKind(StrEnum):
    """What a line of a rank's events file carries (``channel.py``)."""

    STATUS = "status"  # a RankState, with pid/host/exitcode/error as they are known
    PROGRESS = "progress"  # a track() bar: bar, desc, n, total, closed
    METRICS = "metrics"  # report() values and the step
    HEARTBEAT = "heartbeat"
