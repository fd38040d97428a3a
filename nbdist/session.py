"""What this process runs: the launches followed now, its open pools, its last job.

One :data:`SESSION` per process (a notebook kernel, a script). ``run_distributed`` and
``Pool`` tell it what they start; ``nbdist.stacks()``, ``nbdist.last_job()`` and the
magic's ``%distributed`` ask it. Nothing else keeps process-wide state.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from nbdist.job import Job
    from nbdist.launch import Launcher
    from nbdist.pool import Pool


class Session:
    def __init__(self) -> None:
        self._following: list["Launcher"] = []
        self._pools: "weakref.WeakSet[Pool]" = weakref.WeakSet()
        self._last_job: "Job | None" = None
        self.kernel_pool: "Pool | None" = None  # ``%distributed start``'s, for the cells

    # --- what runs now -------------------------------------------------------------
    @contextlib.contextmanager
    def following(self, launch: "Launcher") -> Iterator[None]:
        """While a job (or a pool's task) is followed: ``stacks()`` looks at it."""
        self._following.append(launch)
        try:
            yield
        finally:
            self._following.remove(launch)

    def running(self) -> list["Launcher"]:
        """The launches followed now, else the live ones of the open pools (idle)."""
        if self._following:
            return list(self._following)
        return [pool.launch for pool in self.pools() if pool.alive and pool.launch]

    # --- pools ---------------------------------------------------------------------
    def add_pool(self, pool: "Pool") -> None:
        self._pools.add(pool)

    def discard_pool(self, pool: "Pool") -> None:
        self._pools.discard(pool)
        if self.kernel_pool is pool:
            self.kernel_pool = None

    def pools(self) -> list["Pool"]:
        """The pools of this process not closed yet."""
        return list(self._pools)

    # --- jobs ----------------------------------------------------------------------
    def remember(self, job: "Job") -> None:
        self._last_job = job

    def last_job(self) -> "Job | None":
        return self._last_job


SESSION = Session()
