"""Pickling what travels between the caller and the workers.

Everything (the function and its arguments on the way in, results on the way out)
is cloudpickled *inside* ``torch.save``'s zip format: functions and classes defined in
a notebook travel by value, while tensors are stored once as raw storages that
``torch.load(mmap=True)`` maps instead of copying. Every rank therefore shares the
page cache of one payload file, and a large result costs the caller little memory.

When pickling fails, :func:`find_unpicklable` pickles the parts one by one to name
the culprit ("argument 'lock'", "global 'db' used by train") instead of showing a
pickling stack dump.
"""

from __future__ import annotations

import contextlib
import copy
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import cloudpickle

from nbdist.errors import PicklingError
from nbdist.jobdir import atomic_path

LARGE_PAYLOAD_BYTES = 1 << 30


def dump(obj: Any, path: Path, *, on_pickled: Callable[[], None] | None = None) -> int:
    """Write ``obj`` to ``path`` atomically; return the file size in bytes.

    ``on_pickled`` is called once the whole object graph is pickled, so after any
    pickling error, but before the tensors' bytes are written: ``torch.save`` pickles
    into memory with ``pickle_module.Pickler`` first and writes the storages after.
    """
    import torch

    pickle_module: Any = cloudpickle
    if on_pickled is not None:
        pickle_module = _calling_after_dump(on_pickled)
    with atomic_path(path, durable=False) as tmp, _without_crc32(torch):
        torch.save(obj, tmp, pickle_module=pickle_module)
        if on_pickled is not None:
            pickle_module.call_once()  # a torch that never used our Pickler: no overlap
        size = tmp.stat().st_size
    return size


def _calling_after_dump(hook: Callable[[], None]) -> types.SimpleNamespace:
    """A stand-in for the cloudpickle module whose Pickler calls ``hook`` after dump."""
    called = False

    def call_once() -> None:
        nonlocal called
        if not called:
            called = True
            hook()

    class Pickler(cloudpickle.Pickler):
        def dump(self, obj: Any) -> None:
            super().dump(obj)
            call_once()

    return types.SimpleNamespace(__name__="cloudpickle", Pickler=Pickler,
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
    import torch

    return torch.load(path, weights_only=False, mmap=True, map_location="cpu")


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
            cloudpickle.dumps(value)
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
    """Move tensors and modules to the CPU and unwrap DDP, through common containers."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(obj, DistributedDataParallel):
        obj = obj.module
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type != "cpu" else obj
    if isinstance(obj, torch.nn.Module):
        return obj.cpu()
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
