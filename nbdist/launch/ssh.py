"""Reaching hosts with the system ``ssh`` client (``hosts=[...]``).

Non-interactive (``BatchMode``: a host that would ask for a password is an error, not
a prompt in a kernel that cannot answer), honouring the user's ssh config, plus the
``ssh_options`` given (``-F file``, ``-J jump``, ...). Every host is reached through
ssh, the caller's own machine too if listed: nothing is special-cased.
"""

from __future__ import annotations

import os
import shlex
import sys

from nbdist.jobdir import JobDir
from nbdist.launch.hosts import HostsLaunch
from nbdist.plan import Plan
from nbdist.protocol import Spec

ENV_REMOTE_PYTHON = "NBDIST_REMOTE_PYTHON"
BASE_OPTIONS = (
    "-T",  # no terminal: the session carries the link's bytes
    "-o", "BatchMode=yes",
    "-o", "ConnectTimeout=10",  # an unreachable host is an error in seconds
    "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",  # and a lost one too
)


def remote_python() -> str:
    """The Python the hosts run: the caller's own path, unless ``$NBDIST_REMOTE_PYTHON``."""
    return os.environ.get(ENV_REMOTE_PYTHON) or sys.executable


def command(host: str, options: tuple[str, ...], job: JobDir) -> list[str]:
    remote = shlex.join(relay_command(job))
    return ["ssh", *BASE_OPTIONS, *options, host, "--", remote]


def relay_command(job: JobDir) -> list[str]:
    """What runs on each host; the job's id only tells ``ps`` whose relay it is."""
    return [remote_python(), "-m", "nbdist._remote", job.id]


class SshLaunch(HostsLaunch):
    via = "ssh"

    def __init__(self, job: JobDir, spec: Spec, plan: Plan):
        options = " ".join(shlex.quote(o) for o in plan.ssh_options)
        self.reach_hint = (
            f"Check that `ssh {options + ' ' if options else ''}HOST true` works without "
            f"a prompt, and that {remote_python()} with nbdist exists there (the same "
            f"Python as here; ${ENV_REMOTE_PYTHON} names another path).")
        super().__init__(job, spec, plan, targets=[(host, command(host, plan.ssh_options, job))
                                                   for host in plan.hosts])

    def describe_exit(self, code: int | None) -> str:
        return {255: "ssh failed (exit code 255)",
                127: "command not found (exit code 127)"}.get(code) or super().describe_exit(code)

