"""The link between the caller and one host: messages, and the job folder mirrored.

No filesystem is shared with a host. What the ranks there write into their job folder
(logs, events, stacks, results, error records, exit codes) is sent back over the
link's stdout and written into the caller's job folder under the same names, so the
supervisor, the displays and ``diagnose`` read it as they read a local job::

    caller                                   host (python -m nbdist._remote)
    ──────                                   ────────────────────────────────
    Hello, Modules, Start, payload,    ──▶   writes spec/entry/modules/payload, runs torchrun,
    PostTask, Signal, Kill (stdin)           wakes a pool's ranks, signals them
    Sink: writes into the job folder   ◀──   Mirror: what the ranks wrote (stdout)

Every message is a ``protocol.py`` type: one JSON header line, then its body. Files
travel in chunks, so a control message (kill, signal) never waits behind a 1 GiB
payload, and a file appears at its destination by rename, whole. The Mirror sends a rank's events last in each
scan: an event ("done") is written after the output and result it announces, so the
caller has those by the time it reads the event, as it would on one machine.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable

from nbdist.jobdir import (EVENTS, FAILURES, GROWING, PAYLOAD, RECORDS, size_of,
                           write_bytes_atomic)
from nbdist.protocol import (Append, Chunk, End, FileMessage, Message, decode_exits,
                             decode_message, encode_exits, encode_message, message_size)

CHUNK = 1 << 20  # bytes of a file per message
# what a host sends back: the ranks' files (jobdir.py names them); the rest stays there
FROM_HOSTS = re.compile(f"{GROWING.pattern}|{RECORDS.pattern}|{EVENTS.pattern}")
TO_HOSTS = re.compile(re.escape(PAYLOAD))  # the caller sends its hosts the payload only


class Wire:
    """Typed messages over a pair of byte streams; ``send`` is thread-safe."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO):
        self._reader = reader
        self._writer = writer
        self._lock = threading.Lock()
        self.received = 0  # bytes, headers included

    def send(self, message: Message) -> None:
        header, body = encode_message(message)
        with self._lock:
            self._writer.write(header + body if len(body) < CHUNK else header)
            if len(body) >= CHUNK:
                self._writer.write(body)
            self._writer.flush()

    def receive(self) -> Message | None:
        """The next message; None when the other end closed. Raises
        ``protocol.ProtocolError`` on bytes that are not one."""
        line = self._reader.readline()
        if not line.endswith(b"\n"):
            return None
        body = _read_exactly(self._reader, message_size(line))
        if body is None:
            return None
        self.received += len(line) + len(body)
        return decode_message(line, body)


def _read_exactly(reader: BinaryIO, size: int) -> bytes | None:
    parts, left = [], size
    while left:
        part = reader.read(left)
        if not part:
            return None
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def send_file(wire: Wire, path: Path, key: str, *, between: Callable[[], None] = lambda: None,
              stopped: Callable[[], bool] = lambda: False) -> None:
    """Send ``path`` as chunks, then its end; ``between`` runs after each chunk (urgent
    messages go out there). Given up, without its end, once ``stopped()``."""
    with open(path, "rb") as f:
        offset = 0
        while True:
            if stopped():
                return
            data = f.read(CHUNK)
            if not data:
                break
            wire.send(Chunk(key, path.name, offset, data))
            offset += len(data)
            between()
    wire.send(End(key, path.name, offset))


