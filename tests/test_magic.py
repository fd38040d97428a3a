"""``%%distributed`` in a real Jupyter kernel: globals in, names out, errors, interrupts.

One kernel serves the whole module (starting one, and importing torch in it, costs
seconds); every test points the kernel's ``NBDIST_HOME`` at the test's own folder so
the leftover-process check of ``conftest.py`` sees its workers. torchrun launches are
few and each checks several things.
"""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import pytest

from conftest import wait_gone
from helpers import REPO, job_dirs, wait_for_ranks, worker_pids
from kernel_util import Kernel, kernel_manager, run_notebook
from nbdist.scope import names_assigned, names_read

EXAMPLE = REPO / "examples" / "mnist_ddp.ipynb"


@pytest.fixture(scope="module")
def shared_kernel(tmp_path_factory):
    km = kernel_manager(tmp_path_factory.mktemp("kernelspec"))
    cwd = tmp_path_factory.mktemp("kernel-cwd")
    (cwd / "sidefx").mkdir()  # a package beside the notebook, patched by its submodule
    (cwd / "sidefx" / "__init__.py").write_text("class Widget:\n    pass\n")
    (cwd / "sidefx" / "patch.py").write_text(
        "from sidefx import Widget\nWidget.patched = lambda self: 'patched on the ranks too'\n")
    km.start_kernel(cwd=str(cwd))
    kernel = Kernel(km)
    try:
        kernel.run("%load_ext nbdist\nimport os, sys, threading, torch, nbdist")
        yield kernel
    finally:
        kernel.shutdown()


@pytest.fixture
def kernel(shared_kernel, nbdist_home):
    shared_kernel.run(f"os.environ['NBDIST_HOME'] = {nbdist_home!r}")
    return shared_kernel


def cell(magic_line: str, body: str) -> str:
    return f"%%{magic_line}\n" + textwrap.dedent(body).strip("\n")


# ------------------------------------------------------------------ no launch needed

def test_names_read_and_assigned_follow_python_scoping():
    source = textwrap.dedent("""
        import torch.nn as nn
        model = Net(hidden)
        for x, y in loader:
            loss = crit(model(x), y)
            total += loss
        def f(a, b=default):
            return [z * k for z in g(a, b) if z > thresh]
        class C(Base):
            def m(self):
                global counter
                counter = attr
        with ctx() as h:
            q = h + 1
        print(q, model, x)
    """)
    assert names_read(source) == ["Net", "hidden", "loader", "crit", "total", "default",
                                  "g", "k", "thresh", "Base", "attr", "ctx", "print", "x"]
    assert names_assigned(source) == ["nn", "model", "x", "y", "loss", "total", "f", "C",
                                      "h", "q", "counter"]


BAD_CELLS = [  # (magic line, body, ename shown, what the message must say)
    # the magic speaks in options (--nprocs 2), never in Python (nprocs=2)
    ("distributed --bogus", "x = 1", "UsageError", "unrecognized arguments: --bogus"),
    ("distributed --nprocs two", "x = 1", "UsageError", "invalid int value: 'two'"),
    ("nbdist --nprocs 0", "x = 1", "UsageError", "nprocs must be a positive integer"),
    ("distributed --timeout -1", "x = 1", "UsageError", "timeout must be a positive"),
    ("distributed --out 1x,y", "x = 1", "UsageError", "--out takes variable names"),
    ("distributed --gpus 2", "x = 1", "UsageError", "no usable CUDA GPU"),
    ("distributed --gpus 2", "x = 1", "UsageError", "use --nprocs 2 instead"),
    ("distributed --backend nccl", "x = 1", "UsageError",
     "--backend nccl needs GPUs; pass --gpus N, or use --backend gloo"),
    ("distributed", "x = (1", "SyntaxError", "never closed"),
    ("distributed", "!ls", "SyntaxError", "%magics and !commands do not work"),
    ("distributed", "print(lock)", "PicklingError",
     "the notebook variable lock (a lock) cannot be sent"),
    ("distributed", "use_lock()", "PicklingError",
     "the notebook variable lock (used by use_lock)"),
]


@pytest.mark.parametrize("magic_line,body,ename,message", BAD_CELLS,
                         ids=[f"{c[0]}|{c[1]}" for c in BAD_CELLS])
