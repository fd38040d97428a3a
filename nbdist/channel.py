"""Rank → caller transport: events (``protocol.py``) and logs, through the job folder.

Each rank appends its events to a private file (``events-rank-N.jsonl``), one line
per event written with a single ``write`` so a line is never torn; a state the caller
waits for (ready, done, failed) also rings the job's *bell*: a FIFO the caller waits
on, so it wakes at once instead of at its next look. No socket is opened, so nothing
listens on the network; a bell that is full (the caller has rings it did not read
yet) or gone (its caller died) costs the rank nothing.

Status changes and final values are written unthrottled (never lost); progress from
:func:`nbdist.track` is throttled by the writer (see ``runtime.py``).
:class:`LogFollower` reads each rank's log file the same way, as it grows.
"""

from __future__ import annotations

import codecs
import contextlib
import heapq
import os
from pathlib import Path
from typing import BinaryIO

from nbdist.protocol import Event, EventBody, Status, decode_event, encode_event
from nbdist.states import RankState


# The states a caller waits for (a pool's ranks joined, a task's outcome): ringing the
# bell for these alone leaves the caller asleep while a task runs, instead of waking it
# for every start and every progress bar (it looks at those every POLL anyway). A cold
# job's end is its processes' exit, which the caller waits on too.
AWAITED = (RankState.READY, RankState.DONE, RankState.FAILED)


class ChannelWriter:
    """The rank's end: append events to its rank's file, and ring the bell for the
    states a caller waits for."""

    def __init__(self, path: Path, bell: Path | None = None):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._bell = -1
        if bell is not None:
            with contextlib.suppress(OSError):  # no bell: the caller looks on its own
                self._bell = os.open(bell, os.O_WRONLY | os.O_NONBLOCK)

    def emit(self, body: EventBody) -> None:
        os.write(self._fd, encode_event(body))
        if self._bell >= 0 and isinstance(body, Status) and body.state in AWAITED:
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(self._bell, b"\0")

    def status(self, state: RankState, **fields) -> None:
        self.emit(Status(state, **fields))

    def close(self) -> None:
        for fd in (self._fd, self._bell):
            if fd >= 0:
                os.close(fd)
        self._fd = self._bell = -1


class ChannelReader:
    """The caller's end: the new complete events of every rank since the last poll.

    Each file stays open once it exists (a warm task is polled a few times, and an
    ``open`` costs more than the read); :meth:`close` closes them.
    """

    def __init__(self, paths: dict[int, Path]):
        self._paths = paths
        self._offsets = {rank: 0 for rank in paths}
        self._files: dict[int, BinaryIO] = {}

    def poll(self) -> list[Event]:
        per_rank: list[list[Event]] = []
        for rank, path in self._paths.items():
            data = _read_from(self._files, rank, path, self._offsets[rank])
            if data is None:
                continue
            end = data.rfind(b"\n") + 1  # keep a partly written line for next time
            self._offsets[rank] += end
            events = [e for e in (decode_event(rank, line)
                                  for line in data[:end].splitlines()) if e is not None]
            per_rank.append(events)
        # interleave ranks by time, but never reorder one rank's events: its clock may
        # step backwards (NTP), its file order may not
        return list(heapq.merge(*per_rank, key=lambda e: e.time))

    def close(self) -> None:
        _close_all(self._files)


class LogFollower:
    """Reads what a rank appended to its log since the last call, as text."""

    def __init__(self, path: Path):
        self._path = path
        self._offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._file: dict[int, BinaryIO] = {}

    def read(self, final: bool = False) -> str:
        data = _read_from(self._file, 0, self._path, self._offset) or b""
        self._offset += len(data)
        return self._decoder.decode(data, final=final)

    def close(self) -> None:
        _close_all(self._file)


def _read_from(files: dict[int, BinaryIO], key: int, path: Path, offset: int) -> bytes | None:
    """What a file another process appends to holds from ``offset`` on; None while it
    does not exist. The file is opened once, then kept in ``files``."""
    f = files.get(key)
    if f is None:
        try:
            f = files[key] = open(path, "rb")
        except FileNotFoundError:
            return None
    f.seek(offset)
    return f.read()


def _close_all(files: dict[int, BinaryIO]) -> None:
    for f in files.values():
        f.close()
    files.clear()
