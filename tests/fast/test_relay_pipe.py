"""A host's relay and the file mirror, over pipes: no ssh, no torchrun.

The relay runs as ``python -m nbdist._remote`` with its stdin and stdout on pipes, as
ssh would give them; nothing here sends ``Start`` (that would start torchrun). The
Wire / Mirror / Sink trio runs in-process over ``os.pipe``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import nbdist
from nbdist import shipping
from nbdist.jobdir import write_bytes_atomic
from nbdist.launch.relay import CHUNK, FROM_HOSTS, TO_HOSTS, Mirror, Sink, Wire
from nbdist.protocol import (VERSION, Append, Chunk, End, Exit, Fail, Hello, Kill, Modules,
                             Ping, PostTask, RankExit, Ready, Status, decode_exits,
                             encode_event, encode_exits, encode_message)
from nbdist.states import RankState

from .fakes import make_spec

ROOT = Path(__file__).resolve().parents[2]  # the checkout: the relay imports this nbdist
JOB = "20240101-120000-000-abcd"
TASK = "20240101-120001-000-beef"
ANSWER = 10.0  # seconds the relay gets to answer (it answers in milliseconds)


def hello(**changes) -> Hello:
    fields = dict(version=VERSION, job=JOB, index=0, host="localhost", nhosts=1,
                  spec=make_spec(pool=True), python=tuple(sys.version_info[:2]),
                  nbdist=nbdist.__version__, via="ssh")
    return Hello(**{**fields, **changes})


class Relay:
    """``python -m nbdist._remote`` on a pair of pipes, and our end of its wire."""

    def __init__(self, home: str, log: Path):
        env = {k: v for k, v in os.environ.items() if k != "SSH_CONNECTION"}
        env.update(NBDIST_HOME=home, PYTHONPATH=str(ROOT))
        self.log = log
        with open(log, "wb") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-m", "nbdist._remote", JOB],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=stderr, env=env)
        self.wire = Wire(self.proc.stdout, self.proc.stdin)
        self.folder = Path(home) / "hosts" / socket.gethostname() / f"{JOB}@0"

    def send(self, message) -> None:
        self.wire.send(message)

    def receive(self):
        """The relay's next message (None: it closed its end), or fail the test."""
        got: list = []
        reader = threading.Thread(target=lambda: got.append(self.wire.receive()), daemon=True)
        reader.start()
        reader.join(ANSWER)
        if reader.is_alive():
            self.proc.kill()
            pytest.fail(f"the relay said nothing for {ANSWER}s; its stderr:\n"
                        f"{self.log.read_text()}")
        return got[0]

    def ended(self) -> int:
        """Its exit code, once it closed its end of the wire."""
        assert self.receive() is None
        return self.proc.wait(ANSWER)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(ANSWER)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture
def relay(nbdist_home, tmp_path):
    relay = Relay(nbdist_home, tmp_path / "relay-stderr.log")
    yield relay
    relay.close()


def eventually(check, what: str) -> None:
    deadline = time.monotonic() + ANSWER
    while not check():
        assert time.monotonic() < deadline, f"not within {ANSWER}s: {what}"
        time.sleep(0.01)


# --- what the relay refuses ------------------------------------------------------------
def refused(relay) -> str:
    """The relay's Fail reason; it then exits 1 without making its folder."""
    message = relay.receive()
    assert isinstance(message, Fail), message
    assert relay.ended() == 1
    assert not relay.folder.exists()
    return message.reason


def test_a_first_message_that_is_not_a_hello_is_refused(relay):
    relay.send(Ping())
    reason = refused(relay)
    assert f"first message must be the job (protocol version {VERSION})" in reason


def test_bytes_that_are_no_message_are_refused(relay):
    relay.proc.stdin.write(b"GET / HTTP/1.1\r\n\r\n")
    relay.proc.stdin.flush()
    assert f"protocol version {VERSION}" in refused(relay)


def test_a_hello_of_another_protocol_version_is_refused_naming_both(relay):
    relay.send(hello(version=VERSION + 1))
    reason = refused(relay)
    assert f"protocol version {VERSION + 1}" in reason
    assert f"version {VERSION}:" in reason


def test_a_newer_hello_with_a_new_field_is_refused_naming_both_versions(relay):
    header, body = encode_message(hello(version=VERSION + 1))
    header = header.replace(b'"via":"ssh"', b'"via":"ssh","gpus_per_host":8')
    relay.proc.stdin.write(header + body)
    relay.proc.stdin.flush()
    assert f"protocol version {VERSION + 1}" in refused(relay)


