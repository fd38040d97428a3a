"""Launchers: torchrun here, or one torchrun agent per host over ssh or Slurm.

One interface, so that the supervisor, the displays and the error handling do not
know which launcher ran (``supervise.py``, ``pool.py``)::

    launch = start(job_dir, spec, plan)
    launch.poll()            None while running, else the exit code (0: every host ok)
    launch.wait(seconds)     sleep, but return as soon as a rank rang or something ended
    launch.kill()            stop every process of the job on every host; idempotent
    launch.signal(sig)       signal every live rank (SIGINT, SIGUSR1); -> ranks signalled
    launch.post(task, ...)   a pool's next task for every rank
    launch.live_ranks()      ranks known to be up (each launcher finds its own)
    launch.take_notices()    lines for the display ("waiting for a Slurm allocation")
    launch.lost_hosts()      {host: why} for hosts lost or never reached ({None: why}: the
                             launcher's own failure, a refused Slurm allocation)
    launch.started_at        monotonic time the ranks' processes started (None: not yet)
    launch.hosts             the hosts the ranks run on, in order, once known (None: this
                             machine, or Slurm nodes not allocated yet)
    launch.job               the caller's job folder, where every file ends up

``local.py`` runs torchrun on this machine. ``hosts.py`` runs a relay per host
(``nbdist._remote``) that starts torchrun there with c10d rendezvous and mirrors the
host's job folder back into the caller's, over a link that ``ssh.py`` or
``slurm.py`` opens (the system ``ssh`` client, or ``srun`` inside an allocation).
"""

from __future__ import annotations

import signal
from typing import Protocol

from nbdist.jobdir import JobDir
from nbdist.plan import Plan
from nbdist.protocol import Spec


class Launcher(Protocol):
    """What ``supervise.py``, ``pool.Pool`` and ``rankstacks`` use of a launch."""

    job: JobDir
    started_at: float | None
    hosts: list[str] | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float) -> None: ...
    def kill(self) -> None: ...
    def signal(self, sig: signal.Signals) -> list[int]: ...
    def post(self, task: JobDir | None, return_all: bool, *, stop: bool = False) -> None: ...
    def live_ranks(self) -> list[int]: ...
    def take_notices(self) -> list[str]: ...
    def lost_hosts(self) -> dict[str | None, str]: ...


def start(job: JobDir, spec: Spec, plan: Plan) -> Launcher:
    """Start the ranks ``spec`` describes, where ``plan`` says, for the job (or pool)
    in ``job``."""
    if plan.hosts is not None:
        from nbdist.launch import ssh

        return ssh.SshLaunch(job, spec, plan)
    if plan.slurm is not None:
        from nbdist.launch import slurm

        return slurm.SlurmLaunch(job, spec, plan)
    from nbdist.launch.local import Launch

    return Launch(job, spec)
