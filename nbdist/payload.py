"""Pickling what travels between the caller and the workers.

Everything (the function and its arguments on the way in, results on the way out)
is cloudpickled: functions and classes defined in a notebook travel by value. What
holds tensors goes *inside* ``torch.save``'s zip format, where they are stored once as
raw storages that ``torch.load(mmap=True)`` maps instead of copying: every rank shares
the page cache of one payload file, and a large result costs the caller little memory.
What holds none (a warm pool's ``noop``, a cell's numbers) is a plain pickle file, a
hundredth of the cost; :func:`load` tells the two apart by their first bytes. A small
result value travels inside its index file (``Outputs.inline``), not in a file of its
own.

nbdist's :class:`Pickler` adds two things to cloudpickle's:

* code objects travel whole (``marshal``), with their file name and, for code that
  has no file on disk (a notebook cell), its source lines: tracebacks on the ranks
  and back in the notebook show the user's lines, whatever cloudpickle does with
  ``co_filename`` (3.1.3 replaced it with ``<dynamic-code>``);
* in results, a ``DistributedDataParallel`` anywhere in the value is stored as its
  ``.module``: a DDP object cannot be unpickled without a process group.

Results travel as :class:`Outputs`, one file per named value, so one value that
cannot be pickled or loaded costs only itself.

When pickling fails, :func:`find_unpicklable` pickles the parts one by one to name
the culprit ("argument 'lock'", "global 'db' used by train") instead of showing a
pickling stack dump.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import linecache
import marshal
import os
import pickle
import sys
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import cloudpickle

from nbdist.errors import PicklingError
from nbdist.jobdir import atomic_path, check_private, write_bytes_atomic
from nbdist.torchimport import import_torch, sigint_held

LARGE_PAYLOAD_BYTES = 1 << 30
INLINE_BYTES = 1 << 20  # a result value up to this size travels inside its index
_ZIP = b"PK"  # how torch.save's files begin; a pickle begins with b"\x80"


class _HoldsTensors(Exception):
    """Raised by a plain pickling attempt that met a tensor: torch.save it instead."""


class Pickler(cloudpickle.Pickler):
    """cloudpickle's Pickler, with code objects kept whole and DDP unwrapped in results."""

    unwrap_ddp = False  # results only: on the way in, a DDP object stays what it is
    plain = False  # set by _plain_pickle: a tensor aborts the attempt

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.CodeType:
            return _load_code, (marshal.dumps(obj), obj.co_filename,
                                _unfiled_source(obj.co_filename))
        if self.unwrap_ddp and _is_ddp(obj):
            return _same, (obj.module,)
        if self.plain and _holds_storage(obj):
            raise _HoldsTensors
        return super().reducer_override(obj)


def _holds_storage(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # no torch imported: no tensor anywhere
    return torch is not None and isinstance(
        obj, (torch.Tensor, torch.UntypedStorage, torch.TypedStorage))


def _plain_pickle(obj: Any, pickler: type[Pickler]) -> bytes | None:
    """``obj`` pickled without torch, or None if it holds a tensor."""
    buffer = io.BytesIO()
    writer = pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    writer.plain = True
    try:
        writer.dump(obj)
    except _HoldsTensors:
        return None
    return buffer.getvalue()


class ResultPickler(Pickler):
    unwrap_ddp = True


def _unfiled_source(filename: str) -> list[str] | None:
    """The lines of a file that exists only in this process's ``linecache`` (an
    IPython cell): the same list object for every function of that cell, so the
    pickle stores it once."""
    entry = linecache.cache.get(filename)
    if entry is None or len(entry) != 4 or os.path.isfile(filename):
        return None
    return entry[2]


def _load_code(data: bytes, filename: str, lines: list[str] | None) -> types.CodeType:
    if lines is not None and filename not in linecache.cache:
        register_source(filename, lines)
    return marshal.loads(data)


def register_source(filename: str, lines: list[str]) -> None:
    """Make ``lines`` the source of ``filename`` for tracebacks in this process."""
    # mtime None: linecache.checkcache never evicts it (as IPython does for its cells)
    linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)


def _is_ddp(obj: Any) -> bool:
    return isinstance(obj, _ddp_class())


@functools.cache
def _ddp_class() -> type:
    import_torch()  # brings torch.nn.parallel
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel


def _same(obj: Any) -> Any:
    return obj


