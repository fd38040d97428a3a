"""The code the benchmarks run on every rank, once through nbdist and once as a script.

Each workload is a plain function. ``run.py`` passes it to ``nbdist.run_distributed``
(the process group is then set up by nbdist), and runs this same file as the raw
torchrun baseline::

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        benchmarks/workloads.py NAME OUT.json [ARG ...]

which initialises the process group itself, calls ``NAME(*ARGS)`` and writes rank 0's
return value to ``OUT.json`` — so both sides run identical code and differ only in how
they were launched.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

TESTS = Path(__file__).resolve().parents[1] / "tests"
PAGE = 4096


def noop():
    return None


def print_lines(n: int) -> int:
    """Rank 0 prints ``n`` numbered lines, as a chatty training loop would."""
    if dist.get_rank() == 0:
        for i in range(n):
            print(f"line {i} of {n}")
    return n


def make_state(nbytes: int, give_back: bool, tensors: int = 32):
    """Rank 0 builds a state dict of ``nbytes`` (``tensors`` float32 tensors).

    Returned when ``give_back``, dropped otherwise: the difference between the two jobs
    is the cost of returning it.
    """
    if dist.get_rank() != 0:
        return None
    numel = nbytes // 4 // tensors
    state = {f"layer{i}.weight": torch.full((numel,), float(i)) for i in range(tensors)}
    return state if give_back else None


def make_tensor(nbytes: int, give_back: bool):
    """Rank 0 builds one float32 tensor of ``nbytes``; returned when ``give_back``.

    The pool's result measure: the task dropping it is the baseline of the one
    returning it, as for :func:`make_state`.
    """
    if dist.get_rank() != 0:
        return None
    tensor = torch.full((nbytes // 4,), 1.0)
    return tensor if give_back else None


def fail_on(rank: int) -> str:
    """Raise on ``rank`` only, while the others finish: a failed but healthy task."""
    if dist.get_rank() == rank:
        raise ValueError(f"rank {rank} fails on purpose (benchmark)")
    return "finished"


def touch(tensor: torch.Tensor | None, smaps: bool = False) -> dict:
    """Read one element per memory page of ``tensor``; report how it is held in memory.

    With ``smaps``, the rank's ``/proc/self/smaps`` entries for the file the tensor is
    mapped from (nbdist's payload), to check that the ranks share those pages.
    """
    out: dict = {"rank": dist.get_rank(), "pid": os.getpid()}
    if tensor is None:
        return out
    flat = tensor.reshape(-1).view(torch.uint8)
    start = time.perf_counter()
    out["checksum"] = int(flat[::PAGE].sum())
    out["touch_s"] = time.perf_counter() - start
    if smaps:
        # every rank holds the touched pages while any reads its Pss: without the
        # barriers, a rank that is ahead sees them as its own alone (a quick-mode flake)
        dist.barrier()
        out.update(_mapping_usage("payload.pt"))
        out["rss_anon_kib"] = _status_kib("RssAnon")
        dist.barrier()
        if out["mapped_file"]:  # list the job folder now: the payload is deleted after
            folder = Path(out["mapped_file"]).parent
            out["job_files"] = {p.name: p.stat().st_size for p in folder.iterdir()
                                if p.is_file()}
    return out


def _mapping_usage(suffix: str) -> dict:
    """Rss / Pss (KiB) of this process's mappings of files ending in ``suffix``."""
    usage = {"mapped_file": None, "rss_kib": 0, "pss_kib": 0}
    current = None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                path = fields[5] if len(fields) >= 6 else ""
                current = path if path.endswith(suffix) else None
                if current:
                    usage["mapped_file"] = current
            elif current and fields[0] in ("Rss:", "Pss:"):
                usage[fields[0][:-1].lower() + "_kib"] += int(fields[1])
    return usage


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def convnet_throughput(steps: int, warmup: int = 3, batch: int = 64) -> dict:
    """Train the MNIST ConvNet of ``tests/convnet_train.py`` with DDP on synthetic data.

    Returns rank 0's throughput over ``steps`` steps after ``warmup`` untimed ones, in
    samples/s of the whole job (all ranks), from the *median* step time: on a shared
    machine a step that another process preempted says nothing about the launcher.
    """
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import torch.nn.functional as F
    from convnet_train import Net
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = DDP(Net())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)

    def step():
        opt.zero_grad()
        F.nll_loss(model(x), y).backward()  # DDP's all-reduce keeps the ranks in step
        opt.step()

    for _ in range(warmup):
        step()
    dist.barrier()
    times, cpu = [], []
    start = time.perf_counter()
    for _ in range(steps):
        t, c = time.perf_counter(), time.thread_time()
        step()
        times.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    dist.barrier()
    elapsed = time.perf_counter() - start
    median = sorted(times)[len(times) // 2]
    samples = batch * dist.get_world_size()
    return {"samples_per_s": samples / median, "mean_samples_per_s": steps * samples / elapsed,
            "step_ms": 1000 * median,
            # CPU time of this rank's thread per step: what the step itself cost, apart
            # from waiting for the peer or for a core
            "step_cpu_ms": 1000 * sorted(cpu)[len(cpu) // 2]}


WORKLOADS = {f.__name__: f for f in (noop, print_lines, make_state, make_tensor, fail_on,
                                     touch, convnet_throughput)}


def _main(argv: list[str]) -> None:
    """The raw torchrun side: ``workloads.py NAME OUT.json [ARG ...]``."""
    name, out, *args = argv
    dist.init_process_group("gloo")
    result = WORKLOADS[name](*(json.loads(a) for a in args))
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    _main(sys.argv[1:])
