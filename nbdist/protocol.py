"""Every record and message that crosses a process, defined once, with its codec.

Standard library only: the ranks, torchrun's agent and a host's relay import it
before (or without) torch. Where each travels (``jobdir.py`` names the files)::

    caller ──spec.json───────────────────▶ every rank        Spec
    caller ──a line in rank N's FIFO─────▶ a pool's rank N   Post
    rank N ──events-rank-N.jsonl─────────▶ caller            Status · Progress · Metrics ·
                                                              Heartbeat (one JSON line each)
    rank N ──error-rank-N.pkl────────────▶ caller            ErrorRecord
    agent ───failures.json───────────────▶ caller            RankExit per rank
    caller ◀── a host's link (ssh / srun stdin+stdout) ──▶ relay (``_remote.py``)
       to the host:   Hello (first, versioned), Modules, Start, PostTask, Signal, Kill, Ping
       to the caller: Ready, Port, Exit, Fail
       both ways:     Chunk, End, Append (files, ``launch/relay.py``)

A record is a frozen dataclass with ``encode()`` and a ``decode()`` classmethod; a
wire message is one JSON header line (``op``, ``size`` and its fields) then ``size``
bytes of body. Between machines the :class:`Hello` carries :data:`VERSION`, and the
relay refuses a caller that speaks another. An event of a kind this version does not
know is skipped by its reader, so new kinds (rich displays, a debugger's prompt) can
be added without breaking an older reader.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Mapping

from nbdist.states import EventKind, RankState

VERSION = 1  # of the caller ↔ relay wire; bump on any change a relay could misread


class ProtocolError(ValueError):
    """Bytes that are not a record or message of this version."""


class VersionMismatch(ProtocolError):
    """A :class:`Hello` of another protocol version: its other fields may not be ours
    to read, so only the version is."""

    def __init__(self, version: Any):
        said = ("an nbdist before 0.2 (no protocol version)" if version is None
                else f"protocol version {version}")
        super().__init__(f"the caller speaks {said}, this end version {VERSION}")
        self.version = version


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# --- what the ranks start from ----------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """What every rank of a job or pool starts from (``spec.json``); also the core of a
    host's :class:`Hello`. ``ranks_per_host`` × hosts = ``world_size``."""

    ranks_per_host: int
    world_size: int
    backend: str
    device: str  # "cuda" | "cpu"
    cwd: str  # the caller's working directory: the ranks start there
    sys_path: tuple[str, ...]  # the caller's, made absolute: first on the ranks'
    env_defaults: Mapping[str, str] = field(default_factory=dict)  # yield to the machine's
    env_overrides: Mapping[str, str] = field(default_factory=dict)  # win over it
    return_all: bool = False
    caller_pid: int | None = None  # watched by the ranks where it is the caller's (one machine)
    pool: bool = False  # ranks serve tasks (``Post``) until told to stop

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """The ranks' environment on a machine whose own is ``base``."""
        return {**self.env_defaults, **base, **self.env_overrides}

    def encode(self) -> bytes:
        return _json(asdict(self))

    @classmethod
    def decode(cls, data: bytes | str) -> "Spec":
        return cls.from_fields(json.loads(data))

    @classmethod
    def from_fields(cls, fields: dict) -> "Spec":
        """The spec of its JSON fields (a spec.json, or a Hello's)."""
        return cls(**{**fields, "sys_path": tuple(fields["sys_path"])})


@dataclass(frozen=True)
class Post:
    """A pool's next task for every rank: its folder (``None`` with ``stop``: leave)."""

    seq: int
    task: str | None
    return_all: bool = False
    stop: bool = False

    def encode(self) -> bytes:
        """One line, written whole into a rank's FIFO (under PIPE_BUF: never torn)."""
        return _json(asdict(self)) + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> "Post":
        return cls(**json.loads(line))

    @classmethod
    def latest(cls, data: bytes) -> tuple["Post | None", bytes]:
        """The newest post among the complete lines of ``data``, and the rest."""
        *lines, rest = data.split(b"\n")
        posts = [cls.decode(line) for line in lines if line.strip()]
        return (max(posts, key=lambda p: p.seq) if posts else None), rest


