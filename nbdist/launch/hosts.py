"""The caller's side of a multi-host job: one link per host, one relay at its end.

::

    caller                          host i  (ssh host … / srun -w node …)
     ├─ Link i: a child process ──▶ python -m nbdist._remote   (launch/relay.py wire)
     │   sender thread:  job, start, payload chunks, tasks, signals, kill  (its stdin)
     │   reader thread:  the host's files into the caller's job folder     (its stdout)
     │   stderr thread:  ssh's / srun's / the relay's words → launcher.log, prefixed
     └─ … one per host; the first host's relay picks the rendezvous port, the caller
        passes it on to the others, each starts torchrun --nnodes N (c10d)

Liveness needs no pid across machines: a relay whose stdin closes (the caller died,
the link broke) kills its ranks; the caller sees a link end without the relay's
"exit" as the host lost, and takes the other hosts down after ``FAILURE_GRACE``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import nbdist
from nbdist.jobdir import JobDir
from nbdist.launch.relay import FROM_HOSTS, Sink, Wire, send_file
from nbdist.plan import Plan

FAILURE_GRACE = 2.0  # seconds the other hosts get to report, once one failed or was lost
KILL_WAIT = 3.0  # seconds the relays get to stop their ranks before the links are cut
PAYLOAD_POLL = 0.005


class Link:
    """One host: the process that reaches it (ssh, srun) and the threads around it."""

    def __init__(self, launch: "HostsLaunch", index: int, label: str, command: list[str],
                 hello: bytes):
        self.launch = launch
        self.index = index
        self.label = label
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.wire = Wire(self.proc.stdout, self.proc.stdin)
        # first, before any urgent message can jump the queue (a pipe holds it whole)
        with contextlib.suppress(OSError):
            self.wire.send("job", hello)
        self.ready: dict | None = None  # the relay's hello
        self.exitcode: int | None = None  # torchrun's, as the relay reported it
        self.failure: str | None = None  # what the relay said went wrong
        self.ended = threading.Event()  # stdout closed: the link is over
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._last_words: collections.deque = collections.deque(maxlen=20)
        self._threads = {name: threading.Thread(target=target, daemon=True,
                                                name=f"nbdist-link-{label}-{name}")
                         for target, name in ((self._read, "read"),
                                              (self._read_stderr, "stderr"),
                                              (self._send_queued, "send"))}
        for thread in self._threads.values():
            thread.start()

    # --- sending -----------------------------------------------------------------------
    def send(self, op: str, body: bytes = b"", *, urgent: bool = False, **fields) -> None:
        self._put(("message", op, body, fields), urgent)

    def send_file(self, path: Path, key: str, *, wait: bool = False) -> None:
        """Send ``path`` (``wait``: once it appears) after what is queued before it."""
        self._put(("file", path, key, wait), False)

    def _put(self, item: tuple, urgent: bool) -> None:
        with self._wake:
            (self._queue.appendleft if urgent else self._queue.append)(item)
            self._wake.notify()

    def _send_queued(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._queue and not self._stopping:
                        self._wake.wait()
                    if not self._queue:
                        return
                    item = self._queue.popleft()
                if item[0] == "message":
                    _, op, body, fields = item
                    self.wire.send(op, body, **fields)
                else:
                    self._send_file(*item[1:])
        except (OSError, ValueError):  # the link is gone: the reader reports it
            pass

    def _send_file(self, path: Path, key: str, wait: bool) -> None:
        while wait and not path.exists() and not self._stopping:
            time.sleep(PAYLOAD_POLL)
        if self._stopping:
            return
        try:
            send_file(self.wire, path, key, between=self._send_urgent,
                      stopped=lambda: self._stopping)
        except FileNotFoundError:  # a task's payload, removed: the task ended unsent
            pass

    def _send_urgent(self) -> None:
        """Between a file's chunks: messages queued ahead of it (a start, a signal)."""
        while True:
            with self._wake:
                if not self._queue or self._queue[0][0] != "message":
                    return
                _, op, body, fields = self._queue.popleft()
            self.wire.send(op, body, **fields)

    def stop_sending(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()

    # --- receiving ---------------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                message = self.wire.receive()
                if message is None:
                    break
                header, body = message
                if not self.launch.sink.apply(header, body):
                    self._handle(header)
                self.launch.activity.set()
        except (OSError, ValueError) as exc:  # garbled, or a file nbdist does not send
            self.failure = self.failure or f"the link broke: {exc}"
            self.kill()  # unread, the host would block on its next write
        finally:
            self.proc.wait()
            # its last words (ssh's "Connection refused") are read before it counts as over
            self._threads["stderr"].join(timeout=2)
            self.ended.set()
            self.launch.activity.set()

    def _handle(self, header: dict) -> None:
        op = header["op"]
        if op == "ready":
            self.ready = header
        elif op == "port":
            self.launch.rendezvous_port(header["address"], header["port"])
        elif op == "exit":
            self.exitcode = header["code"]
        elif op == "fail":
            self.failure = header["reason"]

    def _read_stderr(self) -> None:
        with open(self.launch.job.launcher_log, "ab") as log:
            for line in self.proc.stderr:
                text = line.decode(errors="replace").rstrip()
                self._last_words.append(text)
                log.write(f"[{self.label}] {text}\n".encode())
                log.flush()

    # --- state -------------------------------------------------------------------------
    @property
    def lost(self) -> str | None:
        """Why the host is lost, or None: it still runs, or its relay said how it ended."""
        if not self.ended.is_set() or self.exitcode is not None:
            return None
        if self.failure:
            return self.failure
        words = "\n".join(w for w in self._last_words if w.strip())
        said = f":\n{words}" if words else ""
        how = self.launch.describe_exit(self.proc.returncode)
        if self.ready is None:
            return (f"nbdist could not start there ({how}){said}\n"
                    f"{self.launch.reach_hint}")
        return f"the host was lost mid-job ({how}){said}"

    def kill(self) -> None:
        """Cut the link: the relay at the other end sees its stdin close and cleans up."""
        self.stop_sending()
        self.launch.cut(self.proc)


class HostsLaunch:
    """A job on several hosts, each reached by a command from ``targets``.

    Has the launcher interface of ``launch/__init__.py``. ``targets`` may be None
    while the hosts are not known yet (Slurm's queue): ``connect`` opens the links.
    """

    reach_hint = ""  # how to check that a host can be reached (ssh.py, slurm.py)

    def __init__(self, job: JobDir, plan: Plan, defaults: dict[str, str],
                 overrides: dict[str, str], *, pool: bool,
                 targets: list[tuple[str, list[str]]] | None):
        self.job = job
        self.plan = plan
        self.pool = pool
        self.defaults = defaults
        self.overrides = overrides
        self.nprocs = plan.nprocs
        self.world_size = plan.world_size
        self.links: list[Link] = []
        self.sink = Sink(lambda key: self.job.path.parent / key if key else self.job.path,
                         accept=FROM_HOSTS)
        self.activity = threading.Event()
        self.started_at: float | None = None
        self._rank_hosts: dict[int, str] = {}
        self._bad_since: float | None = None
        self._killed = False
        if targets is not None:
            self.connect(targets)

    def connect(self, targets: list[tuple[str, list[str]]]) -> None:
        """Open a link per host; the first host's relay picks the rendezvous port."""
        spec = self.job.read_spec()
        cwd = os.getcwd()
        hello = {
            "job": self.job.id, "nhosts": len(targets), "nprocs": self.nprocs,
            "world_size": self.world_size, "pool": self.pool, "spec": spec, "cwd": cwd,
            "sys_path": [os.path.abspath(p) if p else cwd for p in sys.path],
            "defaults": self.defaults, "overrides": self.overrides,
            "python": list(sys.version_info[:2]), "nbdist": nbdist.__version__,
        }
        for index, (label, command) in enumerate(targets):
            link = Link(self, index, label, command,
                        json.dumps({**hello, "index": index, "host": label}).encode())
            self.links.append(link)
            if index == 0:
                link.send("start", port=None, address=None)
            if not self.pool:  # a cold job's payload, once the caller has written it
                link.send_file(self.job.payload, "", wait=True)
        self.started_at = time.monotonic()

    def rendezvous_port(self, address: str, port: int) -> None:
        """The first host's store listens: every other host may start."""
        for link in self.links[1:]:
            link.send("start", urgent=True, port=port, address=address)

    # --- the launcher interface --------------------------------------------------------
    def poll(self) -> int | None:
        if not self.links:
            return None
        bad = [link for link in self.links
               if link.lost or (link.exitcode not in (None, 0))]
        if bad and self._bad_since is None:
            self._bad_since = time.monotonic()
        if all(link.ended.is_set() for link in self.links):
            codes = [link.exitcode for link in self.links]
            return 0 if all(code == 0 for code in codes) else next(
                (c for c in codes if c not in (None, 0, -1)), 1)
        if (self._bad_since is not None and not self._killed
                and time.monotonic() - self._bad_since > FAILURE_GRACE):
            self._stop_links()  # the others wait for the lost host's ranks in vain
        return None

    def wait(self, timeout: float) -> None:
        self.activity.wait(timeout)
        self.activity.clear()

    def kill(self) -> None:
        """Tell every relay to stop its ranks, then cut the links still open."""
        self._stop_links()
        deadline = time.monotonic() + KILL_WAIT
        for link in self.links:
            link.ended.wait(max(0.0, deadline - time.monotonic()))
        for link in self.links:
            if not link.ended.is_set():
                link.kill()
        for link in self.links:
            link.ended.wait(1.0)

    def _stop_links(self) -> None:
        self._killed = True
        for link in self.links:
            if not link.ended.is_set():
                with contextlib.suppress(OSError, ValueError):
                    link.send("kill", urgent=True)
                link.stop_sending()

    def signal(self, sig: signal.Signals) -> list[int]:
        for link in self.links:
            if not link.ended.is_set():
                link.send("signal", urgent=True, signal=int(sig))
        return self.live_ranks()

    def post(self, task: JobDir | None, return_all: bool, *, stop: bool = False) -> None:
        for link in self.links:
            if task is not None:
                link.send_file(task.payload, task.id)
            link.send("post", task=task.id if task else None, return_all=return_all,
                      stop=stop)

    def note_rank(self, rank: int, pid: int, host: str | None = None) -> None:
        if host is not None:
            self._rank_hosts[rank] = host

    def live_ranks(self) -> list[int]:
        up = {link.label for link in self.links if not link.ended.is_set()}
        return sorted(r for r, host in self._rank_hosts.items() if host in up)

    def take_notices(self) -> list[str]:
        return []

    def lost_hosts(self) -> dict[str, str]:
        return {link.label: link.lost for link in self.links if link.lost}

    def describe_exit(self, code: int | None) -> str:
        return f"exit code {code}"

    def cut(self, proc: subprocess.Popen) -> None:
        """End a link's process at once (ssh: its whole group)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