def dumps(obj: Any) -> bytes:
    """``pickle.dumps`` with nbdist's :class:`Pickler` (small records: errors)."""
    buffer = io.BytesIO()
    Pickler(buffer).dump(obj)
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    """``pickle.loads``, with the stop button held off while it imports torch (a value
    holding a ``torch.dtype``, an error of torch's type, in a process without torch
    yet): half an import of torch breaks every later one (``torchimport.py``)."""
    if "torch" in sys.modules:
        return pickle.loads(data)
    with sigint_held():
        return pickle.loads(data)


def dump(obj: Any, path: Path, *, on_pickled: Callable[[], None] | None = None,
         pickler: type[Pickler] = Pickler) -> int:
    """Write ``obj`` to ``path`` atomically; return the file size in bytes.

    ``on_pickled`` is called once the whole object graph is pickled, so after any
    pickling error, but before the tensors' bytes are written: ``torch.save`` pickles
    into memory with ``pickle_module.Pickler`` first and writes the storages after.
    """
    data = _plain_pickle(obj, pickler)
    if data is not None:
        (on_pickled or (lambda: None))()
        write_bytes_atomic(path, data, durable=False)
        return len(data)
    return _torch_save(obj, path, pickler, on_pickled)


def _torch_save(obj: Any, path: Path, pickler: type[Pickler],
                on_pickled: Callable[[], None] | None) -> int:
    torch = import_torch()
    pickle_module = _pickle_module(pickler, on_pickled or (lambda: None))
    with atomic_path(path, durable=False) as tmp, _without_crc32(torch):
        torch.save(obj, tmp, pickle_module=pickle_module)
        pickle_module.call_once()  # a torch that never used our Pickler: no overlap
        size = tmp.stat().st_size
    return size


def _pickle_module(base: type[Pickler], hook: Callable[[], None]) -> types.SimpleNamespace:
    """A stand-in for the pickle module whose Pickler calls ``hook`` after dump."""
    called = False

    def call_once() -> None:
        nonlocal called
        if not called:
            called = True
            hook()

    class HookedPickler(base):  # type: ignore[valid-type, misc]
        def dump(self, obj: Any) -> None:
            super().dump(obj)
            call_once()

    return types.SimpleNamespace(__name__="cloudpickle", Pickler=HookedPickler,
                                 call_once=call_once)


@contextlib.contextmanager
def _without_crc32(torch) -> Iterator[None]:
    """Skip the zip CRC-32 of every record while nbdist writes its own files.

    Only ``torch.load`` reads them, and it does not check it; computing it costs about
    half a second per GiB. The setting is process-wide, so it is restored right after
    (the caller's own ``torch.save`` calls keep their CRC).
    """
    serialization = torch.serialization
    if not hasattr(serialization, "set_crc32_options"):  # torch < 2.5: always computed
        yield
        return
    previous = serialization.get_crc32_options()
    serialization.set_crc32_options(False)
    try:
        yield
    finally:
        serialization.set_crc32_options(previous)


def load(path: Path) -> Any:
    """Read an object written by :func:`dump`, memory-mapping its tensors."""
    with open(path, "rb") as f:
        if f.read(len(_ZIP)) != _ZIP:
            f.seek(0)
            return loads(f.read())
    torch = import_torch()
    return torch.load(path, weights_only=False, mmap=True, map_location="cpu")


@dataclass
class Outputs:
    """Named values that travel one file each, so one that fails costs only itself.

    Rank 0 of a ``%%distributed`` cell returns the names the cell assigned; a plain
    function's return value travels as the single name :data:`RETURN_VALUE`.
    ``skipped`` says, per name, why a value did not come back.
    """

    values: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)  # name -> the value's type
    inline: dict[str, bytes] = field(default_factory=dict)  # small values, pickled


RETURN_VALUE = "return value"


def dump_outputs(outputs: Outputs, path: Path, part: Callable[[str], Path], *,
                 strict: bool = False) -> None:
    """Write each value to ``part(name)``, then the index of them to ``path``.

    A value that cannot be pickled is skipped, with the reason, or raises if ``strict``.
    """
    index = Outputs(skipped=dict(outputs.skipped))
    for name, value in outputs.values.items():
        kind = _type_name(value)
        try:
            data = _plain_pickle(value, ResultPickler)
            if data is None:
                _torch_save(value, part(name), ResultPickler, None)
            elif len(data) <= INLINE_BYTES:
                index.inline[name] = data
            else:
                write_bytes_atomic(part(name), data, durable=False)
        except Exception as exc:  # pickling can raise nearly anything
            if strict:
                raise
            index.skipped[name] = (f"a {type(value).__name__} cannot be pickled "
                                   f"({type(exc).__name__}: {exc})")
            continue
        index.values[name] = None
        index.types[name] = kind
    dump(index, path)


