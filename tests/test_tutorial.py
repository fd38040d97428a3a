"""PyTorch's own DDP tutorial runs unchanged, however it reaches ``init_process_group``.

The tutorial imports the name at the top (``from torch.distributed import
init_process_group``); on a rank that name is bound while the payload is unpickled
(cloudpickle sends torch's function by reference, a module the function uses is
imported then), so nbdist's wrapper must be in place before that (issue 18). The
notebook form, in a real kernel, is in ``test_magic.py``.
"""

from __future__ import annotations

import json

import pytest

from helpers import run_script

# Each way a user reaches the function is called in one job: a launch is the costly part.
SCRIPT = """
    import json, sys
    sys.path.insert(0, "tests")  # travels with the job: the ranks import ddp_tutorial
    import torch
    import torch.distributed
    from torch.distributed import init_process_group
    from torch.distributed.distributed_c10d import init_process_group as c10d_init
    import nbdist
    import ddp_tutorial  # imported on the ranks while the function is unpickled

    def ddp_setup():  # the tutorial's, defined in __main__ as in a notebook: by value
        init_process_group(backend="gloo")

    def job(tutorial):
        ddp_setup()
        c10d_init("gloo")
        torch.distributed.init_process_group(backend="gloo", init_method="env://")
        try:
            c10d_init(backend="nccl")
            conflict = None
        except ValueError as exc:
            conflict = str(exc)
        ones = torch.ones(1)
        torch.distributed.all_reduce(ones)
        facts = {"world": ones.item(), "conflict": conflict}
        if tutorial:  # last: the tutorial's main() destroys the group
            weights = ddp_tutorial.main(save_every=1, total_epochs=2, batch_size=8)
            facts["weights"] = [v.flatten().tolist() for v in weights.values()]
        return facts

    cold = nbdist.run_distributed(job, True, nprocs=2, return_all=True, display="none")
    said = nbdist.last_job().log(0).count("[nbdist] init_process_group: the gloo process "
                                          "group nbdist set up is already initialised")
    with nbdist.Pool(nprocs=2) as pool:  # tasks unpickled later, in a running rank
        warm = pool.run(job, False, return_all=True, display="none")
    torch.manual_seed(0)
    untrained = [v.flatten().tolist() for v in torch.nn.Linear(20, 1).state_dict().values()]
    print(json.dumps({"cold": cold, "said": said, "warm": warm, "untrained": untrained}))
"""


@pytest.mark.slow
def test_tutorial_runs_unchanged_however_it_imports_init_process_group():
    proc = run_script(SCRIPT, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for facts in out["cold"] + out["warm"]:
        assert facts["world"] == 2.0
        assert facts["conflict"].startswith(
            "init_process_group(backend='nccl'): nbdist already initialised the default "
            "process group (backend 'gloo', world size 2"), facts["conflict"]
    assert out["said"] == 1  # four calls that do nothing, said once
    # the tutorial's module trained in step: the same weights on both ranks, changed
    rank0, rank1 = (facts["weights"] for facts in out["cold"])
    assert rank0 == rank1
    assert rank0 != out["untrained"]