def test_a_hello_of_another_nbdist_is_refused(relay):
    relay.send(hello(nbdist="0.0.1"))
    reason = refused(relay)
    assert f"nbdist {nbdist.__version__} is installed here, the caller runs 0.0.1" in reason


def test_a_hello_of_another_python_is_refused(relay):
    relay.send(hello(python=(2, 7)))
    assert "the caller runs 2.7" in refused(relay)


# --- a relay that accepted the job -------------------------------------------------------
def ready(relay) -> Ready:
    relay.send(hello())
    message = relay.receive()
    assert isinstance(message, Ready), message
    return message


def test_a_good_hello_gets_ready_and_a_private_folder(relay):
    message = ready(relay)
    assert (message.host, message.pid) == (socket.gethostname(), relay.proc.pid)
    assert message.address  # where the other hosts reach it
    assert (relay.folder / "relay.pid").read_text() == str(relay.proc.pid)
    assert relay.folder.stat().st_mode & 0o777 == 0o700


def test_modules_and_the_payload_land_in_the_relay_folder_then_kill_removes_it(relay):
    ready(relay)
    relay.send(shipping_modules({"helper_mod.py": b"X = 1\n", "pkg/__init__.py": b""}))
    data = os.urandom(CHUNK + 1000)  # two chunks
    relay.send(Chunk("", "payload.pt", 0, data[:CHUNK]))
    relay.send(Chunk("", "payload.pt", CHUNK, data[CHUNK:]))
    relay.send(End("", "payload.pt", len(data)))
    relay.send(Chunk(TASK, "payload.pt", 0, b"task payload"))  # a pool's task
    relay.send(End(TASK, "payload.pt", 12))
    payload = relay.folder / "payload.pt"
    task_payload = relay.folder / "tasks" / TASK / "payload.pt"
    eventually(lambda: payload.exists() and task_payload.exists(), "the payloads landed")
    assert payload.read_bytes() == data  # whole: it appears by rename
    assert task_payload.read_bytes() == b"task payload"
    assert (relay.folder / "modules" / "0" / "helper_mod.py").read_bytes() == b"X = 1\n"
    assert (relay.folder / "modules" / "0" / "pkg" / "__init__.py").exists()
    relay.send(Kill())
    assert relay.receive() == Exit(-1)  # torchrun never ran: stopped by the relay
    assert relay.ended() == 0
    assert not relay.folder.exists()


def test_the_caller_closing_the_link_ends_the_relay_and_removes_its_folder(relay):
    ready(relay)
    assert relay.folder.exists()
    relay.proc.stdin.close()
    assert relay.receive() == Exit(-1)
    assert relay.ended() == 0
    assert not relay.folder.exists()


def test_a_file_the_caller_may_not_send_ends_the_link(relay):
    ready(relay)
    relay.send(Chunk("", "entry.py", 0, b"import os; os.system('rm -rf ~')"))
    relay.send(End("", "entry.py", 33))
    assert relay.receive() == Exit(-1)
    assert relay.ended() == 0
    assert not relay.folder.exists()
    assert "unexpected file from the other end" in relay.log.read_text()


def test_modules_that_cannot_be_written_fail_the_host(relay):
    ready(relay)
    relay.send(Modules(b"not compressed sources"))
    message = relay.receive()
    assert isinstance(message, Fail), message
    assert "the caller's modules could not be written" in message.reason
    assert relay.ended() == 0  # no Exit after a Fail: the caller takes the host as lost
    assert not relay.folder.exists()


def test_a_relay_removes_the_folders_of_relays_that_died(nbdist_home, tmp_path):
    machine = Path(nbdist_home) / "hosts" / socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()  # a pid no process has now
    orphan, not_a_relay = machine / f"{TASK}@0", machine / f"{TASK}@1"
    for folder, pid in ((orphan, dead.pid), (not_a_relay, os.getpid())):
        folder.mkdir(parents=True)
        (folder / "relay.pid").write_text(str(pid))
    relay = Relay(nbdist_home, tmp_path / "relay-stderr.log")
    try:
        ready(relay)
        assert not orphan.exists()
        # a live process, but no relay: its folder is an orphan too
        assert not not_a_relay.exists()
    finally:
        relay.close()


def shipping_modules(files: dict[str, bytes]) -> Modules:
    return Modules(shipping.pack([(0, path, source) for path, source in files.items()]))


