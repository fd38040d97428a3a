"""The root cause, read from synthetic job directories (no launch: the fast tier).

The real-fault versions of these cases are in test_failures.py; here each ordering
that a race could produce is pinned down, so the diagnosis never depends on which of
gloo's error and torchrun's teardown came first.
"""

from __future__ import annotations

import time

import pytest

import nbdist
from nbdist.job import Job, RankStatus, diagnose
from nbdist.jobdir import JobDir, write_bytes_atomic
from nbdist.protocol import ErrorRecord, RankExit, encode_exits

GLOO_CLOSED = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed "
               "by peer [127.0.0.1]:50123")


def job_with(tmp_path, *, errors: dict[int, tuple[str, str, float]],
             exits: dict[int, tuple[int, float]], collective: set[int] = frozenset()) -> Job:
    """A 2-rank failed job: error records {rank: (type, message, time)} and the
    agent's exit codes {rank: (exitcode, time)}."""
    job_dir = JobDir(tmp_path / "job")
    job_dir.path.mkdir(parents=True)
    for rank, (kind, message, when) in errors.items():
        write_bytes_atomic(job_dir.error(rank), ErrorRecord(
            rank=rank, host="here", pid=100 + rank, time=when, type=kind, message=message,
            traceback=f"Traceback ...\n{kind}: {message}\n", exception=None,
            collective=rank in collective).encode())
    write_bytes_atomic(job_dir.failures, encode_exits({
        rank: RankExit(exitcode=code, pid=100 + rank, local_rank=rank, timestamp=int(when))
        for rank, (code, when) in exits.items()}))
    return Job(id="job", dir=str(job_dir.path), world_size=2, backend="gloo",
               ranks=[RankStatus(r, log=str(job_dir.log(r))) for r in range(2)])


@pytest.mark.parametrize("kind,message,collective", [
    ("builtins.RuntimeError", GLOO_CLOSED, False),  # what torch 2.13's gloo raises
    ("torch.distributed.DistNetworkError", "recv failed", True),
    ("builtins.RuntimeError", "[gloo] Timed out waiting 1800000ms for recv operation", False),
])
def test_a_crash_outranks_the_communication_error_it_caused(tmp_path, kind, message,
                                                            collective):
    now = time.time()
    # rank 0's error was recorded *before* the agent saw rank 1 exit: the lost race
    job = job_with(tmp_path, errors={0: (kind, message, now - 5)},
                   exits={0: (1, now), 1: (3, now)}, collective={0} if collective else set())
    exc = diagnose(job, 1)
    assert isinstance(exc, nbdist.WorkerCrashedError), exc
    assert exc.rank == 1 and exc.exitcode == 3
    assert any("also failed after it: rank 0" in n for n in exc.__notes__)


def test_a_rank_exception_outranks_a_peer_communication_error(tmp_path):
    now = time.time()
    job = job_with(tmp_path, errors={0: ("builtins.RuntimeError", GLOO_CLOSED, now - 1),
                                     1: ("builtins.ValueError", "bad batch", now)},
                   exits={0: (1, now), 1: (1, now)})
    exc = diagnose(job, 1)
    assert isinstance(exc, nbdist.RemoteError) and exc.type_name == "builtins.ValueError"
    assert exc.rank == 1


def test_first_in_time_wins_among_exceptions_and_sigterm_is_only_teardown(tmp_path):
    now = time.time()
    job = job_with(tmp_path, errors={1: ("builtins.KeyError", "'first'", now - 1),
                                     0: ("builtins.RuntimeError", "second", now)},
                   exits={0: (1, now), 1: (1, now)})
    assert diagnose(job, 1).rank == 1
    job = job_with(tmp_path / "b", errors={}, exits={0: (-15, now - 3), 1: (-9, now)})
    exc = diagnose(job, 1)  # rank 0 was SIGTERMed by torchrun's teardown: not the cause
    assert isinstance(exc, nbdist.WorkerCrashedError) and exc.signal_name == "SIGKILL"


def test_only_a_communication_error_is_still_reported(tmp_path):
    job = job_with(tmp_path, errors={0: ("builtins.RuntimeError", GLOO_CLOSED, time.time())},
                   exits={0: (1, time.time())})
    exc = diagnose(job, 1)
    assert isinstance(exc, nbdist.RemoteError) and "Connection closed by peer" in str(exc)
