"""The notice for a caller whose own CUDA context sits on its ranks' GPU (fast tier).

No GPU here: torch.cuda's answers are monkeypatched, so ``plan_launch`` accepts
``gpus=`` and ``caller_gpu_notice`` sees a notebook that made CUDA tensors. Nothing is
launched: the call sites are stopped at the launcher.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import nbdist
from nbdist import launch as launchers
from nbdist.plan import Plan, caller_gpu_notice, plan_launch

from helpers import REPO

GiB = 1 << 30


@pytest.fixture
def cuda(monkeypatch):
    """A machine with ``count`` GPUs whose caller holds a context on ``current``."""
    def setup(count: int = 2, current: int = 0, reserved: int = 3 * GiB // 2,
              initialised: bool = True, visible: str | None = None) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setattr(torch.cuda, "memory_reserved",
                            lambda device=None: reserved if device == current else 0)
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    return setup


def plan(**shape) -> Plan:
    return plan_launch(**{"nprocs": None, "gpus": None, "backend": None, "timeout": None,
                          "init_timeout": None, **shape})


def test_ranks_on_the_callers_gpu_are_told_what_it_holds(cuda):
    cuda(count=2, current=0)
    notice = caller_gpu_notice(plan(gpus=1))
    assert notice is not None
    assert "cuda:0" in notice and "1.5 GiB reserved" in notice, notice
    assert "rank 0 will run on that GPU" in notice, notice
    assert "torch.cuda.empty_cache()" in notice and 'gpus=[1]' in notice, notice
    assert "CUDA_VISIBLE_DEVICES" not in notice, notice  # ids are this process's own


def test_a_single_gpu_leaves_only_freeing_it(cuda):
    cuda(count=1, current=0, reserved=300 << 20)
    notice = caller_gpu_notice(plan(gpus=1))
    assert "300 MiB reserved" in notice and "empty_cache" in notice, notice
    assert "gpus=" not in notice, notice  # there is no other GPU to suggest


def test_the_default_plan_uses_every_gpu_and_names_the_rank_that_shares(cuda):
    cuda(count=4, current=2)
    notice = caller_gpu_notice(plan())  # one rank per visible GPU
    assert "cuda:2" in notice and "rank 2 will run" in notice, notice
    assert 'gpus=[0, 1, 3]' in notice, notice


def test_ranks_on_other_gpus_get_no_notice(cuda):
    cuda(count=2, current=0)
    assert caller_gpu_notice(plan(gpus=[1])) is None
    assert caller_gpu_notice(plan(gpus="1")) is not None  # a count: GPU 0
    cuda(count=2, current=1)
    assert caller_gpu_notice(plan(gpus=[0])) is None


def test_the_callers_gpu_is_found_through_cuda_visible_devices(cuda):
    # the caller sees physical GPUs 2 and 3 as cuda:0 and cuda:1; its context is on 2
    cuda(count=2, current=0, visible="2,3")
    assert caller_gpu_notice(plan(gpus=[1])) is None  # physical 3
    notice = caller_gpu_notice(plan(gpus=[0]))
    assert "cuda:0, CUDA_VISIBLE_DEVICES entry '2'" in notice, notice


@pytest.mark.parametrize("case", ["not initialised", "cpu plan", "other hosts"])
def test_nothing_to_say(cuda, case):
    cuda(count=2, current=0, initialised=case != "not initialised")
    shape = {"cpu plan": dict(nprocs=2), "other hosts": dict(gpus=1, hosts=["gpu1"]),
             "not initialised": dict(gpus=1)}[case]
    assert caller_gpu_notice(plan(**shape)) is None


def test_a_broken_cuda_never_stops_the_launch(cuda, monkeypatch):
    cuda(count=2, current=0)

    def broken(device=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(torch.cuda, "memory_reserved", broken)
    assert caller_gpu_notice(plan(gpus=1)) is None


def test_torch_is_never_imported_for_the_notice():
    code = textwrap.dedent("""
        import sys
        from nbdist.plan import Plan, caller_gpu_notice
        plan = Plan(ranks_per_host=1, device="cuda", backend="nccl", visible_devices="0",
                    timeout=None, init_timeout=None)
        assert caller_gpu_notice(plan) is None
        assert "torch" not in sys.modules, "caller_gpu_notice imported torch"
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


class Launched(Exception):
    """Raised by the stand-in launcher: the call got as far as starting the ranks."""


@pytest.mark.parametrize("entry", ["run_distributed", "Pool"])
def test_the_notice_comes_before_the_launch_at_the_users_line(cuda, monkeypatch, entry):
    cuda(count=2, current=0)

    def start(*args, **kwargs):
        raise Launched
    monkeypatch.setattr(launchers, "start", start)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(Launched):
        warnings.simplefilter("always")
        if entry == "Pool":
            nbdist.Pool(gpus=1)
        else:
            nbdist.run_distributed(lambda: None, gpus=1, display="none")
    notices = [w for w in caught if "holds a CUDA context on cuda:0" in str(w.message)]
    assert len(notices) == 1, [str(w.message) for w in caught]
    assert notices[0].filename == __file__  # it points at the user's call, not at nbdist
