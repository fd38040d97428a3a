"""The multi-host tests' hosts: two ssh hosts and a two-node Slurm cluster on this machine.

``.ci/hosts`` starts them (CI runs it as root before the tests): sshd for ``host1``
(127.0.0.1:2222) and ``host2`` (127.0.0.2:2222), reached with ``ssh -F
/etc/nbdist-ci/ssh_config HOST``, and Slurm nodes ``node1`` and ``node2`` in partition
``debug``. Every remote side (each sshd, each slurmd and so its job steps) has a private
tmpfs over ``~/.cache/nbdist`` and ``/tmp/pytest-of-root``: job files written there on
one side are not seen on the other, as with hosts that share no filesystem. The checkout,
its venvs and the Python install are seen by all.

Use the fixtures by importing them into a test module (this is not a conftest)::

    from remote_hosts import SSH_HOSTS, slurm_cluster, ssh_hosts, ssh_options  # noqa: F401

Without the hosts the fixtures skip the test, except under CI (``$CI`` set), where a
missing host is a failure: CI must never pass by skipping the multi-host tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

DEFAULT_SSH_CONFIG = "/etc/nbdist-ci/ssh_config"
SSH_HOSTS = ["host1", "host2"]
BAD_KEY_HOST = "badkey"  # sshd refuses its key: "Permission denied (publickey)", exit 255
NO_HOST = "nohost"  # nothing listens there: "Connection refused" at once, exit 255
SLURM_NODES = ["node1", "node2"]
SLURM_PARTITION = "debug"
CHECK_TIMEOUT = 5.0  # seconds the availability checks may take, all together
PID_DIR = Path("/run/nbdist-ci")  # .ci/hosts's pid files
PRIVATE_DIRS = ["/root/.cache/nbdist", "/tmp/pytest-of-root"]  # tmpfs on each remote side


def ssh_config() -> str:
    return os.environ.get("NBDIST_TEST_SSH_CONFIG", DEFAULT_SSH_CONFIG)


def ssh_options() -> list[str]:
    """The options that make ``ssh`` (or ``scp``) reach the test hosts: ``["-F", config]``."""
    return ["-F", ssh_config()]


def ssh_command(host: str, command: str) -> list[str]:
    """argv of ``ssh`` running the shell ``command`` on ``host``."""
    return ["ssh", *ssh_options(), host, command]


def ssh_run(host: str, command: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """Run the shell ``command`` on ``host``; text output captured, stdin empty."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(ssh_command(host, command), check=False, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def _unavailable(reason: str):
    reason += " (.ci/hosts starts the test hosts; it needs root)"
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _not_isolated(daemon: str) -> str | None:
    """Why the daemon .ci/hosts started (say ``sshd-host1``) lacks its private tmpfs, if it does.

    Removing one of PRIVATE_DIRS on this side detaches the remote side's tmpfs (and so
    shares the folder again) until .ci/hosts runs again. Daemons started some other way
    (no pid file of ours) are not checked.
    """
    try:
        pid = int((PID_DIR / f"{daemon}.pid").read_text())
        mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    except (OSError, ValueError):
        return None
    private = set()
    for line in mounts:
        fields = line.split()
        if "-" in fields and fields[fields.index("-") + 1] == "tmpfs":
            private.add(fields[4])
    missing = [d for d in PRIVATE_DIRS if d not in private]
    if missing:
        return f"{daemon} (pid {pid}) has no private tmpfs over {', '.join(missing)}"
    return None


def _check_ssh() -> str | None:
    if shutil.which("ssh") is None:
        return "no ssh client"
    if not os.path.exists(ssh_config()):
        return f"no {ssh_config()}"
    # both hosts at once; one login costs ~0.3 s here
    procs = {host: subprocess.Popen(ssh_command(host, "true"), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for host in SSH_HOSTS}
    deadline = time.monotonic() + CHECK_TIMEOUT
    problems = []
    for host, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            problems.append(f"ssh {host} true: no answer in {CHECK_TIMEOUT:.0f} s")
            continue
        if proc.returncode != 0:
            problems.append(f"ssh {host} true: exit {proc.returncode}: {err.strip()}")
    problems += filter(None, (_not_isolated(f"sshd-{host}") for host in SSH_HOSTS))
    return "; ".join(problems) or None


def _check_slurm() -> str | None:
    if shutil.which("sinfo") is None:
        return "no Slurm client (sinfo)"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-p", SLURM_PARTITION, "-o", "%N %t"],
                             check=False, capture_output=True, text=True, timeout=CHECK_TIMEOUT,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"sinfo: no answer in {CHECK_TIMEOUT:.0f} s"
    if out.returncode != 0:
        return f"sinfo: exit {out.returncode}: {out.stderr.strip()}"
    states = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip())
    # "mix": some of the node's CPUs are held by another job; it still takes more
    down = {node: states.get(node, "missing") for node in SLURM_NODES
            if states.get(node) not in ("idle", "mix")}
    if down:
        return "Slurm nodes not idle: " + ", ".join(f"{n} {s}" for n, s in down.items())
    problems = filter(None, (_not_isolated(f"slurmd-{node}") for node in SLURM_NODES))
    return "; ".join(problems) or None


@pytest.fixture(scope="session")
def ssh_hosts() -> list[str]:
    """The ssh test hosts' names (``ssh -F config host1`` ...), once checked to let us in."""
    problem = _check_ssh()
    if problem:
        _unavailable(f"ssh test hosts unavailable: {problem}")
    return list(SSH_HOSTS)


@pytest.fixture(scope="session")
def slurm_cluster() -> dict:
    """The Slurm test cluster, once checked to have both nodes idle:
    ``{"nodes": ["node1", "node2"], "partition": "debug"}``."""
    problem = _check_slurm()
    if problem:
        _unavailable(f"Slurm test cluster unavailable: {problem}")
    return {"nodes": list(SLURM_NODES), "partition": SLURM_PARTITION}