class Mirror:
    """The host's end: sends what appeared or grew in the watched folders."""

    def __init__(self, wire: Wire):
        self.wire = wire
        self.folders: dict[str, Path] = {}
        self._sent: dict[tuple[str, str], Any] = {}  # an offset, or a file's identity

    def watch(self, key: str, folder: Path) -> None:
        self.folders[key] = folder

    def forget(self, key: str) -> None:
        """Stop watching a folder, after sending what is left in it."""
        folder = self.folders.pop(key, None)
        if folder is not None:
            self._scan(key, folder)
        self._sent = {k: v for k, v in self._sent.items() if k[0] != key}

    def scan(self) -> bool:
        """Send everything new; True if anything was."""
        sent = False
        for key, folder in list(self.folders.items()):
            sent |= self._scan(key, folder)
        return sent

    def _scan(self, key: str, folder: Path) -> bool:
        # the events' sizes first: whatever they announce was written before them
        events = {}
        for name in _names(folder):
            if EVENTS.fullmatch(name):
                events[name] = size_of(folder / name)
        sent = False
        for name in _names(folder):
            if GROWING.fullmatch(name):
                sent |= self._send_growth(key, folder / name)
            elif RECORDS.fullmatch(name):
                sent |= self._send_whole(key, folder / name)
        for name, size in events.items():
            data = self._growth(key, folder / name, size)
            if data:
                self._send_data(key, name, data)
                sent = True
        return sent

    def _send_growth(self, key: str, path: Path) -> bool:
        data = self._growth(key, path, None)
        if data:
            self._send_data(key, path.name, data)
        return bool(data)

    def _growth(self, key: str, path: Path, upto: int | None) -> bytes:
        offset = self._sent.get((key, path.name), 0)
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(-1 if upto is None else max(0, upto - offset))
        except FileNotFoundError:
            return b""
        self._sent[(key, path.name)] = offset + len(data)
        return data

    def _send_data(self, key: str, name: str, data: bytes) -> None:
        for start in range(0, len(data), CHUNK):
            self.wire.send(Append(key, name, data[start:start + CHUNK]))

    def _send_whole(self, key: str, path: Path) -> bool:
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        identity = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._sent.get((key, path.name)) == identity:
            return False
        self._sent[(key, path.name)] = identity
        try:
            send_file(self.wire, path, key)
        except FileNotFoundError:  # replaced meanwhile: the next scan sends the new one
            self._sent.pop((key, path.name), None)
        return True


def _names(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []


class Sink:
    """The receiving end of files (the caller's, or a host's for the payload): chunks
    go to a hidden file beside their destination, renamed into place at their end."""

    def __init__(self, folder_of: Callable[[str], Path], *, accept: re.Pattern,
                 merge_lock: threading.Lock | None = None, tag: str = ""):
        self.folder_of = folder_of  # a folder key -> the folder, or KeyError
        self.accept = accept
        self.merge_lock = merge_lock or threading.Lock()
        self.tag = tag  # in the partial files' names: several links write one folder

    def apply(self, message: Message) -> bool:
        """Write one file message; False if it is not one."""
        if not isinstance(message, (Chunk, End, Append)):
            return False
        path = self._path(message)
        if isinstance(message, Append):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, message.body)
            finally:
                os.close(fd)
        elif isinstance(message, Chunk):
            first = os.O_TRUNC if message.offset == 0 else 0
            fd = os.open(self._partial(path), os.O_WRONLY | os.O_CREAT | first, 0o600)
            try:
                os.pwrite(fd, message.body, message.offset)
            finally:
                os.close(fd)
        elif path.name == FAILURES:  # every host's agent writes its own ranks'
            self._merge(path, self._partial(path))
        else:
            if message.total == 0:
                self._partial(path).touch(mode=0o600)
            os.replace(self._partial(path), path)
        return True

    def _path(self, message: FileMessage) -> Path:
        key, name = message.key, message.name
        try:
            folder = self.folder_of(key)
        except KeyError:
            folder = None
        if folder is None or not self.accept.fullmatch(name):
            raise ValueError(f"unexpected file from the other end: {key!r}/{name!r}")
        return folder / name

    def _partial(self, path: Path) -> Path:
        return path.with_name(f".{path.name}.{self.tag}.partial")

    def _merge(self, path: Path, partial: Path) -> None:
        with self.merge_lock:
            new = decode_exits(partial.read_bytes())
            partial.unlink()
            try:
                old = decode_exits(path.read_bytes())
            except FileNotFoundError:
                old = {}
            write_bytes_atomic(path, encode_exits({**old, **new}), durable=False)

