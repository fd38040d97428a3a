"""run_distributed end to end: real torchrun, real ranks, gloo on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nbdist
from helpers import REPO, run_script

HERE = Path(__file__).resolve().parent


def report_rank(scale, *, offset):
    """Runs on every rank: checks the helpers and the environment a rank sees."""
    import torch.distributed as dist

    import beside_module  # lives in tests/, importable because sys.path travels

    print(f"hello from rank {nbdist.rank()}")
    t = torch.tensor([float(nbdist.rank() + 1)])
    dist.all_reduce(t)
    with nbdist.rank0_first():
        order = os.path.exists(os.environ["MARKER"])
        if nbdist.is_main():
            open(os.environ["MARKER"], "w").close()
    nbdist.barrier()
    return {
        "rank": nbdist.rank(), "local_rank": nbdist.local_rank(),
        "world_size": nbdist.world_size(), "is_main": nbdist.is_main(),
        "device": str(nbdist.device()), "backend": dist.get_backend(),
        "sum": t.item() * scale + offset, "cwd": os.getcwd(),
        "beside": beside_module.VALUE, "marker_seen_before_block": order,
        "env": os.environ.get("NBDIST_TEST_VAR"),
        "tensor": torch.ones(2, requires_grad=False) * nbdist.rank(),
    }


def test_return_all_args_kwargs_helpers_output_and_job_record(tmp_path, capfd, monkeypatch):
    (tmp_path / "beside_module.py").write_text("VALUE = 'imported beside the caller'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = nbdist.run_distributed(report_rank, 10, offset=1, nprocs=2, return_all=True,
                                 env={"NBDIST_TEST_VAR": "passed",
                                      "MARKER": str(tmp_path / "marker")})
    assert [r["rank"] for r in out] == [0, 1]
    for r, value in enumerate(out):
        assert value["world_size"] == 2 and value["local_rank"] == r
        assert value["is_main"] == (r == 0)
        assert value["device"] == "cpu" and value["backend"] == "gloo"
        assert value["sum"] == 31.0
        assert value["cwd"] == str(tmp_path)
        assert value["beside"] == "imported beside the caller"
        assert value["env"] == "passed"
        assert torch.equal(value["tensor"], torch.full((2,), float(r)))
    # rank0_first: rank 0 ran the block before the others
    assert out[0]["marker_seen_before_block"] is False
    assert out[1]["marker_seen_before_block"] is True

    captured = capfd.readouterr()
    assert "hello from rank 0" in captured.out
    assert "hello from rank 1" not in captured.out + captured.err

    job = nbdist.last_job()
    assert job.status == "succeeded" and job.world_size == 2
    assert [r.exitcode for r in job.ranks] == [0, 0]
    assert [r.state for r in job.ranks] == ["done", "done"]
    assert "hello from rank 1" in job.log(1) and "hello from rank 0" in job.log(0)
    assert 0 < job.duration < 60
    assert oct(os.stat(job.dir).st_mode & 0o777) == "0o700"
    assert not (Path(job.dir) / "payload.pt").exists()  # the input is deleted, results kept
    assert [j.id for j in nbdist.jobs()] == [job.id]

    # a fresh process (a restarted kernel) reloads the result from the job directory
    proc = run_script(f"""
        import nbdist
        values = nbdist.load_result({job.dir!r})
        print([v["rank"] for v in values], nbdist.load_result({job.dir!r}, rank=1)["sum"])
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[0, 1] 31.0"


@pytest.mark.slow
def test_main_module_functions_and_classes_round_trip():
    """Functions and classes defined in __main__ (as in a notebook) travel by value."""
    proc = run_script("""
        import torch, nbdist
        from torch.nn.parallel import DistributedDataParallel as DDP

        class Point:
            def __init__(self, x):
                self.x = x

        def scale(p):
            return p.x * 2

        def job(p):
            model = DDP(torch.nn.Linear(2, 2))
            return {"point": Point(scale(p) + nbdist.rank()), "model": model,
                    "state": model.module.state_dict()}

        out = nbdist.run_distributed(job, Point(21), nprocs=2, display="none")
        print(type(out["point"]) is Point, out["point"].x,
              type(out["model"]).__name__, sorted(out["state"]))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True 42 Linear ['bias', 'weight']"


@pytest.mark.slow
def test_ddp_training_matches_plain_torchrun(tmp_path):
    """The same DDP training through nbdist and as a torchrun script: same weights."""
    import convnet_train

    ours = nbdist.run_distributed(convnet_train.train, nprocs=2, display="none")
    out = tmp_path / "torchrun_state.pt"
    raw = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         "--nproc-per-node", "2", str(HERE / "convnet_train.py"), str(out)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert raw.returncode == 0, raw.stderr[-3000:]
    theirs = torch.load(out)
    assert ours.keys() == theirs.keys()
    changed = False
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)
        changed |= not torch.equal(ours[name], convnet_train.Net().state_dict()[name])
    assert changed  # the test would be void if training did nothing


@pytest.mark.slow
def test_large_rank0_output_is_delivered_whole(capfd):
    """Rank 0 printing far more than a pipe holds: nothing lost, nothing blocked."""
    def chatty(n):
        import sys
        for i in range(n):
            sys.stdout.write(f"line {i}\n")
        print("x" * 200_000)  # one very long line
        return n

    assert nbdist.run_distributed(chatty, 200_000, nprocs=2) == 200_000
    out = capfd.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("line ")]
    assert lines == [f"line {i}" for i in range(200_000)]
    assert "x" * 200_000 in out


def test_import_is_lazy_and_every_public_name_resolves():
    """Ranks and the agent import the package too: it must not pull in the caller's side."""
    proc = run_script("""
        import sys
        import nbdist
        assert not [m for m in sys.modules if m.startswith("nbdist.")], sys.modules
        from nbdist import *
        missing = [n for n in nbdist.__all__ if n not in dir(nbdist)]
        print(missing, nbdist.api.run_distributed is nbdist.run_distributed)
        try:
            nbdist.no_such_name
        except AttributeError as exc:
            print(exc)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[] True",
                                        "module 'nbdist' has no attribute 'no_such_name'"]
