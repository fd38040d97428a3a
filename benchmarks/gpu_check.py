"""Every GPU path one lent GPU allows, checked in one run of under 5 minutes (issue 18).

    python benchmarks/gpu_check.py                  # 5 minutes at most (2 expected)
    python benchmarks/gpu_check.py --json out.json

CI has no GPU: nccl, CUDA results and the notice about the notebook's own GPU are
checked here, by hand, whenever a GPU machine is lent. Without a usable CUDA GPU the
script says so in one line and exits 0: nothing was checked. Each check is one row of
the table (ok, FAILED with what went wrong, or noted: a known limit, recorded), and
catches its own errors, so one failure does not hide the rest; the exit code is 1 if
any row FAILED. In this order (the last one gives this process a CUDA context):

==============  ===================================================================
job             ``run_distributed(fn, gpus=1)``: the rank is on cuda:0 with nccl, an
                all_reduce of a CUDA tensor works; CUDA tensors, a state_dict and a
                module returned arrive here on the CPU, without this process
                touching CUDA
pool            the same through ``Pool(gpus=1)`` (its start and first task), then
                the median of 20 warm noop tasks
launch          a cold ``gpus=1`` noop job against raw ``torchrun --nproc-per-node 1``
                of a script that only initialises and destroys an nccl group, 3
                pairs run back to back
fsdp            FSDP2 (``fully_shard``) of a small model on one GPU: two train steps,
                ``full_tensor()`` of its state; then what a state_dict returned as-is
                arrives as (DTensor until sharded values come back whole, a later
                issue: noted, not failed)
caller context  this process makes a CUDA tensor on GPU 0, then starts a ``gpus=1``
                job: nbdist's warning names that GPU and the memory held there before
                the job starts, and the job runs beside it
==============  ===================================================================

Every job is bounded by ``timeout=``/``init_timeout=`` from a budget of ``BUDGET``
seconds for all of them, and an alarm stops whatever still runs past it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import nbdist

BUDGET = 250.0  # seconds for all checks: with torch's import and the report, under 5 min
JOB_TIMEOUT = 120.0  # seconds for one job; the first may import CUDA from a cold disk
MIN_JOB = 20.0  # seconds a job needs at least; with less left it is not started
WARM_TASKS = 20
LAUNCH_PAIRS = 3
HELD_BYTES = 256 << 20  # what this process holds on GPU 0 in the caller-context check
# gpus=1 is this process's cuda:0: the first GPU its CUDA_VISIBLE_DEVICES names
FIRST_GPU = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]

RAW_NOOP = """\
import os, torch, torch.distributed as dist
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")
dist.destroy_process_group()
"""


@dataclass
class Row:
    """One line of the table."""

    check: str
    result: str = ""  # "ok: ..." | "noted: ..." | "FAILED: ..."
    seconds: float = 0.0
    details: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.result.startswith("FAILED")


class CheckFailed(Exception):
    """A check saw something other than what nbdist promises."""


class OutOfTime(Exception):
    """The budget is spent: the check was stopped, or not started."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)


# ---------------------------------------------------------------- on the rank
# Plain functions of this file: cloudpickle ships them by value, so the ranks need
# nothing of benchmarks/ on their path.

def noop() -> None:
    return None


