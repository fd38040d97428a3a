"""Frameworks that pick their own launcher go distributed in a CPU job (issue 11).

One ``%%distributed`` cell per framework, in a real kernel — one torchrun launch each —
checks what the user would look at (process count, distributed type, world size) and
that the gradients are really synced: every rank trains on its own data, so only a
synced step leaves identical weights on both ranks (the accelerate case takes a plain
step alongside to show they would differ). A framework that is not installed is
skipped: ``pip install -e '.[frameworks]'`` brings all but fastai.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO
from kernel_util import Kernel, kernel_manager
from nbdist import frameworks

# The cells gather each rank's facts with this, and send back only ``facts``.
PER_RANK = '''
def per_rank(**facts):
    import torch.distributed as dist
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, facts)
    return gathered
'''


def needs(module: str, how: str = "pip install -e '.[frameworks]'") -> None:
    """Skip the test unless ``module`` is installed (found, not imported: imports are slow)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed ({how})")


@pytest.fixture(scope="module")
def shared_kernel(tmp_path_factory):
    km = kernel_manager(tmp_path_factory.mktemp("kernelspec"))
    km.start_kernel(cwd=str(tmp_path_factory.mktemp("kernel-cwd")))
    kernel = Kernel(km)
    try:
        kernel.run("%load_ext nbdist\nimport os\n" + PER_RANK)
        yield kernel
    finally:
        kernel.shutdown()


@pytest.fixture
def kernel(shared_kernel, nbdist_home, tmp_path):
    shared_kernel.run(f"os.environ['NBDIST_HOME'] = {nbdist_home!r}\n"
                      f"out_dir = {str(tmp_path)!r}")
    return shared_kernel


def run_cell(kernel: Kernel, body: str, timeout: float = 180) -> list[dict]:
    """Run ``body`` on 2 CPU ranks; return the ``facts`` it gathered, one dict per rank."""
    kernel.run("%%distributed --nprocs 2 --out facts\n" + textwrap.dedent(body).strip(),
               timeout=timeout)
    return kernel.value("facts")


def same_on_all_ranks(facts: list[dict], key: str) -> bool:
    return all(f[key] == facts[0][key] for f in facts)


# ------------------------------------------------------------------ no launch needed

def test_gpu_jobs_get_no_framework_environment():
    assert frameworks.launch_env("cuda") == {}
    assert frameworks.launch_env("cpu") == {"ACCELERATE_USE_CPU": "true",
                                            "PL_TRAINER_ACCELERATOR": "cpu"}


