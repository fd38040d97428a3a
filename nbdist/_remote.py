"""``python -m nbdist._remote``: a host's end of a multi-host job (the relay).

The caller reaches each host with ``ssh host python -m nbdist._remote`` or ``srun``
(``launch/hosts.py``); this process then

* makes a private folder for its copy of the job (``jobdir.host_dir()``: nothing is
  shared with the caller), writes the spec and entry script there, the caller's own
  modules (``shipping.py``), and the payload as its chunks arrive;
* starts torchrun's agent with c10d rendezvous (``launch/local.py``); on the first
  host it picks the store's port and tells the caller, which tells the others;
* mirrors what the ranks write back to the caller (``launch/relay.py``), and carries
  out the caller's messages: a pool's tasks, signals, kill;
* watches its link: when its stdin closes (the ssh session or the Slurm step ended,
  the caller died), it kills every process it started and removes its folder.

It imports no torch: it starts in a few tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import os
import queue
import select
import shutil
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

from nbdist import shipping
from nbdist.jobdir import JOB_ID, JobDir, host_copy, host_dir
from nbdist.launch.local import Launch, Rendezvous
from nbdist.launch.relay import TO_HOSTS, Mirror, Sink, Wire
from nbdist.protocol import (VERSION, Exit, Fail, Hello, Kill, Message, Modules, Port,
                             PostTask, ProtocolError, Ready, Signal, Start, VersionMismatch)

SCAN_FAST = 0.002  # seconds between scans right after something happened ...
SCAN_IDLE = 0.02  # ... growing to this while nothing does (events ring the bell anyway)
ORPHAN_AGE = 3600.0  # seconds after which a folder without a relay.pid is one too
LINK_SILENCE = 60.0  # seconds without a message from the caller (it pings every 5 s)


class Relay:
    def __init__(self, wire: Wire, hello: Hello):
        self.wire = wire
        self.hello = hello
        self.spec = hello.spec  # with the sent modules' folders on sys.path once they came
        # per machine: on a shared filesystem only this machine's relays are judged here
        root = host_dir() / socket.gethostname()
        root.mkdir(mode=0o700, exist_ok=True)
        _remove_orphans(root)
        self.folder = JobDir(root / host_copy(hello.job, hello.index))
        self.folder.path.mkdir(mode=0o700)
        self.folder.relay_pid.write_text(str(os.getpid()))
        self.tasks: dict[str, JobDir] = {}  # a pool's task folders, by task id
        self.posted: str | None = None  # the task posted last (its folder goes with the next)
        self._tasks_lock = threading.Lock()  # the reader thread makes them
        self.launch: Launch | None = None
        self.mirror = Mirror(wire)
        self.mirror.watch("", self.folder.path)
        self.sink = Sink(self._folder_of, accept=TO_HOSTS)
        self.inbox: queue.Queue = queue.Queue()
        self._knock, self._knocked = os.pipe()  # the reader thread wakes the loop with it
        os.set_blocking(self._knock, False)
        os.set_blocking(self._knocked, False)  # a full pipe has a wake-up pending already
        self.last_heard = time.monotonic()  # the caller pings every few seconds
        self.failure: str | None = None  # said to the caller instead of an exit code
        self.address = _my_address(hello.host, hello.via)

    # --- set-up ----------------------------------------------------------------------
    def prepare(self) -> None:
        self.wire.send(Ready(host=socket.gethostname(), pid=os.getpid(), address=self.address))

    def add_modules(self, body: bytes) -> bool:
        """The caller's own modules (``shipping.py``): on the ranks' ``sys.path``, each
        just after the folder it came from. False if they cannot be (the caller is
        told why: a full disk, say)."""
        try:
            roots = shipping.unpack(body, self.folder.modules)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the host cannot run
            self.failure = (f"the caller's modules could not be written into "
                            f"{self.folder.path}: {type(exc).__name__}: {exc}")
            self.wire.send(Fail(self.failure))
            return False
        if roots:
            self.spec = dataclasses.replace(self.spec, sys_path=tuple(
                shipping.with_sent(list(self.spec.sys_path), roots)))
        return True

    def start(self, message: Start) -> None:
        hello, spec = self.hello, self.spec
        self.folder.write_spec(spec)
        port = message.port or _free_port()
        if not message.port:
            self.wire.send(Port(address=self.address, port=port))
        env = spec.environment(os.environ)
        env["NBDIST_HOST"] = hello.host
        interface = _interface_of(self.address)
        if interface and env.get("GLOO_SOCKET_IFNAME") is None:
            # gloo's sockets on the interface the caller reached this host through,
            # not on whatever the host name resolves to (127.0.1.1 on many distributions)
            env["GLOO_SOCKET_IFNAME"] = interface
        rendezvous = Rendezvous(nnodes=hello.nhosts, host=message.address or self.address,
                                port=port, id=hello.job, is_host=hello.index == 0,
                                local_addr=self.address)
        print(f"relay {os.getpid()} on {socket.gethostname()}: torchrun for host "
              f"{hello.index + 1} of {hello.nhosts}, rendezvous {rendezvous.host}:{port}"
              f"{' (its store is here)' if rendezvous.is_host else ''}, gloo on "
              f"{env.get('GLOO_SOCKET_IFNAME', 'the default interface')}", file=sys.stderr,
              flush=True)
        self.launch = Launch(self.folder, spec, env=env, rendezvous=rendezvous, output=2)
        self.launch.watch(self._knock)

    # --- messages from the caller ------------------------------------------------------
    def read_messages(self) -> None:
        """The reader thread: files are written here, everything else queued in order."""
        try:
            while True:
                message = self.wire.receive()
                if message is None:
                    break
                self.last_heard = time.monotonic()
                if isinstance(message, Modules):  # before Start: the ranks find them
                    if not self.add_modules(message.body):
                        break
                elif not self.sink.apply(message):
                    self._queue(message)
        except (OSError, ValueError) as exc:  # ProtocolError is a ValueError
            print(f"[nbdist relay] reading from the caller failed: {exc}", file=sys.stderr)
        self._queue(None)  # the link is gone

    def _queue(self, message: Message | None) -> None:
        self.inbox.put(message)
        with contextlib.suppress(BlockingIOError):
            os.write(self._knocked, b"\0")

    def handle(self, message: Message) -> bool:
        """Carry out one message; False when it says to end."""
        if isinstance(message, Start):
            self.start(message)
        elif isinstance(message, PostTask):
            self.post(message)
        elif isinstance(message, Signal) and self.launch is not None:
            self.launch.signal(signal.Signals(message.signal))
        elif isinstance(message, Kill):
            return False
        return True  # a ping, or a message of the caller's that needs no answer

    def post(self, message: PostTask) -> None:
        """A pool's next task (its payload arrived before this), or its stop."""
        key = message.task
        with self._tasks_lock:
            task = self.tasks.get(key) if key else None
        if key and task is None:
            print(f"relay: task {key} came without its payload; ignored", file=sys.stderr)
            return
        # the task posted before this one is over; a payload the reader thread wrote
        # meanwhile for a later post is not
        done, self.posted = self.posted, key
        if task is not None:
            self.mirror.watch(key, task.path)
        if done is not None:
            self.mirror.forget(done)  # the previous task: its last output is sent
            with self._tasks_lock:
                folder = self.tasks.pop(done, None)
            if folder is not None:
                shutil.rmtree(folder.path, ignore_errors=True)
        if self.launch is not None:
            self.launch.post(task, message.return_all, stop=message.stop)

    def _folder_of(self, key: str) -> Path:
        if not key:
            return self.folder.path
        if not JOB_ID.fullmatch(key):
            raise KeyError(key)
        with self._tasks_lock:
            if key not in self.tasks:  # a pool's task: inside the pool's folder
                task = self.folder.task_folder(key)
                task.path.mkdir(mode=0o700, parents=True, exist_ok=True)
                self.tasks[key] = task
            return self.tasks[key].path

    # --- the loop ----------------------------------------------------------------------
    def serve(self) -> int:
        """Until torchrun ends or the caller says (or its link) goes: the exit code."""
        wait = SCAN_FAST
        while True:
            self._sleep(wait)
            busy = False
            while not self.inbox.empty():
                message = self.inbox.get_nowait()
                if message is None or not self.handle(message):
                    return -1
                busy = True
            if time.monotonic() - self.last_heard > LINK_SILENCE:
                print(f"relay: nothing from the caller for {LINK_SILENCE:.0f}s: taking it "
                      f"for gone", file=sys.stderr, flush=True)
                return -1
            busy |= self.mirror.scan()
            if self.launch is not None and self.launch.poll() is not None:
                self.mirror.scan()  # what the ranks wrote last
                return self.launch.poll()
            wait = SCAN_FAST if busy else min(SCAN_IDLE, wait * 2)

    def _sleep(self, seconds: float) -> None:
        """Until a message comes, a rank rings, torchrun ends, or ``seconds`` pass."""
        if self.launch is not None:
            self.launch.wait(seconds)
        else:
            select.select([self._knock], [], [], seconds)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._knock, 4096):
                pass

    def close(self) -> None:
        if self.launch is not None:
            self.launch.kill()
        with contextlib.suppress(OSError, ValueError):
            self.mirror.scan()
        shutil.rmtree(self.folder.path, ignore_errors=True)  # a pool's tasks inside
        for fd in (self._knock, self._knocked):
            os.close(fd)


