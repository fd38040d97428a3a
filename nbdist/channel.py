"""Worker → caller transport: events (status, progress, metrics, heartbeats) and logs.

Transport is a private file per rank in the job directory (``events-rank-N.jsonl``),
one JSON object per line, appended with a single ``write`` so a line is never torn.
No socket is opened, so nothing listens on the network; the caller polls the files.

Status changes and final values are written unthrottled (never lost); progress from
:func:`nbdist.track` is throttled by the writer (see ``runtime.py``).
:class:`LogFollower` reads each rank's log file the same way, as it grows.
"""

from __future__ import annotations

import codecs
import heapq
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbdist.states import EventKind, RankState



@dataclass
class Event:
    rank: int
    kind: EventKind
    time: float
    data: dict[str, Any] = field(default_factory=dict)


class ChannelWriter:
    """The worker's end: append events to its rank's file."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def emit(self, kind: str, **data: Any) -> None:
        line = json.dumps({"kind": kind, "time": time.time(), **data},
                          default=_jsonable) + "\n"
        os.write(self._fd, line.encode())

    def status(self, state: RankState, **data: Any) -> None:
        self.emit(EventKind.STATUS, state=state, **data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _jsonable(value: Any) -> Any:
    # report(loss=tensor(0.3)) should just work: tensors and numpy scalars have .item()
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    return str(value)


class ChannelReader:
    """The caller's end: return the new complete events of every rank since last poll."""

    def __init__(self, paths: dict[int, Path]):
        self._paths = paths
        self._offsets = {rank: 0 for rank in paths}

    def poll(self) -> list[Event]:
        per_rank: list[list[Event]] = []
        for rank, path in self._paths.items():
            try:
                with open(path, "rb") as f:
                    f.seek(self._offsets[rank])
                    data = f.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1  # keep a partly written line for next time
            self._offsets[rank] += end
            events: list[Event] = []
            per_rank.append(events)
            for line in data[:end].splitlines():
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                try:
                    kind = EventKind(obj.pop("kind"))
                except (KeyError, ValueError):
                    continue  # not an event of this version
                events.append(Event(rank, kind, obj.pop("time"), obj))
        # interleave ranks by time, but never reorder one rank's events: its clock may
        # step backwards (NTP), its file order may not
        return list(heapq.merge(*per_rank, key=lambda e: e.time))


class LogFollower:
    """Reads what a rank appended to its log since the last call, as text."""

    def __init__(self, path: Path):
        self._path = path
        self._offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def read(self, final: bool = False) -> str:
        try:
            with open(self._path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            data = b""
        self._offset += len(data)
        return self._decoder.decode(data, final=final)
