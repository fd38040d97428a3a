"""Starting torchrun on this machine, and stopping every process it started.

Process tree of one job::

    caller (notebook kernel), or a host's relay (``_remote.py``) for a multi-host job
     └─ python -m nbdist._agent --standalone --nproc-per-node N entry.py
        │   torchrun's own elastic agent (torch.distributed.run), in a new session,
        │   that also records per-rank exit codes and watches the caller
        ├─ python entry.py   rank 0   (torchrun puts each rank in a session of its own)
        └─ python entry.py   rank 1   ...

Because torchrun gives every rank its own session, killing the agent's process group
alone would orphan the ranks. :meth:`Launch.kill` therefore signals every group of the
tree — the agent's and each rank's (the agent's children, found through ``/proc``) —
with SIGTERM, waits a bounded time, then SIGKILLs whatever is left.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nbdist.jobdir import JobDir
from nbdist.protocol import Post, Spec

TERM_GRACE = 0.7  # seconds between SIGTERM and SIGKILL


@dataclass(frozen=True)
class Rendezvous:
    """torchrun's c10d rendezvous across hosts: the store listens on ``host:port``,
    in the agent of the host where ``is_host``."""

    nnodes: int
    host: str
    port: int
    id: str
    is_host: bool
    local_addr: str  # this host's address as the others reach it


def torchrun_command(job: JobDir, ranks_per_host: int,
                     rendezvous: Rendezvous | None) -> list[str]:
    if rendezvous is None:
        where = ["--standalone"]
    else:
        where = ["--nnodes", str(rendezvous.nnodes), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", f"{rendezvous.host}:{rendezvous.port}",
                 "--rdzv-id", rendezvous.id,
                 "--rdzv-conf", f"is_host={int(rendezvous.is_host)}",
                 "--local-addr", rendezvous.local_addr, "--max-restarts", "0"]
    return [
        sys.executable, "-m", "nbdist._agent", *where,
        "--nproc-per-node", str(ranks_per_host),
        # torch < 2.2 polled every 5 s; a dead rank must take its peers down promptly.
        "--monitor_interval", "0.1",
        str(job.entry),
    ]


class Launch:
    """One torchrun on this machine: its process, and the means to stop its whole tree.

    The interface every launcher has (``launch/__init__.py``). It finds its ranks
    itself, as its agent's children running this job's entry script (``/proc``), and
    waits on the job's bell (``channel.py``) and torchrun's exit together.
    """

    hosts = None  # this machine

    def __init__(self, job: JobDir, spec: Spec, *, env: dict[str, str] | None = None,
                 rendezvous: Rendezvous | None = None, output: int | None = None):
        self.job = job
        self._wake: list[int] = []
        self._seq = 0
        self._known: dict[int, int] = {}  # rank -> pid, as found among the agent's children
        self._bell = -1
        self._pidfd: int | None = None  # becomes readable when torchrun exits
        try:
            self._open_fifos(job, spec)
            # torchrun's own output: to launcher.log, or ``output`` (a relay's stderr,
            # which the caller reads)
            with open(job.launcher_log, "ab") if output is None else open(
                    output, "wb", closefd=False) as log:
                self.proc = subprocess.Popen(
                    torchrun_command(job, spec.ranks_per_host, rendezvous),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=env if env is not None else spec.environment(os.environ),
                    cwd=str(job.path), start_new_session=True,
                )
        except BaseException:  # no launch to kill() comes back: let go of the FIFOs here
            self._close_fds()
            raise
        self.pid = self.proc.pid
        self.started_at = time.monotonic()
        with contextlib.suppress(AttributeError, OSError):  # Linux >= 5.3 only
            self._pidfd = os.pidfd_open(self.pid)
            self._events.register(self._pidfd, select.POLLIN)

    def _open_fifos(self, job: JobDir, spec: Spec) -> None:
        """A pool's FIFO per rank, and the bell, before the ranks start: each opens its
        own at once."""
        if spec.pool:
            for rank in range(spec.world_size):  # any of them may land on this host
                os.mkfifo(job.wake(rank), 0o600)
                # read-write: opening never blocks, and the FIFO never reports EOF
                self._wake.append(os.open(job.wake(rank), os.O_RDWR | os.O_NONBLOCK))
        os.mkfifo(job.bell, 0o600)
        self._bell = os.open(job.bell, os.O_RDWR | os.O_NONBLOCK)
        self._events = select.poll()  # poll, not select: a pidfd may be > 1023
        self._events.register(self._bell, select.POLLIN)

    def _close_fds(self) -> None:
        for fd in [*self._wake, self._bell, self._pidfd]:
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake, self._bell, self._pidfd = [], -1, None

    def watch(self, fd: int) -> None:
        """Let ``wait`` also return when ``fd`` becomes readable (a relay's inbox)."""
        self._events.register(fd, select.POLLIN)

    def ranks(self) -> dict[int, int]:
        """The ranks up now, and their pids: the agent's children that run this job's
        entry script, by the ``RANK`` torchrun gave each (a data loader's workers,
        forked from a rank, are its grandchildren)."""
        if self.proc.poll() is None:
            for pid in children(self.pid):
                rank = _rank_of(pid, self.job)
                if rank is not None:
                    self._known[rank] = pid
        return {r: pid for r, pid in sorted(self._known.items()) if is_rank_of(pid, self.job)}

    def live_ranks(self) -> list[int]:
        """The ranks known to be up (the launcher interface's word for :meth:`ranks`)."""
        return list(self.ranks())

    def signal(self, sig: signal.Signals) -> list[int]:
        """Send ``sig`` to every live rank; return those signalled."""
        ranks = self.ranks()
        for pid in ranks.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        return list(ranks)

    def post(self, task: JobDir | None, return_all: bool, *, stop: bool = False) -> None:
        """A pool's next task (``None`` with ``stop``: leave), written whole into every
        rank's FIFO: the ranks wake with it."""
        self._seq += 1
        line = Post(self._seq, str(task.path) if task else None, return_all, stop).encode()
        for fd in self._wake:
            # a FIFO of a rank on another host is never read: once full, one more
            # post would not change anything
            with contextlib.suppress(BlockingIOError):
                os.write(fd, line)

    def take_notices(self) -> list[str]:
        """What the display should say about the launch itself (none here)."""
        return []

    def lost_hosts(self) -> dict[str | None, str]:
        """Hosts that went away mid-job, with why (none here: one machine)."""
        return {}

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds, but return as soon as a rank rings the bell
        or torchrun exits (without a pidfd, an old kernel, only the bell)."""
        if self._bell < 0:  # killed
            time.sleep(timeout)
            return
        if self._events.poll(timeout * 1000):
            with contextlib.suppress(BlockingIOError):
                while os.read(self._bell, 4096):
                    pass

    def kill(self) -> None:
        """SIGTERM every process group of the job, wait briefly, SIGKILL the rest.

        Idempotent, bounded to about ``TERM_GRACE`` + 0.3 s, and safe to call after
        the processes are gone.
        """
        groups = self._groups()
        _signal_groups(groups, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE
        while time.monotonic() < deadline and self._alive(groups):
            time.sleep(0.02)
        if self.proc.poll() is not None:
            groups.discard(self.pid)  # reaped: its pid (= its group) may be reused
        _signal_groups(groups, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=0.3)
        self._close_fds()

    def _groups(self) -> set[int]:
        pids: set[int] = set()
        if self.proc.poll() is None:  # once reaped, its pid may belong to a stranger
            pids = {self.pid, *descendants(self.pid)}
        pids.update(self.ranks().values())  # ranks orphaned by a dead agent too
        groups = set()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                groups.add(os.getpgid(pid))
        groups.discard(os.getpgid(0))  # never the caller's own group
        return groups

    def _alive(self, groups: set[int]) -> bool:
        self.proc.poll()  # reap the agent so it does not linger as a zombie
        return any(_group_alive(g) for g in groups)


def _signal_groups(groups: set[int], sig: signal.Signals) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # a zombie still counts for killpg; it is dead for our purpose
    return any(not _is_zombie(pid) for pid in _group_members(group))


def is_rank_of(pid: int, job: JobDir) -> bool:
    """True if ``pid`` is still a rank of this launch (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc: trust the pid the rank reported a moment ago
    return str(job.entry).encode() in cmdline


def _proc_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses
    return raw[raw.rindex(")") + 2:].split()


def _all_stats() -> dict[int, list[str]]:
    stats = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None:
                stats[int(entry)] = st
    return stats


def _rank_of(pid: int, job: JobDir) -> int | None:
    """The ``RANK`` of a process running ``job``'s entry script, else None."""
    if not is_rank_of(pid, job):
        return None
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    rank = next((v[5:] for v in environ if v.startswith(b"RANK=")), b"")
    return int(rank) if rank.isdigit() else None


def children(pid: int) -> list[int]:
    """The live children of ``pid``, via /proc."""
    return [child for child, st in _all_stats().items() if int(st[1]) == pid]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, grandchildren, ...), via /proc."""
    children: dict[int, list[int]] = {}
    for child, st in _all_stats().items():
        children.setdefault(int(st[1]), []).append(child)  # st[1] is the parent pid
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _group_members(group: int) -> list[int]:
    members = [p for p, st in _all_stats().items() if int(st[2]) == group]
    return members if os.path.isdir("/proc") else [group]


def _is_zombie(pid: int) -> bool:
    st = _proc_stat(pid)
    return st is None or st[0] == "Z"