def test_bad_cells_fail_before_anything_starts(kernel, nbdist_home, magic_line, body,
                                               ename, message):
    kernel.run("lock = threading.Lock()\ndef use_lock():\n    return lock")
    reply = kernel.execute(cell(magic_line, body))
    assert reply.status == "error", reply
    if ename == "UsageError":  # IPython prints these without a traceback
        assert f"UsageError: usage: %%distributed [--nprocs N]" in reply.stderr, reply
        assert message in reply.stderr, reply
    else:
        assert reply.ename == ename, reply
        assert message in reply.error_text, reply
    if ename == "PicklingError":
        assert "Create it inside the cell" in reply.error_text
        assert "magic.py" not in reply.error_text
    for internal in ("_run_magic", "_prepare", "api.py"):  # no nbdist internals
        assert internal not in reply.error_text + reply.stderr, reply
    assert not any((d / "entry.py").exists() for d in job_dirs(nbdist_home)), \
        "a job was started"


def test_options_map_to_run_distributed_arguments(kernel):
    kernel.run(textwrap.dedent("""
        import nbdist.api
        _calls, _real = [], nbdist.api.run_distributed
        def _fake(fn, cell, captured, **options):
            _calls.append(options)
            return nbdist.payload.Outputs(values={"fake": 1})
        nbdist.api.run_distributed = _fake
    """))
    try:
        kernel.run(cell("distributed --nprocs 3 --timeout 2.5 --all-ranks --backend gloo "
                        "--stall-warning 0", "fake = 0"))
        kernel.run(cell("nbdist --quiet", "fake = 0"))
        kernel.run(cell("distributed --hosts a,b --ssh-options '-F cfg' --nprocs 2",
                        "fake = 0"))
        kernel.run(cell("distributed --slurm --nodes 2 --partition gpu --time 1:00:00 "
                        "--slurm-args '--qos high' --nprocs 2", "fake = 0"))
        calls = kernel.value("_calls")
        misplaced = kernel.execute(cell("distributed --nodes 2 --nprocs 2", "fake = 0"))
    finally:
        kernel.run("nbdist.api.run_distributed = _real")
    nowhere = {"hosts": None, "ssh_options": None, "slurm": None}
    assert calls == [
        {"nprocs": 3, "gpus": None, "backend": "gloo", "timeout": 2.5, **nowhere,
         "display": "auto", "all_ranks": True, "stall_warning": None, "debug": False},
        {"nprocs": None, "gpus": None, "backend": None, "timeout": None, **nowhere,
         "display": "none", "all_ranks": False, "stall_warning": 120.0, "debug": False},
        {"nprocs": 2, "gpus": None, "backend": None, "timeout": None,
         "hosts": "a,b", "ssh_options": ["-F", "cfg"], "slurm": None,
         "display": "auto", "all_ranks": False, "stall_warning": 120.0, "debug": False},
        {"nprocs": 2, "gpus": None, "backend": None, "timeout": None, "hosts": None,
         "ssh_options": None, "slurm": {"nodes": 2, "partition": "gpu", "time": "1:00:00",
                                        "args": ["--qos", "high"]},
         "display": "auto", "all_ranks": False, "stall_warning": 120.0, "debug": False},
    ]
    assert "UsageError" in misplaced.stderr
    assert "--nodes, --partition, --time, --account and --slurm-args go with --slurm" \
        in misplaced.stderr


# --------------------------------------------------------------------- real launches