def on_rank() -> dict[str, Any]:
    """What the rank sees, and CUDA values for the caller to find on its CPU."""
    import torch.distributed as dist

    device = nbdist.device()
    reduced = torch.full((4,), float(dist.get_rank() + 1), device=device)
    dist.all_reduce(reduced)
    torch.cuda.synchronize()
    linear = torch.nn.Linear(3, 2).to(device)
    with torch.no_grad():
        linear.weight.copy_(torch.arange(6.0).view(2, 3))
        linear.bias.copy_(torch.tensor([10.0, 20.0]))
    free, total = torch.cuda.mem_get_info()
    return {"device": str(device), "current_device": torch.cuda.current_device(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "backend": dist.get_backend(), "world_size": dist.get_world_size(),
            "reduced_on": str(reduced.device), "reduced": reduced,
            "state": linear.state_dict(), "module": linear, "free": free, "total": total}


def fsdp_steps(give_state: bool) -> Any:
    """Two SGD steps of a small model under FSDP2; its state as-is, or described."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 has it under _composable only
        from torch.distributed._composable.fsdp import fully_shard

    torch.manual_seed(0)
    device = nbdist.device()
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4)).to(device)
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 16, device=device)
    losses = []
    for _ in range(2):
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    state = model.state_dict()
    if give_state:
        return state
    return {"losses": losses,
            "param_types": sorted({type(p).__name__ for p in model.parameters()}),
            "state_types": sorted({type(v).__name__ for v in state.values()}),
            "full": {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                     for k, v in state.items()}}


# ---------------------------------------------------------------- in the caller

class Budget:
    """The seconds left for the checks; each job's timeout comes out of it."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def job_timeout(self) -> float:
        left = self.deadline - time.monotonic() - 5  # for the kill and the table
        if left < MIN_JOB:
            raise OutOfTime(f"not run: {max(left, 0):.0f} s of the {BUDGET:.0f} s budget "
                            f"left, a job needs {MIN_JOB:.0f} s")
        return min(JOB_TIMEOUT, left)


class Checks:
    """The rows so far; ``row(name)`` times a block and turns its exception into
    a FAILED row."""

    def __init__(self, budget: Budget):
        self.budget = budget
        self.rows: list[Row] = []

    @contextlib.contextmanager
    def row(self, name: str) -> Iterator[Row]:
        row = Row(name)
        log(f"{name} ...")
        start = time.perf_counter()
        try:
            yield row
            row.result = row.result or "ok"
        except Exception as exc:  # one check's failure must not hide the others
            lines = describe(exc)
            row.result = f"FAILED: {lines[0][:200]}"
            row.details += lines[1:]
        finally:
            row.seconds = time.perf_counter() - start
            self.rows.append(row)
            log(f"{name}: {row.result} ({row.seconds:.1f} s)")

    def job(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """``run_distributed(fn, *args, gpus=1)``, bounded by the budget."""
        limit = self.budget.job_timeout()
        return nbdist.run_distributed(fn, *args, gpus=1, display="none", timeout=limit,
                                      init_timeout=limit, **kwargs)


def describe(exc: BaseException) -> list[str]:
    """An error as lines: its message, nbdist's notes (rank, logs), the rank's own
    traceback (``__cause__``), or where in this process it was raised."""
    ours = isinstance(exc, (CheckFailed, OutOfTime))  # their message says it all
    lines = (f"{exc}" if ours else f"{type(exc).__name__}: {exc}").splitlines() or [
        type(exc).__name__]
    lines += getattr(exc, "__notes__", [])
    if exc.__cause__ is not None:
        lines += f"{exc.__cause__}".splitlines()[-25:]
    elif not ours:
        lines += "".join(traceback.format_tb(exc.__traceback__)[-3:]).splitlines()
    return lines[:60]


def check_value(value: dict[str, Any], *, caller_has_cuda: bool = False) -> str:
    """Raise unless ``on_rank``'s value says what nbdist promises; a summary if so."""
    expect(value["device"] == "cuda:0" and value["current_device"] == 0,
           f"the rank ran on {value['device']} (current device {value['current_device']}), "
           f"not cuda:0")
    expect(value["visible"] == FIRST_GPU, f"the rank saw CUDA_VISIBLE_DEVICES="
                                          f"{value['visible']!r}, not {FIRST_GPU!r}")
    expect(value["backend"] == "nccl", f"the process group's backend is {value['backend']}")
    world = value["world_size"]
    expect(world == 1, f"world size {world}, not 1")
    expect(value["reduced_on"] == "cuda:0",
           f"the all_reduce ran on {value['reduced_on']}, not on the GPU")
    reduced = value["reduced"]
    expect(isinstance(reduced, torch.Tensor) and reduced.device.type == "cpu",
           f"the reduced tensor came back as {type(reduced).__name__} on "
           f"{getattr(reduced, 'device', '?')}, not on the CPU")
    expect(torch.equal(reduced, torch.full((4,), world * (world + 1) / 2)),
           f"the all_reduce gave {reduced.tolist()}")
    weight, bias = torch.arange(6.0).view(2, 3), torch.tensor([10.0, 20.0])
    state = value["state"]
    expect(all(t.device.type == "cpu" for t in state.values()),
           f"the state_dict came back on {sorted({str(t.device) for t in state.values()})}")
    expect(torch.equal(state["weight"], weight) and torch.equal(state["bias"], bias),
           f"the state_dict came back with other values: {dict(state)}")
    module = value["module"]
    expect(all(p.device.type == "cpu" for p in module.parameters()),
           f"the module came back on {sorted({str(p.device) for p in module.parameters()})}")
    expect(torch.equal(module.weight.detach(), weight), "the module's weight changed on the way")
    if not caller_has_cuda:
        expect(not torch.cuda.is_initialized(),
               "loading the result initialised CUDA in this process: the notebook would "
               "hold a CUDA context it never asked for")
    return (f"cuda:0, nccl, all_reduce on the GPU; tensors, state_dict and module back "
            f"on the CPU{'' if caller_has_cuda else ', no CUDA here'}")


def check_job(checks: Checks) -> None:
    with checks.row("job: run_distributed(gpus=1), a CUDA result back on the CPU") as row:
        value = checks.job(on_rank)
        row.result = f"ok: {check_value(value)}"
        row.details.append(f"the rank saw {value['free'] / 2**30:.1f} GiB free of "
                           f"{value['total'] / 2**30:.1f} GiB")


def check_pool(checks: Checks) -> None:
    pool = None
    try:
        with checks.row("pool: Pool(gpus=1) start and first task, a CUDA result") as row:
            pool = nbdist.Pool(gpus=1, init_timeout=checks.budget.job_timeout())
            value = pool.run(on_rank, display="none", timeout=checks.budget.job_timeout())
            row.result = f"ok: {check_value(value)}"
        with checks.row(f"pool: warm noop task (median of {WARM_TASKS})") as row:
            expect(pool is not None and pool.alive, "not run: the pool did not start")
            times = []
            for _ in range(WARM_TASKS):
                start = time.perf_counter()
                pool.run(noop, display="none", timeout=checks.budget.job_timeout())
                times.append(time.perf_counter() - start)
            row.result = f"ok: {statistics.median(times) * 1000:.1f} ms"
            row.details.append("each task ms: " + ", ".join(f"{t * 1000:.1f}" for t in times))
    finally:
        if pool is not None:
            pool.close()


def check_launch(checks: Checks) -> None:
    with checks.row(f"launch: cold gpus=1 noop job vs raw torchrun, nccl "
                    f"(median of {LAUNCH_PAIRS} pairs)") as row:
        ours, raw = [], []
        for i in range(LAUNCH_PAIRS):  # alternate who goes first, as run.py does
            for side in ((nbdist_noop, raw_torchrun_noop) if i % 2 == 0
                         else (raw_torchrun_noop, nbdist_noop)):
                seconds = side(checks)
                (ours if side is nbdist_noop else raw).append(seconds)
        ratio = statistics.median(o / r for o, r in zip(ours, raw))
        row.result = (f"ok: {statistics.median(ours):.2f} s vs {statistics.median(raw):.2f} s "
                      f"({ratio:.2f}×)")
        row.details += [f"nbdist s: {', '.join(f'{s:.2f}' for s in ours)}",
                        f"raw torchrun s: {', '.join(f'{s:.2f}' for s in raw)}"]


def nbdist_noop(checks: Checks) -> float:
    start = time.perf_counter()
    checks.job(noop)
    return time.perf_counter() - start


def raw_torchrun_noop(checks: Checks) -> float:
    """One rank on GPU 0 under plain torchrun, killed whole if it outlives the budget."""
    limit = checks.budget.job_timeout()
    with tempfile.TemporaryDirectory(prefix="nbdist-gpu-check-") as tmp:
        script = Path(tmp) / "noop.py"
        script.write_text(RAW_NOOP)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "1", str(script)]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": FIRST_GPU,
                                     "OMP_NUM_THREADS": "1"})
        try:
            _, err = proc.communicate(timeout=limit)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        lines = err.splitlines()
        # the rank's own error, not torchrun's ChildFailedError banner after it
        cause = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)
                 and "ChildFailedError" not in line]
        raise CheckFailed(f"raw torchrun failed (exit {proc.returncode}): "
                          f"{cause[-1] if cause else '(no error line)'}\n"
                          + "\n".join(lines[-40:]))
    return seconds


