"""Making frameworks that pick their own launcher go distributed under nbdist.

HF accelerate, transformers ``Trainer``, Lightning and fastai each decide from the
environment whether they run distributed and on which device. Under torchrun they all
find RANK / WORLD_SIZE / LOCAL_RANK, and each one's own ``init_process_group`` is
skipped because nbdist's group is already up. With GPUs that is enough; on the CPU
several of them stay single-process unless told otherwise — each rank then trains
its own full copy, with no gradient sync and no error. nbdist tells them, in a CPU
job only (``device == "cpu"``; nothing changes for a GPU job):

* accelerate ``Accelerator()`` (and transformers ``Trainer``, which builds one):
  ``PartialState._prepare_backend`` only picks ``MULTI_CPU`` when ``cpu=True``;
  with ``cpu=False`` and no GPU it falls through to ``DistributedType.NO``, one
  process. ``AcceleratorState`` and ``TrainingArguments._setup_devices`` both read
  ``ACCELERATE_USE_CPU`` — what ``accelerate launch --cpu`` sets — as ``cpu=True``.
  A bare ``PartialState()`` does not, and the first state made is the one every later
  ``Accelerator()`` shares: in a CPU job ``PartialState`` is patched to read it too.
* Lightning ``Trainer``: ``TorchElasticEnvironment`` is detected (TORCHELASTIC_RUN_ID)
  and spawns nothing, but ``devices="auto"`` means one device on the CPU, so a
  ``Trainer()`` would pick ``SingleDeviceStrategy``. ``PL_TRAINER_DEVICES`` (set to
  the ranks on this host) and ``PL_TRAINER_ACCELERATOR`` are the Trainer's own
  environment defaults: arguments the user passes still win. ``Fabric`` is left
  alone: its ``LT_*`` variables override the user's arguments, so ``Fabric`` on the
  CPU needs ``devices=N`` (``"auto"`` is one CPU device).
* fastai ``distrib_ctx``: reads RANK / WORLD_SIZE, skips its own (nccl-only)
  ``setup_distrib`` as the group is up, and trains through an ``Accelerator()`` —
  covered by ``ACCELERATE_USE_CPU``. Its ``DistributedDL`` sends the batch order as a
  CUDA tensor, which no setting changes: in a CPU job that method is patched when
  ``fastai.distributed`` is imported. (fastai requires torchvision; the one pip finds
  for a CPU torch may not load, and then breaks ``import lightning`` too.)
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from nbdist.protocol import Spec


def launch_env(device: str) -> dict[str, str]:
    """Environment for every rank of a job on ``device`` ("cpu" | "cuda")."""
    if device != "cpu":
        return {}
    return {"ACCELERATE_USE_CPU": "true", "PL_TRAINER_ACCELERATOR": "cpu"}


def on_rank(spec: "Spec") -> None:
    """Rank-side preparation for frameworks, after ``init_process_group``."""
    if spec.device != "cpu":
        return
    # one Lightning device per rank on this host, as torchrun started them
    os.environ.setdefault("PL_TRAINER_DEVICES",
                          os.environ.get("LOCAL_WORLD_SIZE", str(spec.ranks_per_host)))
    _after_import("accelerate.state", _partial_state_reads_use_cpu)
    _after_import("fastai.distributed", _fastai_broadcast_on_cpu)


def _partial_state_reads_use_cpu(module: ModuleType) -> None:
    # A patch, as accelerate reads ACCELERATE_USE_CPU in AcceleratorState only: code
    # that makes a PartialState first (`with PartialState().main_process_first():`)
    # would fix the shared state at one process for every Accelerator() after it.
    init = module.PartialState.__init__

    @functools.wraps(init)
    def __init__(self, cpu: bool = False, **kwargs):
        init(self, cpu or module.parse_flag_from_env("ACCELERATE_USE_CPU"), **kwargs)

    module.PartialState.__init__ = __init__


def _fastai_broadcast_on_cpu(module: ModuleType) -> None:
    # A patch, as no setting reaches it: DistributedDL._broadcast sends the batch order
    # from rank 0 as `LongTensor(t).cuda()` ("nccl only works with cuda tensors"),
    # which raises on a CPU-only torch. gloo broadcasts CPU tensors.
    import torch
    import torch.distributed as dist

    def _broadcast(self, t, rank):
        t = torch.tensor(t, dtype=torch.long)
        dist.broadcast(t, rank)
        return t.tolist()

    module.DistributedDL._broadcast = _broadcast


def _after_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Run ``patch(module)`` once module ``name`` is imported: now, or when it is."""
    if name in sys.modules:  # the payload's own imports may have brought it
        patch(sys.modules[name])
    else:
        sys.meta_path.insert(0, _PatchOnImport(name, patch))


class _PatchOnImport:
    """A one-shot meta path finder: finds ``name`` as usual, patches it once loaded."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # before the real lookup, which would ask us again
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def exec_module(module: ModuleType) -> None:
                load(module)
                self.patch(module)

            spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec
