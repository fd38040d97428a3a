"""The caller's side of a multi-host job: one link per host, one relay at its end.

::

    caller                          host i  (ssh host … / srun -w node …)
     ├─ Link i: a child process ──▶ python -m nbdist._remote   (launch/relay.py wire)
     │   sender thread:  Hello, Modules, Start, payload, tasks, signals, kill (its stdin)
     │   reader thread:  the host's files into the caller's job folder  (its stdout)
     │   stderr thread:  ssh's / srun's / the relay's words → launcher.log, prefixed
     └─ … one per host; the first host's relay picks the rendezvous port, the caller
        passes it on to the others, each starts torchrun --nnodes N (c10d)

Liveness needs no pid across machines: a relay whose stdin closes (the caller died,
the link broke) kills its ranks; the caller sees a link end without the relay's
``Exit`` as the host lost, and takes the other hosts down after ``FAILURE_GRACE``.
Which ranks run where it learns from the link itself: a host sends rank N's events.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbdist
from nbdist import shipping
from nbdist.job import describe_exit
from nbdist.jobdir import EVENTS, JobDir
from nbdist.launch.relay import FROM_HOSTS, Sink, Wire, send_file
from nbdist.plan import Plan
from nbdist.protocol import (VERSION, Append, Exit, Fail, Hello, Kill, Message, Modules,
                             Ping, Port, PostTask, Ready, Signal, Spec, Start)

FAILURE_GRACE = 2.0  # seconds the other hosts get to report, once one failed or was lost
KILL_WAIT = 3.0  # seconds the relays get to stop their ranks before the links are cut
PAYLOAD_POLL = 0.005
PING = 5.0  # seconds between messages at least: a relay that hears nothing for
            # _remote.LINK_SILENCE takes the caller for gone (a partitioned network)


class Link:
    """One host: the process that reaches it (ssh, srun) and the threads around it."""

    def __init__(self, launch: "HostsLaunch", index: int, label: str, command: list[str],
                 hello: Hello, modules: bytes):
        self.launch = launch
        self.index = index
        self.label = label
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.wire = Wire(self.proc.stdout, self.proc.stdin)
        self.sink = Sink(launch.folder_of, accept=FROM_HOSTS, merge_lock=launch.merge_lock,
                         tag=str(index))
        # first, before any urgent message can jump the queue (a pipe holds it whole)
        with contextlib.suppress(OSError):
            self.wire.send(hello)
        self.ready: Ready | None = None  # the relay's hello
        self.exitcode: int | None = None  # torchrun's, as the relay reported it
        self.failure: str | None = None  # what the relay said went wrong
        self.ended = threading.Event()  # stdout closed: the link is over
        self._queue: collections.deque = collections.deque()  # in order
        self._urgent: collections.deque = collections.deque()  # ahead of it all
        self._wake = threading.Condition()
        self._stopping = False
        # the caller's own modules (shipping.py) go ahead of the start, urgent too
        self._urgent.append(("message", Modules(modules)))
        self._last_words: collections.deque = collections.deque(maxlen=20)
        self._words_lock = threading.Lock()
        # the reader last: it joins the stderr thread when the link ends (at once, for
        # a host that refuses the connection)
        self._threads = {name: threading.Thread(target=target, daemon=True,
                                                name=f"nbdist-link-{label}-{name}")
                         for target, name in ((self._read_stderr, "stderr"),
                                              (self._send_queued, "send"),
                                              (self._read, "read"))}
        for thread in self._threads.values():
            thread.start()

    # --- sending -----------------------------------------------------------------------
    def send(self, message: Message, *, urgent: bool = False) -> None:
        """Queue a message; ``urgent`` ones (start, signal, kill) overtake the others,
        also between a file's chunks."""
        with self._wake:
            (self._urgent if urgent else self._queue).append(("message", message))
            self._wake.notify()

    def send_file(self, path: Path, key: str, *, wait: bool = False) -> None:
        """Send ``path`` (``wait``: once it appears) after what is queued before it."""
        with self._wake:
            self._queue.append(("file", path, key, wait))
            self._wake.notify()

    def _send_queued(self) -> None:
        try:
            while True:
                with self._wake:
                    if not (self._urgent or self._queue or self._stopping):
                        self._wake.wait(PING)
                    if self._stopping and not self._urgent:
                        return
                    queue = self._urgent or self._queue
                    item = queue.popleft() if queue else ("message", Ping())
                if item[0] == "message":
                    self.wire.send(item[1])
                else:
                    self._send_file(*item[1:])
        except (OSError, ValueError):  # the link is gone: the reader reports it
            pass

    def _send_file(self, path: Path, key: str, wait: bool) -> None:
        while wait and not path.exists() and not self._stopping:
            self._send_urgent()
            time.sleep(PAYLOAD_POLL)
        if self._stopping:
            return
        try:
            send_file(self.wire, path, key, between=self._send_urgent,
                      stopped=lambda: self._stopping)
        except FileNotFoundError:  # a task's payload, removed: the task ended unsent
            pass

    def _send_urgent(self) -> None:
        while True:
            with self._wake:
                if not self._urgent:
                    return
                _, message = self._urgent.popleft()
            self.wire.send(message)

    def stop_sending(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()

    # --- receiving ---------------------------------------------------------------------
    def _read(self) -> None:
        try:
            self._apply_messages()
        except (OSError, ValueError) as exc:  # garbled, or a file nbdist does not send
            self.failure = self.failure or (
                f"the link broke: {exc}" if self.ready is not None else
                f"something on the host printed to stdout before nbdist's relay started "
                f"(a shell startup file?), or the relay could not start: {exc}")
        finally:
            try:
                if self.failure:
                    self.kill()  # unread, the host would block on its next write
                self.proc.wait()
                # its last words (ssh's "Connection refused") are read before it counts
                # as over
                self._threads["stderr"].join(timeout=2)
            finally:
                self.ended.set()  # whatever happened: a link never hangs the caller
                self.launch.activity.set()

    def _apply_messages(self) -> None:
        while True:
            message = self.wire.receive()
            if message is None:
                return
            try:
                applied = self.sink.apply(message)
            except OSError as exc:  # this side's fault: a full disk, a folder gone
                self.failure = self.failure or (
                    f"the caller could not write what the host sent: {exc}")
                return
            if applied:
                self._note_rank(message)
            else:
                self._handle(message)
            self.launch.activity.set()

    def _note_rank(self, message: Message) -> None:
        """A host that sends rank N's events runs rank N."""
        if isinstance(message, Append) and not message.key:
            found = EVENTS.fullmatch(message.name)
            if found:
                self.launch.rank_hosts.setdefault(int(found.group(1)), self.label)

    def _handle(self, message: Message) -> None:
        if isinstance(message, Ready):
            self.ready = message
        elif isinstance(message, Port):
            self.launch.rendezvous_port(message.address, message.port)
        elif isinstance(message, Exit):
            self.exitcode = message.code
        elif isinstance(message, Fail):
            self.failure = message.reason

    def _read_stderr(self) -> None:
        with open(self.launch.job.launcher_log, "ab") as log:
            for line in self.proc.stderr:
                text = line.decode(errors="replace").rstrip()
                with self._words_lock:
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
        said = self.last_words()
        how = self.launch.describe_exit(self.proc.returncode)
        if self.ready is None:
            return (f"nbdist could not start there ({how}){said}\n"
                    f"{self.launch.reach_hint}")
        return f"the host was lost mid-job ({how}){said}"

    def last_words(self) -> str:
        """The last lines the host's side wrote to stderr, as ":\n..." (or nothing)."""
        with self._words_lock:
            words = "\n".join(w for w in self._last_words if w.strip())
        return f":\n{words}" if words else ""

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
    via = ""  # "ssh" | "slurm": how the relays were reached

    def __init__(self, job: JobDir, spec: Spec, plan: Plan, *,
                 targets: list[tuple[str, list[str]]] | None):
        self.job = job
        self.spec = spec
        self.plan = plan
        self.links: list[Link] = []
        self.merge_lock = threading.Lock()  # failures.json: every host adds its ranks'
        self.tasks: set[str] = set()  # a pool's tasks posted: the folders hosts may fill
        self.activity = threading.Event()
        self.started_at: float | None = None
        self.rank_hosts: dict[int, str] = {}  # as the links' events say (Link._note_rank)
        self._notices: list[str] = []  # for the display (take_notices)
        self._bad_since: float | None = None
        self._killed = False
        if targets is not None:
            self.connect(targets)

    def connect(self, targets: list[tuple[str, list[str]]]) -> None:
        """Open a link per host; the first host's relay picks the rendezvous port."""
        files, left_out = shipping.collect(list(self.spec.sys_path), self.spec.cwd)
        if left_out:
            self._notices.append(f"[nbdist] not sent to the hosts: your modules "
                                 f"{', '.join(left_out)}; where a host lacks their folder, "
                                 f"install them there")
        modules = shipping.pack(files)
        try:
            for index, (label, command) in enumerate(targets):
                hello = Hello(version=VERSION, job=self.job.id, index=index, host=label,
                              nhosts=len(targets), spec=self.spec,
                              python=tuple(sys.version_info[:2]), nbdist=nbdist.__version__,
                              via=self.via)
                self.links.append(Link(self, index, label, command, hello, modules))
        except BaseException:  # too many hosts for this process's files, or stop pressed
            self.kill()
            raise
        # every link exists before the first host can answer with the port
        self.links[0].send(Start(port=None, address=None))
        if not self.spec.pool:  # a cold job's payload, once the caller has written it
            for link in self.links:
                link.send_file(self.job.payload, "", wait=True)
        self.started_at = time.monotonic()

    def rendezvous_port(self, address: str, port: int) -> None:
        """The first host's store listens: every other host may start."""
        for link in self.links[1:]:
            link.send(Start(port=port, address=address), urgent=True)

    # --- the launcher interface --------------------------------------------------------
    @property
    def hosts(self) -> list[str] | None:
        return [link.label for link in self.links] or None

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
        if self._bad_since is not None:
            waited = time.monotonic() - self._bad_since
            if waited > FAILURE_GRACE and not self._killed:
                self._stop_links()  # the others wait for the lost host's ranks in vain
            elif waited > FAILURE_GRACE + KILL_WAIT:
                self._cut_links()  # a relay that does not answer (a host stuck in I/O)
        return None

    def wait(self, timeout: float) -> None:
        self.activity.wait(timeout)
        self.activity.clear()

    def kill(self) -> None:
        """Tell every relay to stop its ranks, then cut the links still open."""
        try:
            self._stop_links()
            deadline = time.monotonic() + KILL_WAIT
            for link in self.links:
                link.ended.wait(max(0.0, deadline - time.monotonic()))
        finally:  # stop pressed again meanwhile: cut them now
            self._cut_links()
        deadline = time.monotonic() + 1.0
        for link in self.links:
            link.ended.wait(max(0.0, deadline - time.monotonic()))

    def _cut_links(self) -> None:
        for link in self.links:
            if not link.ended.is_set():
                link.kill()

    def _stop_links(self) -> None:
        self._killed = True
        for link in self.links:
            if not link.ended.is_set():
                with contextlib.suppress(OSError, ValueError):
                    link.send(Kill(), urgent=True)
                link.stop_sending()

    def signal(self, sig: signal.Signals) -> list[int]:
        for link in self.links:
            if not link.ended.is_set():
                link.send(Signal(signal=int(sig)), urgent=True)
        return self.live_ranks()

    def folder_of(self, key: str) -> Path:
        """Where a host's files for folder ``key`` go: the job's, or a posted task's."""
        if not key:
            return self.job.path
        if key not in self.tasks:
            raise KeyError(key)
        return self.job.path.parent / key

    def post(self, task: JobDir | None, return_all: bool, *, stop: bool = False) -> None:
        if task is not None:
            self.tasks.add(task.id)
        for link in self.links:
            if task is not None:
                link.send_file(task.payload, task.id)
            link.send(PostTask(task=task.id if task else None, return_all=return_all,
                               stop=stop))

    def live_ranks(self) -> list[int]:
        up = {link.label for link in self.links if not link.ended.is_set()}
        # a copy: the links' reader threads add to it meanwhile
        return sorted(r for r, host in list(self.rank_hosts.items()) if host in up)

    def take_notices(self) -> list[str]:
        notices, self._notices = self._notices, []
        return notices

    def lost_hosts(self) -> dict[str | None, str]:
        """Hosts lost or never reached, and hosts whose torchrun failed before any of
        their ranks started (its words say why: a bad option, a missing module)."""
        lost: dict[str | None, str] = {}
        started = set(self.rank_hosts.values())
        for link in self.links:
            if link.lost:
                lost[link.label] = link.lost
            elif link.exitcode not in (None, 0, -1) and link.label not in started:
                lost[link.label] = (f"torchrun failed there before any rank started "
                                    f"(exit code {link.exitcode}){link.last_words()}")
        return lost

    def describe_exit(self, code: int | None) -> str:
        """How a link's process (ssh, srun) ended, in words."""
        return describe_exit(code)

    def cut(self, proc: subprocess.Popen) -> None:
        """End a link's process at once (ssh: its whole group)."""
        if proc.returncode is None:  # once reaped, its pid may be a stranger's
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
