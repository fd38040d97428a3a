"""Reaching nodes with Slurm (``slurm={...}``): one ``srun`` job step per node.

Inside an allocation (``SLURM_JOB_ID`` set: a batch job, ``salloc``, a Jupyter server
started by Slurm) its first ``nodes`` nodes are used. Outside one, nbdist asks for it::

    salloc --nodes N [--partition P --time T --account A ...] -- sh -c 'echo nodes; cat'

salloc holds the allocation while its command runs, and that command ends when its
stdin, a pipe from this process, closes: on ``kill()``, and when the caller dies, so a
killed kernel never leaves nodes allocated. While Slurm's queue holds the request the
display says so. A request that can never be granted fails at once, with salloc's own
words. Each node is then reached with ``srun --jobid J --nodelist NODE --overlap``,
its stdin and stdout the link of ``hosts.py``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading

from nbdist.errors import LaunchError
from nbdist.jobdir import JobDir
from nbdist.launch.hosts import HostsLaunch
from nbdist.launch.ssh import relay_command, remote_python
from nbdist.plan import Plan
from nbdist.protocol import Spec

HOLD = 'echo "$SLURM_JOB_ID $SLURM_JOB_NODELIST"; exec cat >/dev/null'


def node_names(nodelist: str) -> list[str]:
    """``node[1-2],gpu7`` as names, as Slurm expands them."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return out.split()


def step_command(allocation: str, node: str, job: JobDir) -> list[str]:
    return ["srun", "--jobid", allocation, "--nodes", "1", "--ntasks", "1",
            "--nodelist", node, "--overlap", "--unbuffered", "--quiet",
            "--chdir", "/",  # the caller's folder may not exist there; the ranks say so
            *relay_command(job)]


class SlurmLaunch(HostsLaunch):
    via = "slurm"
    reach_hint = ("Check that the nodes run the same Python, with nbdist, at "
                  f"{remote_python()} ($NBDIST_REMOTE_PYTHON names another path).")

    def __init__(self, job: JobDir, spec: Spec, plan: Plan):
        super().__init__(job, spec, plan, targets=None)
        self.allocation: str | None = os.environ.get("SLURM_JOB_ID")
        self._salloc: subprocess.Popen | None = None
        self._nodes: list[str] | None = None
        self._said: list[str] = []  # salloc's words, for its errors
        self._refused: str | None = None  # why Slurm did not grant the allocation
        if self.allocation:  # a step of the allocation this process runs in
            nodes = node_names(os.environ["SLURM_JOB_NODELIST"])
            if len(nodes) < plan.slurm["nodes"]:
                raise LaunchError(
                    f"slurm nodes={plan.slurm['nodes']}, but this allocation (job "
                    f"{self.allocation}) has {len(nodes)}: {', '.join(nodes)}")
            self._connect(nodes[:plan.slurm["nodes"]])
        else:
            self._request()

    def _request(self) -> None:
        opts = self.plan.slurm
        command = ["salloc", "--nodes", str(opts["nodes"]), "--ntasks-per-node", "1",
                   # a core per rank at least: the relay's one task holds them all
                   "--cpus-per-task", str(self.spec.ranks_per_host), "--job-name", self.name]
        for key in ("partition", "time", "account"):
            if opts.get(key):
                command += [f"--{key}", str(opts[key])]
        if self.plan.device == "cuda" and self.plan.visible_devices is None:
            # a count: Slurm picks the node's GPUs, and its CUDA_VISIBLE_DEVICES says which
            command += ["--gpus-per-node", str(self.spec.ranks_per_host)]
        command += [*opts["args"], "--", "sh", "-c", HOLD]
        self._salloc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
        self._notices.append(f"[nbdist] asking Slurm for {opts['nodes']} node(s): "
                             f"{' '.join(command[:-4])}")
        threading.Thread(target=self._follow_salloc, daemon=True,
                         name="nbdist-salloc").start()

    def _follow_salloc(self) -> None:
        for line in self._salloc.stderr:
            line = line.strip()
            self._said.append(line)
            words = line.removeprefix("salloc: ")
            if words.startswith(("Pending job allocation", "Granted job allocation")):
                self.allocation = words.rsplit(" ", 1)[-1]
            if "queued and waiting" in words:
                self._notices.append(f"[nbdist] waiting for the Slurm allocation: {words}")
            self.activity.set()

    def _connect(self, nodes: list[str]) -> None:
        self._nodes = nodes
        self.connect([(node, step_command(self.allocation, node, self.job)) for node in nodes])

    @property
    def name(self) -> str:
        """The allocation's job name: unique, so that it can be cancelled by name."""
        return f"nbdist-{self.job.id}"

    def poll(self) -> int | None:
        if self._refused is not None:
            return 1
        if self._nodes is None and self._salloc is not None:
            if self._salloc.poll() is not None:  # it ended before the nodes were known
                said = "\n".join(self._said[-10:]) or f"exit code {self._salloc.returncode}"
                self._refused = f"Slurm did not grant the allocation:\n{said}"
                return 1
            line = self._salloc.stdout.readline() if _readable(self._salloc.stdout) else ""
            if line.strip():  # the hold command runs: "JOBID NODELIST"
                self.allocation, nodelist = line.split()
                self._notices.append(f"[nbdist] Slurm granted job {self.allocation}: "
                                     f"{nodelist}")
                self._connect(node_names(nodelist))
            return None
        return super().poll()

    def lost_hosts(self) -> dict[str | None, str]:
        if self._refused is not None:
            return {None: self._refused}
        return super().lost_hosts()

    def kill(self) -> None:
        try:
            super().kill()
        finally:  # stop pressed again meanwhile: the nodes still go back
            self._release()

    def _release(self) -> None:
        if self._salloc is None or self._salloc.returncode is not None:
            return
        if self._nodes is None:  # still queued: withdraw the request
            _scancel("--name", self.name)
        with contextlib.suppress(OSError):
            self._salloc.stdin.close()  # the hold command ends: salloc lets go
        try:
            self._salloc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _scancel("--name", self.name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._salloc.pid, signal.SIGKILL)
            self._salloc.wait()

    def describe_exit(self, code: int | None) -> str:
        return f"srun: {super().describe_exit(code)}"

    def cut(self, proc: subprocess.Popen) -> None:
        """srun alone, never its group: srun's own watcher process then cancels the
        step; killed with it, it would leave the step running."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                proc.send_signal(signal.SIGTERM)  # "forcing job termination"


def _scancel(*args: str) -> None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["scancel", *args], capture_output=True, timeout=30)


def _readable(stream) -> bool:
    return bool(select.select([stream], [], [], 0)[0])

