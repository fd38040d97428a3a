"""The shape of a launch, checked before anything starts: ranks, devices, hosts.

A :class:`Plan` is what ``run_distributed``, ``Pool`` and the magic agree on once the
arguments are validated: how many ranks on how many hosts, which devices, which
backend, which launcher reaches the hosts (``launch/``). Every mistake a user can make
in the arguments is an :class:`InvalidArgumentError` raised here, naming the argument
and the fix, while nothing runs yet.
"""

from __future__ import annotations

import os
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

from nbdist import frameworks
from nbdist.errors import InvalidArgumentError
from nbdist.protocol import Spec
from nbdist.torchimport import import_torch

ENV_SSH_OPTIONS = "NBDIST_SSH_OPTIONS"
SLURM_KEYS = ("nodes", "partition", "time", "account", "args")


@dataclass(frozen=True)
class Plan:
    """The validated shape of a job or a pool."""

    ranks_per_host: int  # what the user's ``nprocs`` (or ``gpus``) says
    device: str  # "cuda" | "cpu"
    backend: str
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES for the workers
    timeout: float | None
    init_timeout: float | None
    hosts: tuple[str, ...] | None = None  # ssh: the hosts as the user named them
    ssh_options: tuple[str, ...] = ()
    slurm: dict[str, Any] | None = field(default=None, hash=False)  # srun's options

    @property
    def nhosts(self) -> int:
        if self.hosts is not None:
            return len(self.hosts)
        if self.slurm is not None:
            return self.slurm["nodes"]
        return 1

    @property
    def world_size(self) -> int:
        return self.ranks_per_host * self.nhosts

    @property
    def remote(self) -> bool:
        """The ranks run elsewhere (ssh or Slurm), reached through a launcher."""
        return self.hosts is not None or self.slurm is not None


def check_callable(fn: Any) -> None:
    if not callable(fn):
        raise InvalidArgumentError(
            f"nbdist needs a function to run on the ranks, got {type(fn).__name__} {fn!r}")


def check_seconds(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, (int, float)) or value <= 0):
        raise InvalidArgumentError(f"{name} must be a positive number of seconds, "
                                   f"got {value!r}")


def debug_env(env: dict[str, str] | None, debug: bool) -> dict[str, str] | None:
    """``env`` plus torch's collective checks when ``debug``."""
    return {**(env or {}), "TORCH_DISTRIBUTED_DEBUG": "DETAIL"} if debug else env


def plan_launch(*, nprocs: int | None, gpus: int | str | Sequence[int] | None,
                backend: str | None, timeout: float | None, init_timeout: float | None,
                hosts: str | Sequence[str] | None = None,
                ssh_options: Sequence[str] | None = None,
                slurm: dict[str, Any] | bool | None = None) -> Plan:
    """The shape of a launch (a job or a pool), checked; raises before anything starts."""
    if nprocs is not None and (isinstance(nprocs, bool) or not isinstance(nprocs, int)
                               or nprocs < 1):
        raise InvalidArgumentError(f"nprocs must be a positive integer, got {nprocs!r}")
    check_seconds("timeout", timeout)
    check_seconds("init_timeout", init_timeout)
    host_list = _parse_hosts(hosts)
    slurm_opts = _parse_slurm(slurm)
    if host_list is not None and slurm_opts is not None:
        raise InvalidArgumentError(
            "hosts= and slurm= both given: pick one way to reach the machines")
    remote = host_list is not None or slurm_opts is not None
    if remote and nprocs is None and gpus is None:
        raise InvalidArgumentError(
            "say how many ranks to start on each host: nprocs=N (CPU, gloo) or gpus=N; "
            "nbdist cannot see the other machines' devices from here")
    device_ids = _parse_gpus(gpus)
    if device_ids is None and nprocs is None and _cuda_count() > 0:
        device_ids = list(range(_cuda_count()))  # default: one rank per visible GPU
    if device_ids is not None:
        _check_gpus(device_ids, gpus, nprocs, local=not remote)
        nprocs = len(device_ids)
    device = "cuda" if device_ids is not None else "cpu"
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    if backend == "nccl" and device == "cpu":
        raise InvalidArgumentError(
            "backend='nccl' needs GPUs; pass gpus=N, or use backend='gloo' on the CPU")
    visible = None
    if slurm_opts is not None and device_ids is not None and not _explicit_ids(gpus):
        pass  # a count under Slurm: its own CUDA_VISIBLE_DEVICES names the node's GPUs
    elif gpus is not None:
        # ids count within what the caller sees, as torch.cuda numbers them; on other
        # hosts, within what each host sees
        current = None if remote else os.environ.get("CUDA_VISIBLE_DEVICES")
        names = current.split(",") if current else [str(i) for i in range(max(device_ids) + 1)]
        visible = ",".join(names[i] for i in device_ids)
    return Plan(ranks_per_host=nprocs or 2, device=device, backend=backend,
                visible_devices=visible, timeout=timeout, init_timeout=init_timeout,
                hosts=host_list, ssh_options=_ssh_options(ssh_options) if host_list else (),
                slurm=slurm_opts)


