"""Every record and message of protocol.py survives its own encoder and decoder.

The message table is checked against ``protocol._MESSAGES``: a message added there
without an instance here fails ``test_every_message_is_tested``.
"""

from __future__ import annotations

import json
import pickle

import pytest

from nbdist import protocol
from nbdist.protocol import (VERSION, Append, Chunk, End, ErrorRecord, Event, Exit, Fail,
                             Heartbeat, Hello, Kill, Metrics, Modules, Ping, Port, Post,
                             PostTask, Progress, ProtocolError, RankExit, Ready, Signal,
                             Spec, Start, Status, decode_event, decode_exits,
                             decode_message, encode_event, encode_exits, encode_message,
                             message_size)
from nbdist.states import RankState

SPEC = Spec(ranks_per_host=2, world_size=4, backend="gloo", device="cpu", cwd="/home/u/nb",
            sys_path=("/home/u/nb", "/opt/lib"), env_defaults={"OMP_NUM_THREADS": "1"},
            env_overrides={"CUDA_VISIBLE_DEVICES": "0,1"}, return_all=True, caller_pid=123,
            pool=True)


# --- records -------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [SPEC, Spec(1, 1, "nccl", "cuda", "/", ())],
                         ids=["every-field", "defaults"])
def test_spec_round_trip(spec):
    assert Spec.decode(spec.encode()) == spec
    assert Spec.decode(spec.encode().decode()) == spec  # read as text too


def test_spec_environment_machine_between_defaults_and_overrides():
    env = SPEC.environment({"OMP_NUM_THREADS": "8", "CUDA_VISIBLE_DEVICES": "3"})
    assert env == {"OMP_NUM_THREADS": "8", "CUDA_VISIBLE_DEVICES": "0,1"}


@pytest.mark.parametrize("post", [Post(1, "/jobs/a"), Post(7, "/jobs/b", return_all=True),
                                  Post(9, None, stop=True)])
def test_post_round_trip(post):
    line = post.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert Post.decode(line) == post


def test_post_latest_takes_the_newest_complete_line_and_keeps_the_partial_one():
    data = Post(1, "/a").encode() + Post(3, "/c").encode() + Post(2, "/b").encode()
    partial = Post(4, "/d").encode()[:10]
    post, rest = Post.latest(data + partial)
    assert post == Post(3, "/c")
    assert rest == partial
    # the rest, completed by the next read, is a post of its own
    post, rest = Post.latest(rest + Post(4, "/d").encode()[10:])
    assert (post, rest) == (Post(4, "/d"), b"")


def test_post_latest_of_nothing_complete():
    assert Post.latest(b"") == (None, b"")
    assert Post.latest(b'{"seq":') == (None, b'{"seq":')


EVENT_BODIES = [
    Status(RankState.STARTING, pid=4321, host="gpu1"),
    Status(RankState.FAILED, exitcode=1, error="ValueError"),
    Status(RankState.DONE),
    Progress(bar=2, desc="epoch", n=3, total=10),
    Progress(bar=0, closed=True),
    Metrics({"loss": 0.25, "acc": 0.9, "tag": "x"}, step=5),
    Heartbeat(),
]


@pytest.mark.parametrize("body", EVENT_BODIES, ids=lambda b: type(b).__name__)
def test_event_round_trip_keeps_rank_time_and_body(body):
    line = encode_event(body, at=1234.5)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    event = decode_event(3, line)
    assert event == Event(rank=3, time=1234.5, body=body)
    assert event.kind == body.kind
    if isinstance(body, Status):
        assert type(event.body.state) is RankState  # a member, not a bare string


def test_every_event_kind_is_tested():
    assert {type(b) for b in EVENT_BODIES} == set(protocol._BODIES.values())


def test_metrics_values_with_item_are_written_as_numbers():
    class Scalar:  # what a tensor or a numpy scalar looks like to the encoder
        def item(self):
            return 0.5

    event = decode_event(0, encode_event(Metrics({"loss": Scalar()}), at=1.0))
    assert event.body.values == {"loss": 0.5}


@pytest.mark.parametrize("line", [
    b'{"kind": "rich-display", "time": 1.0, "data": {}}\n',  # a newer rank's kind
    b'{"kind": "status", "time": 1.0, "state": "teleported"}\n',  # a state unknown here
    b'{"kind": "status", "state": "done"}\n',  # no time
    b'{"kind": "progress", "time": "soon", "bar": 0}\n',
    b'{"kind": "progress", "time": 1.0}\n',  # a required field missing
    b'{"kind": "sta',  # torn
    b"not json at all\n",
    b"[1, 2]\n",
], ids=["unknown-kind", "unknown-state", "no-time", "bad-time", "missing-field", "torn",
        "garbage", "a-list"])
def test_a_line_this_version_cannot_read_decodes_to_none(line):
    assert decode_event(0, line) is None