def test_globals_in_names_out_and_rank0_output(kernel):
    kernel.run(textwrap.dedent("""
        class Point:
            def __init__(self, x):
                self.x = x
        def scale(t):
            return t * 2
        w = torch.ones(3)
        device = "the notebook's"
        unused_lock = threading.Lock()  # not read by the cell, so never pickled
        class Holder:  # a Trainer as in PyTorch's DDP tutorial: it keeps the DDP model
            def __init__(self, model):
                self.model = model
        class OnlyOnRanks:  # loads on a rank, fails in the kernel (as DDP itself does)
            def __reduce__(self):
                return (_rebuild_on_ranks, ())
        def _rebuild_on_ranks():
            if "RANK" not in os.environ:
                raise ValueError("Default process group has not been initialized")
            return OnlyOnRanks()
        def report(**metrics):  # the notebook's own helper of that name wins
            return "the notebook's report"
        for _name in ("p", "total", "ddp", "t", "lock", "seen", "on_rank", "trainer",
                      "fragile", "reported"):
            globals().pop(_name, None)
        import sidefx  # a package whose submodule patches its class, as fastai's does
        import sidefx.patch
        widget = sidefx.Widget()
    """))
    reply = kernel.execute(cell("distributed --nprocs 2", """
        import torch.nn as nn
        from torch.nn.parallel import DistributedDataParallel as DDP
        on_rank = sorted(globals())
        p = Point(rank)
        total = scale(w).sum().item()
        ddp = DDP(nn.Linear(2, 2))
        trainer = Holder(ddp)
        t = torch.full((2,), float(rank), device=device)
        seen = (type(rank).__name__, type(device).__name__, world_size, local_rank,
                is_main(), all(map(callable, (track, report, barrier, rank0_first))))
        print(f"hello from rank {rank}")
        fragile = OnlyOnRanks()
        reported = report(loss=1.0)
        patched = widget.patched()
        rank_modules = sorted(m for m in __import__("sys").modules if m.startswith("nbdist."))
        lock = threading.Lock()
    """), timeout=180)
    assert reply.status == "ok", reply
    assert "hello from rank 0" in reply.stdout
    assert "hello from rank 1" not in reply.stdout + reply.stderr
    assert ("[nbdist] from rank 0: nn, DDP, on_rank, p, total, ddp, trainer, t, seen, "
            "reported, patched, rank_modules\n") in reply.stdout
    assert re.search(r"'lock' did not come back: a lock cannot be pickled", reply.stderr)
    # one value that fails to load costs only itself, and is named
    assert re.search(r"'fragile' did not come back: the OnlyOnRanks was saved on the rank "
                     r"but cannot be loaded here \(ValueError: Default process group",
                     reply.stderr), reply.stderr
    # the notebook's `device` is not the cell's: said before the job
    assert "[nbdist] in the cell, device are each rank's own" in reply.stderr

    # only what the cell reads travelled, plus the predefined names
    assert kernel.value("on_rank") == sorted([
        "__builtins__", "__name__", "DDP", "nn", "Point", "scale", "w", "torch",
        "threading", "rank", "local_rank", "world_size", "device", "track", "report",
        "barrier", "is_main", "rank0_first", "Holder", "OnlyOnRanks", "widget"])
    assert kernel.value("isinstance(p, Point), p.x") == (True, 0)
    assert kernel.value("total") == 6.0
    assert kernel.value("type(ddp).__name__, isinstance(ddp, torch.nn.Linear)") == ("Linear", True)
    # DDP inside an object comes back unwrapped (it cannot load without a process group)
    assert kernel.value("type(trainer).__name__, type(trainer.model).__name__") == (
        "Holder", "Linear")
    # a rank running a cell imports the rank side only, none of the caller's machinery
    caller_side = {"nbdist.api", "nbdist.magic", "nbdist.launch", "nbdist.plan", "nbdist.display"}
    assert not caller_side & set(kernel.value("rank_modules"))
    assert kernel.value("reported, patched, 'fragile' in globals()") == (
        "the notebook's report", "patched on the ranks too", False)
    assert kernel.value("t.device.type, t.tolist()") == ("cpu", [0.0, 0.0])
    assert kernel.value("seen") == ("int", "device", 2, 0, True, True)
    # predefined names are not pushed back; the unpicklable one stayed behind
    assert kernel.value("device, 'lock' in globals()") == ("the notebook's", False)


