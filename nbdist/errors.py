"""The small exception tree of nbdist.

::

    NbdistError
     ├── UsageError-like input problems .......... InvalidArgumentError, PicklingError
     ├── a worker failed without a Python error .. WorkerCrashedError
     ├── a worker's exception could not come back  RemoteError
     ├── the job ran out of time ................. JobTimeoutError, InitTimeoutError
     └── torchrun itself failed .................. LaunchError

A worker's own exception is re-raised as *its own type*, not wrapped: the remote
traceback hangs off it as ``__cause__`` (a :class:`RemoteTraceback`), as loky does.
"""

from __future__ import annotations


class NbdistError(Exception):
    """Base class of every error nbdist raises itself."""


class InvalidArgumentError(NbdistError, ValueError):
    """An argument of ``run_distributed`` (or an option of the magic) is wrong.

    Raised before anything is started.
    """


class PicklingError(NbdistError, TypeError):
    """A value that must travel to (or from) the workers cannot be pickled.

    ``name`` says which value (an argument, a global of the cell, a result name).
    """

    def __init__(self, message: str, *, name: str | None = None):
        super().__init__(message)
        self.name = name


class RemoteTraceback(Exception):
    """Carries the formatted traceback of a worker; attached as ``__cause__``."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RemoteError(NbdistError):
    """A worker raised an exception that could not be rebuilt in the caller.

    Keeps the original type name, message and traceback as text.
    """

    def __init__(self, type_name: str, message: str, *, rank: int, traceback: str):
        super().__init__(f"{type_name}: {message} (on rank {rank})")
        self.type_name = type_name
        self.remote_message = message
        self.rank = rank
        self.traceback = traceback


class WorkerCrashedError(NbdistError):
    """A worker died without a Python exception (signal, ``os._exit``, OOM kill)."""

    def __init__(self, message: str, *, rank: int, exitcode: int | None,
                 signal_name: str | None, log_tail: str):
        super().__init__(message)
        self.rank = rank
        self.exitcode = exitcode
        self.signal_name = signal_name
        self.log_tail = log_tail


class JobTimeoutError(NbdistError, TimeoutError):
    """The job ran past ``timeout=``; every worker has been killed.

    ``stacks`` says where each rank was (its Python stack, the user's frames first).
    """

    def __init__(self, message: str, *, timeout: float, running_ranks: list[int],
                 stacks: str = ""):
        super().__init__(message)
        self.timeout = timeout
        self.running_ranks = running_ranks
        self.stacks = stacks


class InitTimeoutError(JobTimeoutError):
    """Some ranks did not join the process group within ``init_timeout=``.

    On several hosts, ``hosts`` names those the missing ranks were on, and those where
    no rank started at all; on one machine it is empty.
    """

    def __init__(self, message: str, *, timeout: float, missing_ranks: list[int],
                 stacks: str = "", hosts: list[str] | None = None):
        super().__init__(message, timeout=timeout, running_ranks=missing_ranks,
                         stacks=stacks)
        self.missing_ranks = missing_ranks
        self.hosts = hosts or []


class LaunchError(NbdistError):
    """torchrun itself failed or was killed (not one of the workers), or a host could
    not be reached or went away (``host`` names it)."""

    def __init__(self, message: str, *, host: str | None = None):
        super().__init__(message)
        self.host = host