# --- Wire, Mirror and Sink in this process ------------------------------------------------
class Loop:
    """A wire over one os.pipe (what it sends, it receives), read by a thread that
    writes files into ``sink`` and keeps the messages, split at each :meth:`mark`."""

    def __init__(self, sink: Sink | None):
        read, write = os.pipe()
        self.wire = Wire(os.fdopen(read, "rb"), os.fdopen(write, "wb"))
        self.sink = sink
        self.messages: list = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while (message := self.wire.receive()) is not None:
                self.messages.append(message)
                if self.sink is not None:
                    self.sink.apply(message)
        except BaseException as exc:  # the test says so, not the thread
            self.error = exc

    def mark(self) -> None:
        self.wire.send(Ping())

    def close(self) -> list[list]:
        """Wait for everything sent; the messages between marks."""
        self.wire._writer.close()
        self._thread.join(ANSWER)
        self.wire._reader.close()
        assert self.error is None, self.error
        scans: list[list] = [[]]
        for message in self.messages:
            if isinstance(message, Ping):
                scans.append([])
            else:
                scans[-1].append((type(message).__name__, message.name))
        return scans


def caller_sink(folder: Path, **options) -> Sink:
    def folder_of(key: str) -> Path:
        if key:
            raise KeyError(key)
        return folder
    return Sink(folder_of, accept=FROM_HOSTS, **options)


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_mirror_sends_what_grows_and_appears_with_the_events_last(tmp_path):
    host, caller = tmp_path / "host", tmp_path / "caller"
    host.mkdir()
    caller.mkdir()
    loop = Loop(caller_sink(caller))
    mirror = Mirror(loop.wire)
    mirror.watch("", host)
    line = {s: encode_event(Status(s), at=1.0) for s in (RankState.RUNNING, RankState.DONE)}

    (host / "spec.json").write_text("{}")  # stays on the host
    (host / "payload.pt").write_bytes(b"sent by the caller")
    append(host / "rank-0.log", b"epoch 1\n")
    append(host / "events-rank-0.jsonl", line[RankState.RUNNING])
    assert mirror.scan()
    loop.mark()
    append(host / "rank-0.log", b"epoch 2\n")
    write_bytes_atomic(host / "result-rank-0.pt", b"the result")
    write_bytes_atomic(host / "error-rank-1.pkl", b"an error record")
    append(host / "events-rank-0.jsonl", line[RankState.DONE])
    assert mirror.scan()
    loop.mark()
    assert not mirror.scan()  # nothing new
    scans = loop.close()

    assert scans[0] == [("Append", "rank-0.log"), ("Append", "events-rank-0.jsonl")]
    assert scans[1][-1] == ("Append", "events-rank-0.jsonl")  # after what it announces
    assert sorted(scans[1][:-1]) == sorted([
        ("Append", "rank-0.log"), ("Chunk", "error-rank-1.pkl"), ("End", "error-rank-1.pkl"),
        ("Chunk", "result-rank-0.pt"), ("End", "result-rank-0.pt")])
    assert scans[2] == []
    assert (caller / "rank-0.log").read_bytes() == b"epoch 1\nepoch 2\n"
    assert (caller / "events-rank-0.jsonl").read_bytes() == (
        line[RankState.RUNNING] + line[RankState.DONE])
    assert (caller / "result-rank-0.pt").read_bytes() == b"the result"
    assert (caller / "error-rank-1.pkl").read_bytes() == b"an error record"
    assert sorted(os.listdir(caller)) == [  # nothing else, no partial file left
        "error-rank-1.pkl", "events-rank-0.jsonl", "rank-0.log", "result-rank-0.pt"]


def test_a_record_larger_than_a_chunk_arrives_whole_and_a_rewrite_is_sent_again(tmp_path):
    host, caller = tmp_path / "host", tmp_path / "caller"
    host.mkdir()
    caller.mkdir()
    loop = Loop(caller_sink(caller))
    mirror = Mirror(loop.wire)
    mirror.watch("", host)
    big = os.urandom(2 * CHUNK + 5)
    write_bytes_atomic(host / "result-rank-0.pt", big)
    mirror.scan()
    loop.mark()
    write_bytes_atomic(host / "result-rank-0.pt", b"rewritten")
    mirror.scan()
    scans = loop.close()
    assert scans[0] == [("Chunk", "result-rank-0.pt")] * 3 + [("End", "result-rank-0.pt")]
    assert scans[1] == [("Chunk", "result-rank-0.pt"), ("End", "result-rank-0.pt")]
    assert (caller / "result-rank-0.pt").read_bytes() == b"rewritten"