@pytest.mark.slow
def test_tutorial_code_runs_unchanged_and_conflicts_are_explained(kernel):
    kernel.run("for _name in ('summed', 'tutorial_sum'):\n    globals().pop(_name, None)")
    reply = kernel.execute(cell("distributed --nprocs 2", """
        import torch.distributed as dist
        dist.init_process_group("gloo", rank=rank, world_size=world_size)  # as tutorials do
        dist.init_process_group(backend="gloo", init_method="env://")
        x = torch.ones(1)
        dist.all_reduce(x)
        summed = x.item()
        dist.destroy_process_group()  # the tutorial's cleanup is fine too
    """), timeout=180)
    assert reply.status == "ok", reply
    assert kernel.value("summed") == 2.0
    said = ("[nbdist] init_process_group: the gloo process group nbdist set up is already "
            "initialised; your call does nothing")
    assert reply.stdout.count(said) + reply.stderr.count(said) == 1, reply

    # PyTorch's DDP tutorial: the name imported at the top of the notebook, called by a
    # notebook function (issue 18: on the ranks it was torch's own, a second group)
    kernel.run(textwrap.dedent("""
        from torch.distributed import init_process_group, destroy_process_group

        def ddp_setup():
            init_process_group(backend="gloo")
    """))
    reply = kernel.execute(cell("distributed --nprocs 2", """
        ddp_setup()
        init_process_group("gloo")  # the notebook's name, read by the cell itself
        x = torch.ones(1)
        torch.distributed.all_reduce(x)
        tutorial_sum = x.item()
        destroy_process_group()
    """), timeout=180)
    assert reply.status == "ok", reply
    assert kernel.value("tutorial_sum") == 2.0
    assert reply.stdout.count(said) + reply.stderr.count(said) == 1, reply

    reply = kernel.execute(cell("distributed --nprocs 2", """
        import torch.distributed as dist
        dist.init_process_group("nccl")
    """), timeout=180)
    assert reply.ename == "ValueError", reply
    assert ("init_process_group(backend='nccl'): nbdist already initialised the default "
            "process group (backend 'gloo', world size 2") in reply.error_text
    assert "--gpus N" in reply.error_text

    reply = kernel.execute(cell("distributed --nprocs 2", "name = input('your name? ')"),
                           timeout=180)
    assert reply.ename == "EOFError", reply
    assert "the ranks have no standard input" in reply.error_text


@pytest.mark.slow
def test_out_restricts_names_and_all_ranks_streams_every_rank(kernel):
    kernel.run("for _name in ('a', 'b', 'c'):\n    globals().pop(_name, None)")
    reply = kernel.execute(cell("nbdist --nprocs 2 --out a,c --all-ranks", """
        a = rank + 10
        b = 5
        print(f"line from rank {rank}")
    """), timeout=180)
    assert reply.status == "ok", reply
    assert "[rank 0] line from rank 0" in reply.stdout
    assert "[rank 1] line from rank 1" in reply.stdout
    assert "'c' did not come back: it is not defined on rank 0" in reply.stderr
    assert kernel.value("a, 'b' in globals(), 'c' in globals()") == (10, False, False)


@pytest.mark.slow
def test_rank_exception_is_the_users_own_with_the_cells_traceback(kernel):
    kernel.run(textwrap.dedent("""
        class TrainingDiverged(Exception):
            pass
        def check(loss):
            if loss != loss:
                raise TrainingDiverged(f"loss is {loss}")
    """))
    reply = kernel.execute(cell("distributed --nprocs 2", """
        loss = 0.5
        if rank == 1:
            loss = float("nan")
        check(loss)
    """), timeout=180)
    assert reply.status == "error", reply
    assert (reply.ename, reply.evalue) == ("TrainingDiverged", "loss is nan")
    text = reply.error_text
    assert "Traceback on rank 1 (most recent call last):" in text
    # the cell is named as IPython numbers it (In[N] of this very cell)
    assert re.search(rf'File "<nbdist-cell In\[{reply.execution_count}\]>", line 5, in <module>'
                     r'\n    check\(loss\)', text), text
    # the notebook function's frame shows its source, named as IPython names cells
    assert re.search(r"Cell In\[\d+\], line 5, in check\n"
                     r"    raise TrainingDiverged\(f\"loss is \{loss\}\"\)", text), text
    assert "[nbdist] raised on rank 1 of 2" in text
    for internal in ("_worker.py", "magic.py", "api.py", "exec(cell.compile()"):
        assert internal not in text, text
    # the exception object in the notebook is the notebook's class
    assert kernel.value("type(sys.last_value) is TrainingDiverged, "
                        "sys.last_value.nbdist_rank") == (True, 1)
    # run_distributed of a notebook function: its frames show the notebook's lines
    # too (they travel with the code, whatever cloudpickle does with co_filename)
    out = kernel.run(textwrap.dedent("""
        try:
            nbdist.run_distributed(check, float("nan"), nprocs=2, display="none")
        except TrainingDiverged as exc:
            print(exc.__cause__)
    """), timeout=180).stdout
    assert re.search(r'File "[^"]+", line 5, in check\n'
                     r'    raise TrainingDiverged\(f"loss is \{loss\}"\)', out), out