def test_on_rank_is_cheap_and_patches_a_module_when_it_is_imported(tmp_path, monkeypatch):
    # in a fresh Python, as on a rank: no framework imported, none patched before use
    (tmp_path / "fakefw").mkdir()
    (tmp_path / "fakefw" / "__init__.py").write_text("")
    (tmp_path / "fakefw" / "distributed.py").write_text("VALUE = 'original'\n")
    code = textwrap.dedent(f"""
        import sys, types
        sys.path.insert(0, {str(tmp_path)!r})
        from nbdist import frameworks
        frameworks.on_rank(types.SimpleNamespace(device="cpu", ranks_per_host=2))
        heavy = [m for m in ("torch", "accelerate", "lightning", "fastai") if m in sys.modules]
        hooks = sum(isinstance(f, frameworks._PatchOnImport) for f in sys.meta_path)
        frameworks._after_import("fakefw.distributed",
                                 lambda m: setattr(m, "VALUE", "patched"))
        import fakefw.distributed
        left = sum(isinstance(f, frameworks._PatchOnImport) for f in sys.meta_path)
        import os
        print(heavy, hooks, fakefw.distributed.VALUE, left, os.environ["PL_TRAINER_DEVICES"])
    """)
    monkeypatch.delenv("PL_TRAINER_DEVICES", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["[]", "2", "patched", "2", "2"]  # the fake's one-shot hook is gone


# ------------------------------------------------------------------ one launch each

@pytest.mark.slow
def test_accelerate_goes_multi_cpu_without_cpu_true(kernel):
    needs("accelerate")
    facts = run_cell(kernel, """
        import copy
        import torch
        from accelerate import Accelerator, PartialState

        first = PartialState()  # made before the Accelerator, whose state it fixes
        accelerator = Accelerator()
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        plain = copy.deepcopy(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt = accelerator.prepare(model, opt)
        x = torch.full((8, 4), float(rank + 1))  # each rank its own batch
        accelerator.backward(model(x).pow(2).mean())
        opt.step()
        plain(x).pow(2).mean().backward()
        torch.optim.SGD(plain.parameters(), lr=0.1).step()  # the same step, unsynced
        facts = per_rank(
            num_processes=accelerator.num_processes, index=accelerator.process_index,
            partial_state=first.num_processes, type=str(accelerator.distributed_type),
            device=accelerator.device.type, wrapper=type(model).__name__,
            weights=accelerator.unwrap_model(model).weight.flatten().tolist(),
            unsynced=plain.weight.flatten().tolist())
    """)
    assert [f["num_processes"] for f in facts] == [2, 2]
    assert [f["index"] for f in facts] == [0, 1]
    assert [f["partial_state"] for f in facts] == [2, 2]
    assert {f["type"] for f in facts} == {"DistributedType.MULTI_CPU"}
    assert {(f["device"], f["wrapper"]) for f in facts} == {("cpu", "DistributedDataParallel")}
    assert same_on_all_ranks(facts, "weights")
    assert not same_on_all_ranks(facts, "unsynced")  # the data really differs per rank
    assert facts[0]["weights"] != facts[0]["unsynced"]


@pytest.mark.slow
def test_transformers_trainer_sees_two_processes(kernel):
    needs("transformers")
    needs("accelerate")
    facts = run_cell(kernel, """
        import torch
        from transformers import Trainer, TrainingArguments

        class Regression(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = torch.nn.Linear(4, 1)

            def forward(self, x, labels):
                return {"loss": (self.linear(x).squeeze(-1) - labels).pow(2).mean()}

        torch.manual_seed(0)
        model = Regression()
        data = [{"x": torch.full((4,), float(rank + 1)), "labels": torch.tensor(float(rank))}] * 8
        args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=4, max_steps=2,
                                 learning_rate=0.1, report_to="none", save_strategy="no",
                                 disable_tqdm=True, dataloader_pin_memory=False)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        facts = per_rank(world_size=trainer.args.world_size, mode=str(args.parallel_mode),
                         index=args.process_index, device=args.device.type,
                         processes=trainer.accelerator.num_processes,
                         weights=model.linear.weight.flatten().tolist())
    """)
    assert [f["world_size"] for f in facts] == [2, 2]
    assert [f["index"] for f in facts] == [0, 1]
    assert {(f["mode"], f["device"], f["processes"]) for f in facts} == \
        {("ParallelMode.DISTRIBUTED", "cpu", 2)}
    assert same_on_all_ranks(facts, "weights")


@pytest.mark.slow
def test_lightning_trainer_and_fabric_use_the_ranks_nbdist_started(kernel):
    needs("lightning")
    facts = run_cell(kernel, """
        import torch
        import torch.distributed as dist
        import lightning as L

        class Regression(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.linear = torch.nn.Linear(4, 1)

            def training_step(self, batch, batch_idx):
                x, y = batch
                return (self.linear(x).squeeze(-1) - y).pow(2).mean()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        data = torch.utils.data.TensorDataset(torch.full((8, 4), float(rank + 1)),
                                              torch.full((8,), float(rank)))
        quiet = dict(max_steps=2, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=out_dir, use_distributed_sampler=False)
        seen = {}
        for name, flags in [("explicit", dict(accelerator="cpu", devices=2, strategy="ddp")),
                            ("default", {})]:
            torch.manual_seed(0)
            module = Regression()
            trainer = L.Trainer(**quiet, **flags)
            trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
            seen[name] = dict(world_size=trainer.world_size,
                              strategy=type(trainer.strategy).__name__,
                              cluster=type(trainer.strategy.cluster_environment).__name__,
                              spawned=len(trainer.strategy.launcher.procs),
                              weights=module.linear.weight.flatten().tolist())

        fabric = L.Fabric(accelerator="cpu", devices=2)
        fabric.launch()
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
        fabric.backward(model(torch.full((4, 4), float(rank + 1))).pow(2).mean())
        opt.step()
        seen["fabric"] = dict(world_size=fabric.world_size, index=fabric.global_rank,
                              strategy=type(fabric.strategy).__name__,
                              weights=model.module.weight.flatten().tolist())
        facts = per_rank(**seen, group=dist.is_initialized() and dist.get_backend())
    """, timeout=240)
    for name in ("explicit", "default"):
        runs = [f[name] for f in facts]
        assert [r["world_size"] for r in runs] == [2, 2], name
        assert {(r["strategy"], r["cluster"], r["spawned"]) for r in runs} == \
            {("DDPStrategy", "TorchElasticEnvironment", 0)}, name
        assert same_on_all_ranks(runs, "weights"), name
    fabric_runs = [f["fabric"] for f in facts]
    assert [(r["world_size"], r["index"]) for r in fabric_runs] == [(2, 0), (2, 1)]
    assert {r["strategy"] for r in fabric_runs} == {"DDPStrategy"}
    assert same_on_all_ranks(fabric_runs, "weights")
    assert {f["group"] for f in facts} == {"gloo"}  # nbdist's group, still up


@pytest.mark.slow
def test_fastai_distrib_ctx_trains_in_sync_on_the_cpu(kernel):
    needs("fastai", "not in the frameworks extra: its torchvision pulls another torch; see README")
    needs("accelerate")
    facts = run_cell(kernel, """
        import torch
        from fastai.basics import DataLoaders, Learner, MSELossFlat, SGD
        from fastai.distributed import *

        torch.manual_seed(0)
        items = [(torch.full((4,), float(rank + 1)), torch.full((1,), float(rank)))] * 16
        dls = DataLoaders.from_dsets(items, items, bs=4, device="cpu")
        learn = Learner(dls, torch.nn.Linear(4, 1), loss_func=MSELossFlat(), opt_func=SGD,
                        lr=0.1)
        with learn.distrib_ctx(in_notebook=True):
            trainer = next(cb for cb in learn.cbs if isinstance(cb, DistributedTrainer))
            with learn.no_logging(), learn.no_bar():
                learn.fit(1)
        facts = per_rank(processes=trainer.accelerator.num_processes,
                         type=str(trainer.accelerator.distributed_type),
                         weights=learn.model.weight.flatten().tolist())
    """, timeout=240)
    assert [f["processes"] for f in facts] == [2, 2]
    assert {f["type"] for f in facts} == {"DistributedType.MULTI_CPU"}
    assert same_on_all_ranks(facts, "weights")


# ------------------------------------------------------------------ the examples

EXAMPLES = [("accelerate_cpu.py", "accelerate", "processes: 2 (DistributedType.MULTI_CPU)"),
            ("lightning_cpu.py", "lightning", "world size: 2")]


@pytest.mark.slow
@pytest.mark.parametrize("script,module,says", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_trains_on_two_cpu_processes(script, module, says, tmp_path):
    needs(module)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "examples" / script)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert says in proc.stdout, proc.stdout
    fitted = re.search(r"weights: \[(\S+), (\S+)\], bias: (\S+)", proc.stdout)
    assert fitted, proc.stdout
    assert [float(v) for v in fitted.groups()] == pytest.approx([3, -2, 1], abs=0.05)
    assert "weights identical on both ranks: True" in proc.stdout, proc.stdout
    assert list(cwd.iterdir()) == []  # no lightning_logs, no checkpoints