def test_unknown_fields_of_a_known_kind_are_ignored():
    line = b'{"kind": "status", "time": 2.0, "state": "ready", "gpu_temp": 71}\n'
    assert decode_event(1, line) == Event(1, 2.0, Status(RankState.READY))


@pytest.mark.parametrize("line", [b"3\n", b"true\n", b"null\n"])
def test_a_json_line_that_is_not_an_object_decodes_to_none(line):
    assert decode_event(0, line) is None


def error_record(**changes) -> ErrorRecord:
    exc = ValueError("bad input")
    fields = dict(rank=1, host="gpu2", pid=4321, time=1700000000.25,
                  type="builtins.ValueError", message="bad input",
                  traceback="Traceback (most recent call last):\nValueError: bad input\n",
                  exception=pickle.dumps(exc), collective=False)
    return ErrorRecord(**{**fields, **changes})


@pytest.mark.parametrize("record", [error_record(), error_record(exception=None,
                                                                 collective=True)],
                         ids=["with-exception", "without"])
def test_error_record_round_trip(record):
    back = ErrorRecord.decode(record.encode())
    assert back == record
    assert back.type_name == "ValueError"


def test_rank_exits_round_trip():
    exits = {0: RankExit(exitcode=-9, pid=11, local_rank=0, timestamp=1700000000),
             3: RankExit(exitcode=1, pid=14, local_rank=1, timestamp=1700000001)}
    assert decode_exits(encode_exits(exits)) == exits
    assert decode_exits(b"") == {}  # an agent that wrote nothing yet


# --- the caller <-> relay wire --------------------------------------------------------
MESSAGES = [
    Hello(version=VERSION, job="20240101-120000-000-abcd", index=1, host="user@gpu2",
          nhosts=2, spec=SPEC, python=(3, 11), nbdist="0.1.0", via="ssh"),
    Modules(body=b"\x78\x9c compressed sources \x00\xff"),
    Modules(),
    Start(),
    Start(port=29500, address="10.0.0.1"),
    PostTask(task="20240101-120001-000-beef", return_all=True),
    PostTask(stop=True),
    Signal(signal=10),
    Kill(),
    Ping(),
    Ready(host="gpu2", pid=999, address="10.0.0.2"),
    Port(address="10.0.0.1", port=29500),
    Exit(code=-1),
    Fail(reason="nbdist 0.2 is installed here, the caller runs 0.1.0"),
    Chunk(key="", name="payload.pt", offset=1 << 20, body=bytes(range(256)) * 3),
    End(key="20240101-120001-000-beef", name="payload.pt", total=3 << 20),
    Append(key="", name="rank-0.log", body="épique\r\n".encode()),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_round_trip(message):
    header, body = encode_message(message)
    assert header.endswith(b"\n") and header.count(b"\n") == 1
    assert message_size(header) == len(body)
    assert decode_message(header, body) == message


def test_every_message_is_tested():
    assert {type(m) for m in MESSAGES} == set(protocol._MESSAGES.values())


def test_hello_carries_the_protocol_version():
    header, _ = encode_message(MESSAGES[0])
    fields = json.loads(header)
    assert fields["op"] == "job" and fields["version"] == VERSION
    assert isinstance(decode_message(header, b"").python, tuple)


@pytest.mark.parametrize("header", [
    b"GET / HTTP/1.1\n",
    b'{"op": "job"}\n',  # no size
    b'"a string"\n',
    b"[1, 2]\n",
    b"",
], ids=["not-json", "no-size", "string", "list", "empty"])
def test_a_garbled_header_has_no_size(header):
    with pytest.raises(ProtocolError):
        message_size(header)


@pytest.mark.parametrize("header", [
    b'{"op": "teleport", "size": 0}\n',  # an op of another version
    b'{"size": 0}\n',
    b'{"op": "exit", "size": 0, "code": 0, "signal": 9}\n',  # a field of another version
    b'{"op": "job", "size": 0, "version": 1}\n',  # fields missing
    b"not json\n",
], ids=["unknown-op", "no-op", "unknown-field", "missing-fields", "not-json"])
def test_a_message_of_another_version_raises_protocol_error(header):
    with pytest.raises(ProtocolError, match=f"protocol version {VERSION}"):
        decode_message(header, b"")


class _GraphTensor:
    """Stands in for a loss tensor of the autograd graph: no deep copy, a .item()."""

    def __deepcopy__(self, memo):
        raise RuntimeError("Only Tensors created explicitly by the user support deepcopy")

    def item(self) -> float:
        return 0.25


def test_metrics_encode_what_cannot_be_copied():
    import threading

    line = encode_event(Metrics({"loss": _GraphTensor(), "lock": threading.Lock()}, 3), 1.0)
    event = decode_event(0, line)
    assert event.body.values["loss"] == 0.25 and "lock" in event.body.values["lock"]