@pytest.mark.slow
def test_interrupt_stops_every_rank_and_the_next_cell_works(kernel, nbdist_home):
    pending = kernel.submit(cell("distributed --nprocs 2", """
        import time
        print("started", flush=True)
        while True:
            time.sleep(0.05)
    """))
    pending.wait_for(lambda r: "started" in r.stdout, timeout=180)
    pids = worker_pids(wait_for_ranks(nbdist_home, "running", 2))
    assert len(pids) == 2
    kernel.km.interrupt_kernel()
    interrupted = time.monotonic()
    reply = pending.result(timeout=60)
    assert reply.ename == "KeyboardInterrupt", reply
    assert "every rank was stopped" in reply.error_text
    assert wait_gone(pids, 5) + (time.monotonic() - interrupted) < 5

    # the kernel and nbdist keep working; --quiet shows nothing but still returns
    assert kernel.value("6 * 7") == 42
    reply = kernel.execute(cell("distributed --nprocs 2 --quiet", "answer = world_size * 21"),
                           timeout=180)
    assert reply.status == "ok", reply
    assert reply.stdout == "" and reply.stderr == "", reply
    assert kernel.value("answer") == 42


@pytest.mark.slow
def test_example_notebook_runs_top_to_bottom(tmp_path):
    nb = run_notebook(EXAMPLE, tmp_path)
    text = "\n".join(out.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for out in c.get("outputs", ()))
    assert text.count("writing the training set once") == 1, text  # rank 0 only
    assert "effective batch 64" in text and "epoch 1: loss" in text, text
    assert "[nbdist] from rank 0: state, history" in text, text
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", text).group(1))
    assert accuracy > 0.9, text


@pytest.mark.slow
def test_a_warm_pool_keeps_rank_state_between_cells(kernel, nbdist_home):
    kernel.run("for _name in ('shard', 'sums', 'where', 'again'):\n    globals().pop(_name, None)")
    try:
        out = kernel.run("%distributed start --nprocs 2 --persist").stdout
        # the cell returns once the ranks have joined, and says who they are
        assert re.search(r"pool ready in [\d.]+ s: 2 ranks \(pids \d+, \d+\), gloo, persist",
                         out), out
        assert "pending" not in kernel.run("%distributed status").stdout
        # load once: each rank keeps its own shard in its namespace
        reply = kernel.execute(cell("distributed", """
            shard = torch.arange(3) + 10 * rank
            where = os.getpid()
        """), timeout=180)
        assert reply.status == "ok", reply
        # the next cell uses the ranks' own `shard`, not rank 0's copy in the notebook
        started = time.monotonic()
        reply = kernel.execute(cell("distributed", """
            total = shard.sum()
            dist_sums = [torch.zeros((), dtype=total.dtype) for _ in range(world_size)]
            torch.distributed.all_gather(dist_sums, total)
            sums = [t.item() for t in dist_sums]
            again = os.getpid() == where
        """), timeout=60)
        warm = time.monotonic() - started
        assert reply.status == "ok", reply
        assert kernel.value("sums, again") == ([3, 33], True)
        assert warm < 5, warm  # a cell round trip in the kernel, no torchrun launch
        status = kernel.run("%distributed status").stdout
        assert re.search(r"pool up: 2 ranks on cpu, gloo, 2 tasks run, idle [\d.]+s, "
                         r"persist\n  rank 0 idle \(pid \d+\), rank 1 idle", status), status
        where = kernel.run("%distributed stacks").stdout
        assert "rank 0: idle, waiting for the next task" in where, where
        assert "rank 1: idle, waiting for the next task" in where, where

        # options that contradict the pool are refused; --fresh runs a cold job
        reply = kernel.execute(cell("distributed --nprocs 3", "x = 1"))
        assert reply.status == "error" and "the pool has 2 ranks" in reply.stderr, reply
        assert "--fresh" in reply.stderr
        reply = kernel.execute(cell("distributed --fresh --nprocs 3", "ws = world_size"),
                               timeout=180)
        assert reply.status == "ok" and kernel.value("ws") == 3, reply
        reply = kernel.execute("%distributed start")
        assert "a pool is already up" in reply.stderr, reply
    finally:
        out = kernel.run("%distributed stop").stdout
    assert "pool stopped after 2 task(s): its ranks are gone" in out, out
    assert "no pool to stop" in kernel.run("%distributed stop").stdout