def check_fsdp(checks: Checks) -> None:
    with checks.row("fsdp: fully_shard on 1 GPU, two train steps, full_tensor() back") as row:
        value = checks.job(fsdp_steps, False)
        losses = value["losses"]
        expect(all(math.isfinite(x) for x in losses), f"losses {losses}")
        shapes = {k: tuple(v.shape) for k, v in value["full"].items()}
        want = {"0.weight": (32, 16), "0.bias": (32,), "2.weight": (4, 32), "2.bias": (4,)}
        expect(shapes == want, f"full_tensor() gave shapes {shapes}, not {want}")
        back = sorted({f"{type(v).__name__} on {v.device}" for v in value["full"].values()})
        expect(back == ["Tensor on cpu"], f"full_tensor() came back as {back}")
        row.result = (f"ok: losses {losses[0]:.4f} → {losses[1]:.4f}; on the rank "
                      f"parameters are {'/'.join(value['param_types'])}, state_dict values "
                      f"{'/'.join(value['state_types'])}")
    with checks.row("fsdp: a state_dict returned as-is arrives as") as row:
        # Sharded values are to come back whole (DESIGN.md, "Sharded models come back
        # whole"); until then a DTensor, or an error, is what this row records.
        try:
            state = checks.job(fsdp_steps, True)
        except OutOfTime:
            raise
        except Exception as exc:
            first = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            row.result = f"noted: it did not come back ({first}); whole values are a later issue"
            row.details += f"{exc}".splitlines()[1:20]
            return
        kinds = sorted({f"{type(v).__name__} on {v.device}" for v in state.values()})
        whole = kinds == ["Tensor on cpu"]
        row.result = (f"{'ok' if whole else 'noted'}: {', '.join(kinds)}"
                      + ("" if whole else "; whole values are a later issue"))
        row.details.append(f"keys {sorted(state)}; shapes "
                           f"{ {k: tuple(v.shape) for k, v in state.items()} }")
        row.details.append(f"loading it gave this process a CUDA context: "
                           f"{'yes' if torch.cuda.is_initialized() else 'no'}")


