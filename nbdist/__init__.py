"""nbdist: PyTorch DistributedDataParallel from a Jupyter notebook.

    import nbdist
    state = nbdist.run_distributed(train, nprocs=2)   # fn on every rank, rank 0's result

or, in a notebook, ``%load_ext nbdist`` and a cell starting with
``%%distributed --nprocs 2``. Inside the function or cell: ``rank()``, ``device()``,
``track()``, ``report()``, ``barrier()``, ``rank0_first()``.
"""

from nbdist.api import last_job, run_distributed
from nbdist.errors import (InitTimeoutError, InvalidArgumentError, JobTimeoutError,
                           LaunchError, NbdistError, PicklingError, RemoteError,
                           WorkerCrashedError)
from nbdist.job import Job, jobs, load_result
from nbdist.magic import load_ipython_extension  # imports IPython only when called
from nbdist.runtime import (barrier, device, is_main, local_rank, rank, rank0_first,
                            report, track, world_size)

__version__ = "0.1.0"

__all__ = [
    "run_distributed", "last_job", "jobs", "load_result", "Job", "load_ipython_extension",
    "NbdistError", "InvalidArgumentError", "PicklingError", "RemoteError",
    "WorkerCrashedError", "JobTimeoutError", "InitTimeoutError", "LaunchError",
    "rank", "local_rank", "world_size", "is_main", "device", "barrier", "rank0_first",
    "track", "report",
]
