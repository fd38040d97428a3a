"""The caller's own modules, for hosts that do not share its filesystem.

On one machine the ranks import ``helpers.py`` beside the notebook from where the
notebook does. Another host may not have that folder: a function that uses
``helpers.twice``, an object of a class defined there, or a cell that says
``import helpers`` would fail there with ``ModuleNotFoundError``. So the caller sends
each host (with the job, ``launch/hosts.py``) the source of

* every module it imported from a folder of its own on ``sys.path`` (not the
  standard library, not an installed package, not a hidden folder), a package as its
  whole folder, so that a submodule the caller never imported is there too;
* every ``*.py`` file and package in its working directory, when that is on
  ``sys.path`` (as in a notebook): what a cell may import that the caller has not.

The host's relay writes them into its job folder (``unpack``) and puts them on the
ranks' ``sys.path`` just after the folder each came from: a host that has that folder
(a shared filesystem, a copy of its own) imports from it, with its compiled modules
and data files, which are not sent; a host without it imports what was sent. At most
``MAX_BYTES`` of source is sent, the imported modules first; ``collect`` names what it
left out. Standard library only: the relay imports this.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import zlib
from pathlib import Path, PurePosixPath

MAX_BYTES = 16 << 20  # of source sent to each host, at most
INSTALLED = ("site-packages", "dist-packages")
NOT_SENT = {"nbdist"}  # the hosts have it already (the relay checks the version)

Files = list[tuple[int, str, bytes]]  # (sys_path index, path below it, source)


def collect(sys_path: list[str], cwd: str) -> tuple[Files, list[str]]:
    """The files to send, and the modules left out (too big, unreadable), with why."""
    roots = _own_folders(sys_path, cwd)
    units: dict[tuple[int, str], Path] = {}  # (root, top-level name): its file or folder
    for name, module in list(sys.modules.items()):
        found = _where(name, module, roots)
        if found and found not in units:
            index, top = found
            units[found] = roots[index] / (top if hasattr(module, "__path__") else f"{top}.py")
    # the imported ones first, within MAX_BYTES: the scan may find much more
    for index, root in roots.items():
        if os.path.realpath(root) == os.path.realpath(cwd):
            for entry in sorted(root.iterdir()):
                top = entry.stem if entry.suffix == ".py" else entry.name
                if top.isidentifier() and top not in NOT_SENT and (
                        entry.suffix == ".py" or (entry / "__init__.py").is_file()):
                    units.setdefault((index, top), entry)
    files: Files = []
    left_out: list[str] = []
    total = 0
    for (index, top), entry in units.items():
        try:
            paths = _files(entry)
            size = sum(path.stat().st_size for path in paths)
            if total + size > MAX_BYTES:
                left_out.append(f"{top} (past {MAX_BYTES >> 20} MiB of source)")
                continue
            sources = [(path.relative_to(roots[index]).as_posix(), path.read_bytes())
                       for path in paths]
        except OSError as exc:  # removed meanwhile, unreadable
            left_out.append(f"{top} ({exc.strerror or exc})")
            continue
        total += size
        files += [(index, path, source) for path, source in sources]
    return files, left_out


def pack(files: Files) -> bytes:
    """One compressed body: a JSON line of (index, path, size), then the sources."""
    index = json.dumps([[i, path, len(source)] for i, path, source in files]).encode()
    return zlib.compress(b"\n".join([index, *(source for _, _, source in files)]))


def unpack(body: bytes, folder: Path) -> dict[int, Path]:
    """Write the files ``pack`` made below ``folder``; the folder standing in for each
    ``sys_path`` index."""
    data = zlib.decompress(body)
    newline = data.index(b"\n") if b"\n" in data else len(data)
    offset = newline + 1
    roots: dict[int, Path] = {}
    for index, path, size in json.loads(data[:newline]):
        relative = PurePosixPath(path)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"refusing to write {path!r} outside {folder}")
        roots[index] = folder / str(index)
        target = roots[index] / relative
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        target.write_bytes(data[offset:offset + size])
        offset += size + 1
    return roots


def with_sent(sys_path: list[str], roots: dict[int, Path]) -> list[str]:
    """``sys_path`` with each sent folder just after the one its files came from."""
    return [p for i, original in enumerate(sys_path)
            for p in [original] + ([str(roots[i])] if i in roots else [])]


def _own_folders(sys_path: list[str], cwd: str) -> dict[int, Path]:
    """The user's folders on sys.path, each once (a notebook has its own folder as both
    '' and its path): not the standard library's or an environment's, not hidden
    (``~/.vscode-server``'s debugger), except the working directory."""
    library = {os.path.realpath(p) for key, p in sysconfig.get_paths().items()
               if key in ("stdlib", "platstdlib", "purelib", "platlib")}
    library |= {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    here = os.path.realpath(cwd)
    roots: dict[int, Path] = {}
    seen: set[str] = set()
    for index, path in enumerate(sys_path):
        real = os.path.realpath(path) if path else ""
        if not real or real in seen or not os.path.isdir(real):
            continue
        seen.add(real)
        parts = Path(real).parts
        if any(part in INSTALLED for part in parts) or any(
                real == lib or real.startswith(lib + os.sep) for lib in library):
            continue
        if real != here and any(part.startswith(".") for part in parts):
            continue
        roots[index] = Path(path)
    return roots


def _where(name: str, module, roots: dict[int, Path]) -> tuple[int, str] | None:
    """``(root index, name)`` of a top-level module or package (a namespace package
    too) the caller imported from one of its own folders."""
    if "." in name or name in NOT_SENT:
        return None
    file = getattr(module, "__file__", None)
    if file and file.endswith(".py"):
        entry = os.path.dirname(file) if hasattr(module, "__path__") else file[:-3]
    elif file is None and len(getattr(module, "__path__", ())) == 1:  # a namespace
        entry = list(module.__path__)[0]
    else:
        return None
    if os.path.basename(entry) != name:  # imported under another name
        return None
    folder = os.path.realpath(os.path.dirname(entry))
    for index, root in roots.items():
        if os.path.realpath(root) == folder:
            return index, name
    return None


def _files(entry: Path) -> list[Path]:
    """A module's file, or every ``.py`` file of a package's folder, in the folders
    below it that Python could import (not hidden ones, caches, ``my-data``)."""
    if not entry.is_dir():
        return [entry]
    found = []
    for folder, subfolders, names in os.walk(entry):
        subfolders[:] = sorted(d for d in subfolders
                               if d.isidentifier() and not d.startswith("__pycache__"))
        found += [Path(folder, n) for n in sorted(names) if n.endswith(".py")]
    return found