def check_caller_context(checks: Checks) -> None:
    with checks.row("caller context: a CUDA tensor here on GPU 0, then gpus=1") as row:
        held = torch.ones(HELD_BYTES // 4, device="cuda:0")
        reserved = torch.cuda.memory_reserved(0)
        said: list[tuple[float, str]] = []  # (when, text) of every warning
        value, failure = None, None
        with warnings.catch_warnings():  # puts showwarning back too
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *a, **k: said.append(
                (time.time(), str(message)))
            try:
                value = checks.job(on_rank)
            except Exception as exc:  # the notice is checked all the same
                failure = exc
        del held
        torch.cuda.empty_cache()
        notices = [(t, text) for t, text in said if "CUDA context" in text]
        row.details += [f"the notice: {text}" for _, text in notices]
        expect(len(notices) == 1, f"{len(notices)} notices about this process's CUDA context; "
                                  f"warnings: {[text for _, text in said]}")
        when, text = notices[0]
        expect("cuda:0" in text, "the notice does not name cuda:0")
        size = f"{reserved / 2**20:.0f} MiB" if reserved < 2**30 else f"{reserved / 2**30:.1f} GiB"
        expect(size in text, f"the notice does not say the {size} reserved here")
        job = nbdist.last_job()
        expect(job is not None and when <= job.started,
               "the notice came after the job had started")
        if failure is not None:
            raise failure
        summary = check_value(value, caller_has_cuda=True)
        row.result = f"ok: named before the launch ({size} here); {summary}"
        row.details.append(f"beside it, the rank saw {value['free'] / 2**30:.1f} GiB free of "
                           f"{value['total'] / 2**30:.1f} GiB")


CHECKS = (check_job, check_pool, check_launch, check_fsdp,
          check_caller_context)  # last: it leaves this process with a CUDA context


# ---------------------------------------------------------------- the report

def environment() -> dict[str, Any]:
    """torch, CUDA, NCCL, driver and GPU, asked for after the checks: asking torch
    for the GPU's name would give this process a CUDA context before the checks."""
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "python": sys.version.split()[0], "cpus": os.cpu_count()}
    with contextlib.suppress(Exception):
        nccl = torch.cuda.nccl.version()  # a tuple; an int in older torch
        info["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    with contextlib.suppress(Exception):
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        info["gpus"] = torch.cuda.device_count()
    with contextlib.suppress(Exception):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["driver"] = smi.stdout.splitlines()[0].strip()
    return info


def table(rows: list[Row]) -> str:
    out = ["| check | result | seconds |", "|---|---|---|"]
    for r in rows:
        result = r.result.replace("|", "\\|")
        out.append(f"| {r.check} | {'**' + result + '**' if r.failed else result} | "
                   f"{r.seconds:.1f} |")
    return "\n".join(out)


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the rows and the environment to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"nbdist GPU check: no usable CUDA GPU here (torch {torch.__version__}, "
              f"torch.cuda.is_available() is False), so nothing was checked.")
        if args.json:
            Path(args.json).write_text(json.dumps({"gpu": False, "rows": []}, indent=1))
        return 0

    # the jobs of this run only; kept when a check failed, for their logs
    parent = os.environ.get("NBDIST_HOME")
    if parent:
        os.makedirs(parent, exist_ok=True)
    home = tempfile.mkdtemp(prefix="nbdist-gpu-check-home-", dir=parent)
    os.environ["NBDIST_HOME"] = home
    checks = Checks(Budget(BUDGET))

    def out_of_time(signum: int, frame: Any) -> None:
        raise OutOfTime(f"stopped: the {BUDGET:.0f} s budget is spent")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(int(BUDGET) + 10)  # a job's own timeout should come first
    started = time.perf_counter()
    try:
        for check in CHECKS:
            try:
                check(checks)
            except Exception as exc:  # outside a row: a pool that would not close
                lines = describe(exc)
                checks.rows.append(Row(check.__name__, f"FAILED: {lines[0][:200]}",
                                       details=lines[1:]))
    finally:
        signal.alarm(0)
    failed = [r for r in checks.rows if r.failed]
    info = environment()
    noted = sum(r.result.startswith("noted") for r in checks.rows)
    print(f"\nnbdist GPU check: {len(checks.rows) - len(failed) - noted} ok, {noted} noted, "
          f"{len(failed)} FAILED, {time.perf_counter() - started:.0f} s in all; torch "
          f"{info['torch']}, CUDA {info['cuda']}, NCCL {info.get('nccl', '?')}, driver "
          f"{info.get('driver', '?')}, {info.get('gpus', '?')} × {info.get('gpu', '?')}, "
          f"Python {info['python']}, {info['cpus']} CPUs\n")
    print(table(checks.rows))
    print()
    for r in checks.rows:
        if r.details:
            print(f"- {r.check}")
            for d in r.details:
                print(f"    {d}")
    if failed:
        print(f"\nthe jobs' folders (logs of every rank) are kept in {home}")
    else:
        shutil.rmtree(home, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"gpu": True, "environment": info, "rows": [asdict(r) for r in checks.rows]},
            indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