def test_failures_json_of_two_hosts_merge(tmp_path):
    caller = tmp_path / "caller"
    caller.mkdir()
    merge_lock = threading.Lock()
    exits = {0: RankExit(exitcode=-9, pid=11, local_rank=0, timestamp=1700000000),
             1: RankExit(exitcode=-15, pid=12, local_rank=1, timestamp=1700000001),
             2: RankExit(exitcode=-15, pid=21, local_rank=0, timestamp=1700000001)}
    hosts = {0: {0: exits[0], 1: exits[1]}, 1: {2: exits[2]}}
    loops = []
    for index, own in hosts.items():
        folder = tmp_path / f"host{index}"
        folder.mkdir()
        write_bytes_atomic(folder / "failures.json", encode_exits(own))
        loop = Loop(caller_sink(caller, merge_lock=merge_lock, tag=str(index)))
        mirror = Mirror(loop.wire)
        mirror.watch("", folder)
        mirror.scan()
        loops.append(loop)
    for loop in loops:
        loop.close()
    assert decode_exits((caller / "failures.json").read_bytes()) == exits
    assert os.listdir(caller) == ["failures.json"]


@pytest.mark.parametrize("message", [
    Chunk("", "entry.py", 0, b"x"),  # not a file the ranks write
    Append("", "../rank-0.log", b"x"),
    Chunk("other-job", "rank-0.log", 0, b"x"),  # a folder the caller does not know
], ids=["entry", "escape", "unknown-key"])
def test_a_sink_refuses_files_it_does_not_expect(tmp_path, message):
    sink = caller_sink(tmp_path)
    with pytest.raises(ValueError, match="unexpected file"):
        sink.apply(message)
    assert os.listdir(tmp_path) == []


def test_a_host_sink_takes_only_the_payload(tmp_path):
    sink = Sink(lambda key: tmp_path, accept=TO_HOSTS)
    assert sink.apply(Chunk("", "payload.pt", 0, b"abc"))
    assert sink.apply(End("", "payload.pt", 3))
    assert not sink.apply(Ping())  # not a file message: the caller handles it
    assert (tmp_path / "payload.pt").read_bytes() == b"abc"
    with pytest.raises(ValueError):
        sink.apply(Append("", "rank-0.log", b"x"))


def test_an_empty_file_arrives_as_its_end_alone(tmp_path):
    sink = caller_sink(tmp_path)
    sink.apply(End("", "result-rank-0.pt", 0))
    assert (tmp_path / "result-rank-0.pt").read_bytes() == b""


def test_wire_receives_what_was_sent_then_none_once_the_other_end_closed():
    read, write = os.pipe()
    wire = Wire(os.fdopen(read, "rb"), os.fdopen(write, "wb"))
    body = pickle.dumps({"x": list(range(100))})
    wire.send(Chunk("", "result-rank-0.pt", 0, body))
    wire._writer.close()
    assert wire.receive() == Chunk("", "result-rank-0.pt", 0, body)
    assert wire.receive() is None  # the other end closed
    assert wire.received > len(body)
    wire._reader.close()



FIRST, SECOND = "20240101-120001-000-0001", "20240101-120002-000-0002"


@contextlib.contextmanager
def host_relay():
    """A relay's Relay object in this process, its wire's output read by a Loop (no
    Start, so no torchrun); yields (relay, loop); closes both, and checks the relay
    removed its folder."""
    from nbdist._remote import Relay as HostRelay

    loop = Loop(sink=None)
    with open(os.devnull, "rb") as nothing:
        host = HostRelay(Wire(nothing, loop.wire._writer), hello())
        try:
            yield host, loop
        finally:
            host.close()
            loop.close()
    assert not host.folder.path.exists()


def send_payload(host, task: str) -> None:
    host.sink.apply(Chunk(task, "payload.pt", 0, b"fn"))  # as the reader thread does
    host.sink.apply(End(task, "payload.pt", 2))


def test_the_relay_removes_a_pool_task_folder_once_its_last_output_was_sent(nbdist_home):
    with host_relay() as (host, loop):
        send_payload(host, FIRST)
        host.post(PostTask(task=FIRST))
        first = host.tasks[FIRST].path
        append(first / "rank-0.log", b"first's last words\n")  # written by its rank
        host.post(PostTask(task="20240101-120009-000-0009"))  # no payload: ignored
        assert first.exists()
        send_payload(host, SECOND)
        host.post(PostTask(task=SECOND))
        assert not first.exists() and FIRST not in host.tasks
        assert (host.tasks[SECOND].path / "payload.pt").exists()
    sent = [(m.key, m.body) for m in loop.messages if isinstance(m, Append)]
    assert sent == [(FIRST, b"first's last words\n")]


def test_a_payload_that_arrived_before_an_earlier_post_was_handled_is_kept(nbdist_home):
    with host_relay() as (host, loop):
        send_payload(host, FIRST)
        send_payload(host, SECOND)  # the reader thread ran ahead of the main loop
        host.post(PostTask(task=FIRST))
        host.post(PostTask(task=SECOND))
        assert SECOND in host.tasks and (host.tasks[SECOND].path / "payload.pt").exists()