def caller_gpu_notice(plan: Plan) -> str | None:
    """What to tell a caller whose own CUDA context lives on a GPU its ranks will use.

    A notebook that made one CUDA tensor holds a context on its current GPU, and
    PyTorch's allocator keeps what it freed cached there: ranks put on that GPU get
    the memory that is left, and their out-of-memory error would name nothing of the
    notebook. ``None`` when there is nothing to say: torch not imported (nbdist never
    imports it for this), CUDA not initialised here, a CPU plan, ranks on other hosts,
    or ranks on other GPUs. Example of the text::

        nbdist: this process holds a CUDA context on cuda:0 (1.5 GiB reserved by
        PyTorch here, plus the context itself); rank 0 will run on that GPU too, ...
    """
    torch = sys.modules.get("torch")
    if torch is None or plan.device != "cuda" or plan.remote:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        here = torch.cuda.current_device()
        reserved = torch.cuda.memory_reserved(here)
        count = torch.cuda.device_count()
    except Exception:  # a notice must never stop a launch: the ranks report a broken CUDA
        return None
    # the GPUs by the names CUDA_VISIBLE_DEVICES gives them, as plan_launch numbers them
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = current.split(",") if current else [str(i) for i in range(count)]
    if here >= len(names):
        return None
    # no visible_devices: the ranks inherit this process's GPUs, one rank per GPU
    ranks_on = (plan.visible_devices.split(",") if plan.visible_devices is not None
                else names[:plan.ranks_per_host])
    if names[here] not in ranks_on:
        return None
    rank = ranks_on.index(names[here])
    physical = f", CUDA_VISIBLE_DEVICES entry {names[here]!r}" if current else ""
    # a list, never a string: gpus="1" is a count (GPU 0), not GPU 1
    others = [i for i in range(min(count, len(names))) if i != here][:plan.ranks_per_host]
    elsewhere = f", or put the ranks on other GPUs with gpus={others}" if others else ""
    return (f"nbdist: this process holds a CUDA context on cuda:{here}{physical} "
            f"({_size(reserved)} reserved by PyTorch here, plus the context itself); "
            f"rank {rank} will run on that GPU too, sharing its memory with this "
            f"notebook. To give the ranks the whole GPU, free it first (del the CUDA "
            f"tensors and models, then torch.cuda.empty_cache()){elsewhere}.")


def warn_if_caller_gpu(plan: Plan) -> None:
    """Warn, at the user's call (two frames up), when :func:`caller_gpu_notice` says so."""
    notice = caller_gpu_notice(plan)
    if notice is not None:
        warnings.warn(notice, stacklevel=3)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def rank_spec(plan: Plan, env: dict[str, str] | None, *, return_all: bool = False,
              pool: bool = False) -> Spec:
    """What every rank of ``plan`` starts from: this process's working directory and
    ``sys.path``, nbdist's environment plus the user's ``env``."""
    cwd = os.getcwd()
    defaults, overrides = _rank_env(plan, env)
    return Spec(ranks_per_host=plan.ranks_per_host, world_size=plan.world_size,
                backend=plan.backend, device=plan.device, cwd=cwd,
                sys_path=tuple(os.path.abspath(p) if p else cwd for p in sys.path),
                env_defaults=defaults, env_overrides=overrides, return_all=return_all,
                # the ranks watch the caller's pid only where it is the caller's (one
                # machine); elsewhere each host's relay watches its link to the caller
                caller_pid=None if plan.remote else os.getpid(), pool=pool)


def _rank_env(plan: Plan, extra: dict[str, str] | None) -> tuple[dict[str, str], dict[str, str]]:
    """What the ranks' environment gets from nbdist: (defaults, overrides).

    The defaults yield to the environment on the ranks' machine, the overrides (the
    user's ``env=`` among them) do not.
    """
    defaults = {**frameworks.launch_env(plan.device),
                # torchrun sets 1 anyway when unset, and prints a banner about it
                "OMP_NUM_THREADS": "1"}
    overrides = {k: str(v) for k, v in (extra or {}).items()}
    overrides["PYTHONUNBUFFERED"] = "1"  # prints reach the log (and the notebook) at once
    # torch without numpy warns at every import; the caller's own import said it once
    overrides["PYTHONWARNINGS"] = ",".join(filter(None, (
        overrides.get("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS")),
        "ignore:Failed to initialize NumPy")))
    overrides["NBDIST_DEVICE"] = plan.device
    if plan.visible_devices is not None:
        overrides["CUDA_VISIBLE_DEVICES"] = plan.visible_devices
    if (plan.backend == "gloo" and not plan.remote and os.path.exists("/sys/class/net/lo")
            and "GLOO_SOCKET_IFNAME" not in os.environ):
        # a single-machine job: keep gloo's sockets on loopback, not on whatever
        # interface the host name resolves to (never for several hosts: they would
        # each talk to themselves)
        overrides.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return defaults, overrides


