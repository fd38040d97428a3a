"""The caller's ``import torch``, which the stop button must not cut in half.

A notebook whose first ``import torch`` happens inside nbdist (the cell imports torch
on the ranks only) spends a second or two in that import during its first job. A
KeyboardInterrupt raised in the middle of it is fatal to the kernel: Python drops the
half-made ``torch`` from ``sys.modules``, but torch's C extension stays initialised,
so the next import runs torch's ``__init__`` again against it and fails
(``generic_type: cannot initialize type "RpcBackendOptions"``, ``partially initialized
module 'torch' has no attribute 'autograd'``) or crashes the process with SIGSEGV.
Only a restart recovers.

So the caller side imports torch through :func:`import_torch`: while torch's import
runs, SIGINT is only recorded, and once it is done the signal is sent again to the
handler that was there before. The stop button still stops the call, a second or two
later at most, and torch is whole for the next one.

The rank side imports torch at start, where SIGINT is not the user's to send, and
needs none of this; an interrupt while unpickling a user's own module is not handled
here either.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from types import ModuleType
from typing import Iterator


def import_torch() -> ModuleType:
    """``import torch``, with SIGINT held back until the import has finished.

        torch = import_torch()
        torch.save(obj, path)

    Once torch is imported, this costs a dictionary lookup.
    """
    if "torch" not in sys.modules:
        with sigint_held():
            import torch
    # already imported (or being imported by another thread: the import lock waits)
    import torch

    return torch


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Record a SIGINT that arrives inside the block; deliver it once the block ends.

    It goes to the handler that was in place, as if it had just arrived: Python's
    default one (and IPython kernel's, during a cell) raises KeyboardInterrupt, one
    that ignores it still ignores it.
    """
    # Python runs signal handlers in the main thread only: elsewhere a KeyboardInterrupt
    # cannot cut the import, and signal.signal would refuse to be called anyway.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # set outside Python: signal.signal could not put it back
        yield
        return
    arrived: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if arrived:  # pressed once or several times: one stop
            signal.raise_signal(signal.SIGINT)