def _remove_orphans(root: Path) -> None:
    """Folders of relays that died without cleaning up (SIGKILL, a reboot)."""
    for folder in root.iterdir():
        try:
            pid = int(JobDir(folder).relay_pid.read_text())
        except (OSError, ValueError):  # being made by a relay starting now, or broken
            with contextlib.suppress(OSError):
                if time.time() - folder.stat().st_mtime > ORPHAN_AGE:
                    shutil.rmtree(folder, ignore_errors=True)
            continue
        try:
            alive = b"nbdist._remote" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            alive = False
        if not alive:
            shutil.rmtree(folder, ignore_errors=True)


def _mismatch(hello: Hello) -> str | None:
    """Why this host cannot run the caller's job, if it cannot."""
    import nbdist

    here = tuple(sys.version_info[:2])  # the version itself: decode_message checked it
    if tuple(hello.python) != here:
        return (f"{sys.executable} is Python {here[0]}.{here[1]} here, the caller runs "
                f"{hello.python[0]}.{hello.python[1]}: pickled functions need the "
                f"same Python version on every host")
    if hello.nbdist != nbdist.__version__:
        return (f"nbdist {nbdist.__version__} is installed here, the caller runs "
                f"{hello.nbdist}: install the same version on every host")
    return None


def _version_mismatch(version: object) -> str:
    import nbdist

    said = ("an nbdist before 0.2 (no protocol version)" if version is None
            else f"nbdist's protocol version {version}")
    return (f"the caller speaks {said}, this host's nbdist {nbdist.__version__} version "
            f"{VERSION}: install the same nbdist on every host")