def load_outputs(path: Path, part: Callable[[str], Path]) -> Outputs:
    """Read what :func:`dump_outputs` wrote; a value that fails to load is skipped."""
    check_private(path)
    index = load(path)
    if not isinstance(index, Outputs):  # a plain file (written by hand, older nbdist)
        return Outputs(values={RETURN_VALUE: index})
    inline = getattr(index, "inline", {})  # an index of nbdist before 0.2 has none
    for name in list(index.values):
        try:
            if name in inline:
                index.values[name] = loads(inline[name])
            else:
                check_private(part(name))
                index.values[name] = load(part(name))
        except Exception as exc:  # unpickling can raise nearly anything
            del index.values[name]
            index.skipped[name] = (
                f"the {index.types.get(name, 'value')} was saved on the rank but cannot "
                f"be loaded here ({type(exc).__name__}: {exc})")
    index.inline = {}  # loaded: the values hold them now
    return index


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ in ("builtins", "__main__") \
        else f"{kind.__module__}.{kind.__qualname__}"


def warn_if_large(size: int, what: str) -> None:
    if size > LARGE_PAYLOAD_BYTES:
        warnings.warn(
            f"nbdist: the {what} is {size / 2**20:,.0f} MiB. Every job writes it to disk "
            "first; consider loading large data inside the function instead of "
            "passing it in.", stacklevel=3)


def find_unpicklable(named_values: Iterable[tuple[str, Any]]) -> tuple[str, Any, Exception] | None:
    """Return ``(name, value, error)`` of the first value cloudpickle refuses, or None."""
    for name, value in named_values:
        try:
            dumps(value)
        except Exception as exc:  # pickling can raise nearly anything
            if isinstance(value, types.FunctionType):
                inner = find_unpicklable(function_globals(value))
                if inner is not None:
                    return (f"{inner[0]} (used by {name})",) + inner[1:]
            return name, value, exc
    return None


def parts(value: Any) -> list[tuple[str, Any]]:
    """Name the parts of a container, to point at the one that cannot be pickled."""
    if isinstance(value, dict):
        return [(f"key {k!r}", v) for k, v in value.items()]
    if isinstance(value, (list, tuple)):
        return [(f"item {i}", v) for i, v in enumerate(value)]
    return []


def function_globals(fn: types.FunctionType) -> list[tuple[str, Any]]:
    """The globals and closure variables ``fn`` refers to, as ``(name, value)``."""
    names: list[str] = []
    codes = [fn.__code__]
    while codes:
        code = codes.pop()
        names.extend(code.co_names)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    found = [(n, fn.__globals__[n]) for n in dict.fromkeys(names) if n in fn.__globals__]
    cells = zip(fn.__code__.co_freevars, fn.__closure__ or ())
    for name, cell in cells:
        try:
            found.append((name, cell.cell_contents))
        except ValueError:  # an empty cell
            pass
    return found


def unpicklable_error(what: str, named_values: Iterable[tuple[str, Any]],
                      cause: Exception, *, hint: str) -> PicklingError:
    """Build the error that names which value could not be pickled, and what to do."""
    culprit = find_unpicklable(named_values)
    if culprit is None:
        return PicklingError(
            f"could not pickle the {what}: {type(cause).__name__}: {cause}. {hint}")
    name, value, exc = culprit
    return PicklingError(
        f"could not pickle {name} of the {what} (a {type(value).__name__}): "
        f"{type(exc).__name__}: {exc}. {hint}", name=name)


def to_cpu(obj: Any) -> Any:
    """Move tensors to the CPU and unwrap DDP, through common containers.

    Modules are left where they are: the caller loads their tensors onto the CPU.
    """
    torch = import_torch()
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(obj, DistributedDataParallel):
        obj = obj.module
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type != "cpu" else obj
    if isinstance(obj, torch.nn.Module):
        # not obj.cpu(): that moves the rank's own model (a pool keeps using it);
        # its tensors are loaded onto the CPU by the caller (map_location)
        return obj
    if isinstance(obj, dict):
        return _map_dict(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_cpu(v) for v in obj))
    if type(obj) in (list, tuple, set, frozenset):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def _map_dict(obj: dict) -> dict:
    # A shallow copy edited in place keeps the dict's type (OrderedDict) and attributes
    # such as a state_dict's ``_metadata``.
    out = copy.copy(obj)
    for key, value in obj.items():
        out[key] = to_cpu(value)
    return out