# --- events: one JSON line each in events-rank-N.jsonl -----------------------------------
@dataclass(frozen=True)
class Status:
    """A rank's state changed; ``pid``/``host`` with its first event, ``exitcode`` and
    ``error`` (the exception's type name) with a failure."""

    kind: ClassVar[EventKind] = EventKind.STATUS
    state: RankState
    pid: int | None = None
    host: str | None = None
    exitcode: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class Progress:
    """A ``track()`` bar (or a tqdm bar) of a rank."""

    kind: ClassVar[EventKind] = EventKind.PROGRESS
    bar: int
    desc: str | None = None
    n: int = 0
    total: int | None = None
    closed: bool = False


@dataclass(frozen=True)
class Metrics:
    """``report()`` values; ``step`` counts the calls (the chart's x axis)."""

    kind: ClassVar[EventKind] = EventKind.METRICS
    values: Mapping[str, Any]
    step: int = 0


@dataclass(frozen=True)
class Heartbeat:
    """The rank is alive (every few seconds); shows nothing."""

    kind: ClassVar[EventKind] = EventKind.HEARTBEAT


EventBody = Status | Progress | Metrics | Heartbeat
_BODIES: dict[str, type] = {cls.kind: cls for cls in (Status, Progress, Metrics, Heartbeat)}


@dataclass(frozen=True)
class Event:
    """One line of a rank's events file, as its reader sees it."""

    rank: int
    time: float  # the rank's clock
    body: EventBody

    @property
    def kind(self) -> EventKind:
        return self.body.kind


def encode_event(body: EventBody, at: float | None = None) -> bytes:
    """The line a rank appends (with one ``write``, so never torn)."""
    # the fields as they are, not asdict's deep copies: report(loss=loss) hands in a
    # tensor of the autograd graph, which refuses to be copied (and JSON takes .item())
    fields = {f.name: getattr(body, f.name) for f in dataclasses.fields(body)}
    return json.dumps({"kind": body.kind, "time": time.time() if at is None else at,
                       **{k: v for k, v in fields.items() if v is not None}},
                      default=_jsonable).encode() + b"\n"


def _jsonable(value: Any) -> Any:
    # report(loss=tensor(0.3)) should just work: tensors and numpy scalars have .item()
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    return str(value)


def decode_event(rank: int, line: bytes) -> Event | None:
    """The event of one line; None for a line of a kind (or version) not known here."""
    try:
        fields = json.loads(line)
        if not isinstance(fields, dict):  # valid JSON, but no event (a torn or stray line)
            return None
        cls = _BODIES[fields.pop("kind")]
        at = float(fields.pop("time"))
        known = {f.name for f in dataclasses.fields(cls)}
        body = cls(**{k: v for k, v in fields.items() if k in known})
        if isinstance(body, Status):
            body = dataclasses.replace(body, state=RankState(body.state))
        return Event(rank, at, body)
    except (ValueError, KeyError, TypeError):
        return None


