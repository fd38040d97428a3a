"""nbdist: PyTorch DistributedDataParallel from a Jupyter notebook.

    import nbdist
    state = nbdist.run_distributed(train, nprocs=2)   # fn on every rank, rank 0's result

or, in a notebook, ``%load_ext nbdist`` and a cell starting with
``%%distributed --nprocs 2``. Inside the function or cell: ``rank()``, ``device()``,
``track()``, ``report()``, ``barrier()``, ``rank0_first()``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# Each public name and the module that defines it, imported on first use (PEP 562):
# every rank and torchrun's agent import this package too, and need none of the
# caller's machinery (api, job, magic, displays).
_EXPORTS = {
    "run_distributed": "api", "last_job": "api", "Pool": "pool", "stacks": "rankstacks",
    "jobs": "job", "load_result": "job", "Job": "job",
    "load_ipython_extension": "magic",
    "NbdistError": "errors", "InvalidArgumentError": "errors",
    "PicklingError": "errors", "RemoteError": "errors", "WorkerCrashedError": "errors",
    "JobTimeoutError": "errors", "InitTimeoutError": "errors", "LaunchError": "errors",
    "rank": "runtime", "local_rank": "runtime", "world_size": "runtime",
    "is_main": "runtime", "device": "runtime", "barrier": "runtime",
    "rank0_first": "runtime", "track": "runtime", "report": "runtime",
}
_SUBMODULES = ("api", "cell", "channel", "display", "errors", "frameworks", "job",
               "jobdir", "launch", "magic", "payload", "plan", "pool", "protocol",
               "rankstacks", "runtime", "scope", "session", "states", "supervise",
               "torchimport")

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from nbdist.api import last_job, run_distributed
    from nbdist.errors import (InitTimeoutError, InvalidArgumentError, JobTimeoutError,
                               LaunchError, NbdistError, PicklingError, RemoteError,
                               WorkerCrashedError)
    from nbdist.job import Job, jobs, load_result
    from nbdist.magic import load_ipython_extension
    from nbdist.pool import Pool
    from nbdist.rankstacks import stacks
    from nbdist.runtime import (barrier, device, is_main, local_rank, rank, rank0_first,
                                report, track, world_size)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # ``nbdist.api`` keeps working without ``import nbdist.api``
        return importlib.import_module(f"nbdist.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nbdist' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"nbdist.{module}"), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