def _parse_hosts(hosts: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if hosts is None:
        return None
    names = hosts.split(",") if isinstance(hosts, str) else list(hosts)
    names = [n.strip() if isinstance(n, str) else n for n in names]
    bad = [n for n in names if not isinstance(n, str) or not n or any(c.isspace() for c in n)
           or n.startswith("-") or names.count(n) > 1]
    if bad or not names:
        raise InvalidArgumentError(
            f"hosts={hosts!r}: expected host names as ssh knows them, e.g. "
            f"hosts=['gpu1', 'gpu2'] (or 'user@gpu1'), each once; bad: "
            f"{sorted(set(bad)) or 'none given'}")
    return tuple(names)


def _ssh_options(options: Sequence[str] | None) -> tuple[str, ...]:
    if options is None:
        return tuple(shlex.split(os.environ.get(ENV_SSH_OPTIONS, "")))
    if isinstance(options, str) or not all(isinstance(o, str) for o in options):
        raise InvalidArgumentError(
            f"ssh_options must be a list of ssh arguments, e.g. ['-F', 'ssh_config'], "
            f"got {options!r}")
    return tuple(options)


def _parse_slurm(slurm: dict[str, Any] | bool | None) -> dict[str, Any] | None:
    if slurm is None or slurm is False:
        return None
    opts = {} if slurm is True else slurm
    if not isinstance(opts, dict):
        raise InvalidArgumentError(
            f"slurm= takes a dict of options ({', '.join(SLURM_KEYS)}), got {slurm!r}")
    unknown = sorted(set(opts) - set(SLURM_KEYS))
    if unknown:
        raise InvalidArgumentError(
            f"slurm= does not know {unknown}; its options are {', '.join(SLURM_KEYS)} "
            f"(more srun/salloc arguments go in 'args': ['--qos', 'high'])")
    opts = dict(opts)
    inside = os.environ.get("SLURM_JOB_ID")
    for_new = sorted(k for k in ("partition", "time", "account", "args") if opts.get(k))
    if inside and for_new:
        raise InvalidArgumentError(
            f"slurm {', '.join(for_new)}: this process runs inside Slurm job {inside}, "
            f"whose nodes nbdist uses; those options are for a new allocation")
    nodes = opts.get("nodes")
    if nodes is None:
        nodes = _allocation_nodes()
        if nodes is None:
            raise InvalidArgumentError(
                "slurm= needs 'nodes' outside an allocation: slurm={'nodes': 2, ...}")
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise InvalidArgumentError(f"slurm nodes must be a positive integer, got {nodes!r}")
    opts["nodes"] = nodes
    args = opts.get("args", [])
    if isinstance(args, str):
        args = shlex.split(args)
    opts["args"] = list(args)
    return opts


def _allocation_nodes() -> int | None:
    """The node count of the Slurm allocation this process runs in, if any."""
    if not os.environ.get("SLURM_JOB_ID"):
        return None
    count = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES")
    return int(count) if count and count.isdigit() else None


def _explicit_ids(gpus: Any) -> bool:
    """``"0,1"`` or ``[0, 1]``, not a count."""
    return not isinstance(gpus, int) and not (isinstance(gpus, str) and gpus.strip().isdigit())


def _parse_gpus(gpus: int | str | Sequence[int] | None) -> list[int] | None:
    if gpus is None:
        return None
    if isinstance(gpus, bool):
        raise InvalidArgumentError(f"gpus must be a count or device ids, got {gpus!r}")
    if isinstance(gpus, int):
        if gpus < 1:
            raise InvalidArgumentError(f"gpus must be at least 1, got {gpus}")
        return list(range(gpus))
    if isinstance(gpus, str):
        text = gpus.strip()
        if text.isdigit() and "," not in text:
            return _parse_gpus(int(text))
        parts = [p.strip() for p in text.split(",") if p.strip()]
    else:
        parts = list(gpus)
    try:
        ids = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"gpus={gpus!r}: expected a count (2) or device ids ('0,1' or [0, 1])") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise InvalidArgumentError(f"gpus={gpus!r}: device ids must be distinct and >= 0")
    return ids


def _check_gpus(device_ids: list[int], gpus: Any, nprocs: int | None, *, local: bool) -> None:
    if local:  # other hosts' GPUs are theirs to check: a rank there fails if absent
        available = _cuda_count()
        if available == 0:
            raise InvalidArgumentError(
                f"gpus={gpus!r} was requested, but this machine has no usable CUDA GPU "
                f"(torch.cuda.is_available() is False). To run on the CPU with the gloo "
                f"backend, use nprocs={len(device_ids)} instead.")
        if max(device_ids) >= available:
            raise InvalidArgumentError(
                f"gpus={gpus!r} asks for device {max(device_ids)}, but only {available} "
                f"GPU(s) are visible (ids 0..{available - 1}).")
    if nprocs is not None and nprocs != len(device_ids):
        raise InvalidArgumentError(
            f"nprocs={nprocs} does not match gpus={gpus!r} ({len(device_ids)} device(s)): "
            f"nbdist runs one process per GPU; drop nprocs or make them agree.")


def _cuda_count() -> int:
    torch = import_torch()

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