def _my_address(label: str, via: str) -> str:
    """This host's address, as the other hosts reach it.

    ssh: the address the caller's connection reached (the session's own end). Slurm:
    the node's name as resolved here, unless that is a loopback address (Debian maps
    its own name to 127.0.1.1) while srun ran on another machine: then the address
    this node uses toward that machine.
    """
    connection = os.environ.get("SSH_CONNECTION", "").split()
    if via == "ssh" and len(connection) == 4:
        return connection[2]
    name = label.rpartition("@")[2]
    try:
        resolved = socket.gethostbyname(name)
    except OSError:
        return name
    launched_from = os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "")
    if (via == "slurm" and launched_from and ipaddress.ip_address(resolved).is_loopback
            and not ipaddress.ip_address(launched_from).is_loopback):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((launched_from, 9))  # no packet is sent: just the route's source
            return s.getsockname()[0]
    return resolved


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _interface_of(address: str) -> str | None:
    """The network interface whose IPv4 network holds ``address``, if this host has one
    (the address itself, or another of its network: 127.0.0.2 is on ``lo``)."""
    try:
        wanted = _as_int(socket.inet_aton(socket.gethostbyname(address)))
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            with contextlib.suppress(OSError):
                own = _as_int(fcntl.ioctl(s.fileno(), 0x8915, request)[20:24])  # SIOCGIFADDR
                mask = _as_int(fcntl.ioctl(s.fileno(), 0x891B, request)[20:24])  # ...NETMASK
                # all of 127.0.0.0/8 is this host's, the rest only where assigned
                loopback = ipaddress.IPv4Address(own).is_loopback
                if own == wanted or (loopback and own & mask == wanted & mask):
                    return name
    return None


def _as_int(packed: bytes) -> int:
    return int.from_bytes(packed, "big")


def main() -> int:
    # stdout is the link's alone: whatever else writes to fd 1 (C code too) lands in
    # stderr, which the caller logs
    link = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    wire = Wire(sys.stdin.buffer, link)
    try:
        hello = wire.receive()
    except VersionMismatch as exc:  # a newer (or older) caller: say which versions
        wire.send(Fail(_version_mismatch(exc.version)))
        return 1
    except ProtocolError as exc:  # another nbdist's caller, or not nbdist at all
        hello = exc
    if hello is None:
        return 1
    if not isinstance(hello, Hello):
        wire.send(Fail(f"the caller's first message must be the job (protocol version "
                       f"{VERSION}); got {hello}: install the same nbdist on every host"))
        return 1
    mismatch = _mismatch(hello)
    if mismatch:
        wire.send(Fail(mismatch))
        return 1
    relay = Relay(wire, hello)
    # SIGINT stays as it is, inherited by torchrun and the ranks as on one machine
    for hangup in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(hangup, lambda *_: sys.exit(1))
    code = -1
    try:
        relay.prepare()
        threading.Thread(target=relay.read_messages, daemon=True, name="nbdist-link").start()
        code = relay.serve()
    finally:
        relay.close()
    print(f"relay {os.getpid()}: torchrun ended with {code}; received "
          f"{wire.received} bytes from the caller", file=sys.stderr, flush=True)
    if relay.failure is None:  # else the caller has its "fail" and takes the host as lost
        with contextlib.suppress(OSError, ValueError):
            wire.send(Exit(code))
    return 0


if __name__ == "__main__":
    status = main()
    sys.stderr.flush()
    os._exit(status)