# --- records written whole, by rename --------------------------------------------------
@dataclass(frozen=True)
class ErrorRecord:
    """A rank's exception (``error-rank-N.pkl``): enough to re-raise it in the caller
    as its own type (``exception``, pickled with nbdist's pickler; None when it cannot
    travel) or else to describe it."""

    rank: int
    host: str
    pid: int
    time: float
    type: str  # "module.QualName"
    message: str
    traceback: str
    exception: bytes | None
    collective: bool  # a torch.distributed DistError: likely a peer's failure seen here

    @property
    def type_name(self) -> str:
        return self.type.rsplit(".", 1)[-1]

    def encode(self) -> bytes:
        return pickle.dumps(asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> "ErrorRecord":
        return cls(**pickle.loads(data))


@dataclass(frozen=True)
class RankExit:
    """How torchrun's agent saw one rank end (``failures.json``): what no rank can say
    about itself (a signal, ``os._exit``)."""

    exitcode: int
    pid: int
    local_rank: int
    timestamp: float  # whole seconds, as torch records it


def encode_exits(exits: Mapping[int, RankExit]) -> bytes:
    return json.dumps({str(rank): asdict(e) for rank, e in exits.items()}, indent=1).encode()


def decode_exits(data: bytes) -> dict[int, RankExit]:
    return {int(rank): RankExit(**e) for rank, e in json.loads(data or b"{}").items()}


# --- the caller ↔ relay wire -----------------------------------------------------------
@dataclass(frozen=True)
class Message:
    """A message on a host's link; subclasses name their ``op``."""

    op: ClassVar[str] = ""  # a message with a body declares ``body: bytes`` last

    def header(self) -> dict:
        fields = asdict(self)
        fields.pop("body", None)
        return {"op": self.op, **fields}


@dataclass(frozen=True)
class Hello(Message):
    """The job, the first message to a relay; refused unless ``version`` is ours."""

    op: ClassVar[str] = "job"
    version: int
    job: str
    index: int  # this host's place among the hosts
    host: str  # as the caller named it
    nhosts: int
    spec: Spec
    python: tuple[int, int]
    nbdist: str
    via: str  # "ssh" | "slurm"

    def header(self) -> dict:
        return {**super().header(), "spec": asdict(self.spec)}


@dataclass(frozen=True)
class Modules(Message):
    """The caller's own modules (``shipping.pack``), before ``Start``."""

    op: ClassVar[str] = "modules"
    body: bytes = b""


@dataclass(frozen=True)
class Start(Message):
    """Start torchrun; ``port`` None: this host holds the store and picks it."""

    op: ClassVar[str] = "start"
    port: int | None = None
    address: str | None = None


@dataclass(frozen=True)
class PostTask(Message):
    """A pool's next task (its payload sent before), or its stop (``task`` None)."""

    op: ClassVar[str] = "post"
    task: str | None = None
    return_all: bool = False
    stop: bool = False


@dataclass(frozen=True)
class Signal(Message):
    op: ClassVar[str] = "signal"
    signal: int = 0


@dataclass(frozen=True)
class Kill(Message):
    op: ClassVar[str] = "kill"


@dataclass(frozen=True)
class Ping(Message):
    """Sent when nothing else was for a while: the relay knows the caller is there."""

    op: ClassVar[str] = "ping"


@dataclass(frozen=True)
class Ready(Message):
    """The relay is up: where it runs and the address the other hosts reach it at."""

    op: ClassVar[str] = "ready"
    host: str = ""
    pid: int = 0
    address: str = ""


@dataclass(frozen=True)
class Port(Message):
    """The first host's store listens here: every other host may start."""

    op: ClassVar[str] = "port"
    address: str = ""
    port: int = 0


@dataclass(frozen=True)
class Exit(Message):
    """torchrun ended there with ``code`` (-1: the relay stopped it)."""

    op: ClassVar[str] = "exit"
    code: int = 0


@dataclass(frozen=True)
class Fail(Message):
    """The host cannot run the job, and why (a version mismatch, a full disk)."""

    op: ClassVar[str] = "fail"
    reason: str = ""


@dataclass(frozen=True)
class Chunk(Message):
    """Part of file ``name`` of folder ``key`` ('' the job's, else a pool task's id)."""

    op: ClassVar[str] = "chunk"
    key: str = ""
    name: str = ""
    offset: int = 0
    body: bytes = b""


@dataclass(frozen=True)
class End(Message):
    """File ``name`` is complete (``total`` bytes): it appears by rename."""

    op: ClassVar[str] = "end"
    key: str = ""
    name: str = ""
    total: int = 0


@dataclass(frozen=True)
class Append(Message):
    """Bytes appended to a growing file (a log, events) there."""

    op: ClassVar[str] = "append"
    key: str = ""
    name: str = ""
    body: bytes = b""


FileMessage = Chunk | End | Append
_MESSAGES: dict[str, type] = {cls.op: cls for cls in (
    Hello, Modules, Start, PostTask, Signal, Kill, Ping, Ready, Port, Exit, Fail, Chunk,
    End, Append)}


def encode_message(message: Message) -> tuple[bytes, bytes]:
    """The header line and the body of ``message``."""
    body = getattr(message, "body", b"")
    return _json({**message.header(), "size": len(body)}) + b"\n", body


def message_size(header_line: bytes) -> int:
    """How many body bytes follow a header line."""
    try:
        return int(json.loads(header_line)["size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"not a message header: {header_line[:200]!r}") from exc


def decode_message(header_line: bytes, body: bytes) -> Message:
    try:
        fields = json.loads(header_line)
        cls = _MESSAGES[fields.pop("op")]
        fields.pop("size")
        if cls is Hello and fields.get("version") != VERSION:
            raise VersionMismatch(fields.get("version"))  # before its fields are read
        if cls is Hello:
            fields["spec"] = Spec.from_fields(fields["spec"])
            fields["python"] = tuple(fields["python"])
        if "body" in {f.name for f in dataclasses.fields(cls)}:
            fields["body"] = body
        return cls(**fields)
    except VersionMismatch:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"not a message of protocol version {VERSION}: "
                            f"{header_line[:200]!r}") from exc
