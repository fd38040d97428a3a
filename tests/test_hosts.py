"""Ranks on several hosts (issue 13): over ssh, and as Slurm job steps.

The hosts are real daemons on this machine (``remote_hosts.py``, started by
``.ci/hosts``): sshd on 127.0.0.1 and 127.0.0.2, each side with a private tmpfs over
the job roots, so nothing of a job's folder is shared with the caller; and a Slurm
cluster of two nodes. Every launch is a real ``ssh``/``srun`` of a real torchrun with
c10d rendezvous; conftest's leftover check sees the remote processes too (they name
the job's id).
"""

from __future__ import annotations

import _thread
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

import nbdist
from helpers import REPO, kill_caller_once_running, rank_states, start_script, wait_for_ranks
from kernel_util import Kernel, kernel_manager
from nbdist import supervise
from nbdist.job import Job, RankStatus
from nbdist.plan import plan_launch, rank_spec
from nbdist.pool import KEPT
from remote_hosts import (BAD_KEY_HOST, NO_HOST, SLURM_NODES, SSH_HOSTS, slurm_cluster,  # noqa: F401
                          ssh_hosts, ssh_options, ssh_run)
from test_failures import StallWhenUnpickled

LAUNCH_ERROR_SECONDS = 15  # an unreachable host is an error within this


def on_hosts(**more):
    return dict(hosts=SSH_HOSTS, ssh_options=ssh_options(), nprocs=2, display="none", **more)


def where_am_i(big):
    import os
    import sys

    import torch
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    print(f"rank {dist.get_rank()} says hello", flush=True)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(),
            "local": int(os.environ["LOCAL_RANK"]), "host": os.environ["NBDIST_HOST"],
            "sum": t.item(), "big": float(big.double().sum()), "entry": sys.argv[0],
            "gloo": os.environ.get("GLOO_SOCKET_IFNAME"), "back": big[:1024] * 2}


def sleep_forever():
    import time

    time.sleep(600)


def fail_on_rank_3(how):
    import os
    import signal

    import torch
    import torch.distributed as dist

    if dist.get_rank() == 3:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError("rank 3 disagrees")
    if how != "alone":
        dist.all_reduce(torch.ones(1))  # the others wait for rank 3 in a real collective


def remote_folders(host: str) -> list[str]:
    """The job folders the host's relays keep (under hosts/<its hostname>/)."""
    listing = ssh_run(host, "find ~/.cache/nbdist/hosts -mindepth 2 -maxdepth 2 "
                            "-printf '%f\\n' 2>/dev/null")
    return listing.stdout.split()


# ------------------------------------------------------------------ no launch needed

def test_several_hosts_need_ranks_per_host_and_keep_gloo_off_loopback():
    with pytest.raises(nbdist.InvalidArgumentError, match="nprocs=N .* or gpus=N"):
        plan_launch(nprocs=None, gpus=None, backend=None, timeout=None, init_timeout=None,
                    hosts=["a", "b"])
    with pytest.raises(nbdist.InvalidArgumentError, match="pick one"):
        plan_launch(nprocs=1, gpus=None, backend=None, timeout=None, init_timeout=None,
                    hosts=["a"], slurm={"nodes": 1})
    with pytest.raises(nbdist.InvalidArgumentError, match="does not know \\['gpus'\\]"):
        plan_launch(nprocs=1, gpus=None, backend=None, timeout=None, init_timeout=None,
                    slurm={"nodes": 1, "gpus": 2})
    with pytest.raises(nbdist.InvalidArgumentError, match="bad: \\['a b'\\]"):
        plan_launch(nprocs=1, gpus=None, backend=None, timeout=None, init_timeout=None,
                    hosts=["a b"])
    # GPUs on other hosts are theirs to check: no local GPU needed to ask for them
    plan = plan_launch(nprocs=None, gpus=2, backend=None, timeout=None, init_timeout=None,
                       hosts="a,b")
    assert (plan.world_size, plan.backend, plan.visible_devices) == (4, "nccl", "0,1")
    one = plan_launch(nprocs=2, gpus=None, backend=None, timeout=None, init_timeout=None)
    several = plan_launch(nprocs=2, gpus=None, backend=None, timeout=None,
                          init_timeout=None, hosts=["a", "b"])
    assert rank_spec(one, None).env_overrides.get("GLOO_SOCKET_IFNAME") == "lo" or \
        "GLOO_SOCKET_IFNAME" in os.environ
    assert "GLOO_SOCKET_IFNAME" not in rank_spec(several, None).env_overrides


# ----------------------------------------------------------------------------- ssh

@pytest.mark.slow
def test_two_hosts_form_one_world_and_share_no_folder(ssh_hosts, nbdist_home):
    big = torch.arange(4 << 20, dtype=torch.float32)  # 16 MiB, sent once to each host
    values = nbdist.run_distributed(where_am_i, big, return_all=True, **on_hosts())
    assert [v["rank"] for v in values] == [0, 1, 2, 3]
    assert {v["world"] for v in values} == {4}
    assert sorted((v["host"], v["local"]) for v in values) == [
        ("host1", 0), ("host1", 1), ("host2", 0), ("host2", 1)]
    assert {v["sum"] for v in values} == {6.0}
    assert {v["big"] for v in values} == {float(big.double().sum())}
    torch.testing.assert_close(values[0]["back"], big[:1024] * 2)
    # gloo talks over the interface the caller reached each host through (loopback
    # here), chosen per host, not nbdist's single-machine default
    assert {v["gloo"] for v in values} == {"lo"}
    job = nbdist.last_job()
    assert job.hosts == SSH_HOSTS
    assert sorted(r.host for r in job.ranks) == ["host1", "host1", "host2", "host2"]
    # the ranks ran in folders of their own, which the caller cannot see ...
    assert not any(os.path.exists(v["entry"]) for v in values)
    # ... and what they wrote came back into the caller's job folder
    for rank in range(4):
        assert f"rank {rank} says hello" in job.log(rank)
    assert "[host2] relay" in (Path(job.dir) / "launcher.log").read_text()
    # nothing is left on the hosts
    for host in SSH_HOSTS:
        assert not [f for f in remote_folders(host) if f.startswith(job.id)]


@pytest.mark.slow
def test_ddp_on_two_hosts_matches_four_processes_of_torchrun(ssh_hosts, tmp_path):
    import convnet_train

    ours = nbdist.run_distributed(convnet_train.train, **on_hosts())
    out = tmp_path / "torchrun_state.pt"
    raw = subprocess.run(
        [os.sys.executable, "-m", "torch.distributed.run", "--standalone",
         "--nproc-per-node", "4", str(REPO / "tests" / "convnet_train.py"), str(out)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert raw.returncode == 0, raw.stderr[-3000:]
    theirs = torch.load(out)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("how, error, said", [
    ("raise", ValueError, "raised on rank 3 of 4 (host host2"),
    ("kill", nbdist.WorkerCrashedError, "rank 3 on host host2 died without a Python "
                                        "exception: killed by SIGKILL"),
])
def test_a_failing_rank_is_named_with_its_host(ssh_hosts, how, error, said):
    with pytest.raises(error) as caught:
        nbdist.run_distributed(fail_on_rank_3, how, **on_hosts())
    text = str(caught.value) + "\n".join(getattr(caught.value, "__notes__", []))
    assert said in text


@pytest.mark.parametrize("hosts, env, said", [
    ([SSH_HOSTS[0], NO_HOST], {}, "Connection refused"),  # the quick tier's one
    pytest.param([SSH_HOSTS[0], BAD_KEY_HOST], {}, "Permission denied",
                 marks=pytest.mark.slow),
    pytest.param([SSH_HOSTS[0], "nosuchhost.invalid"], {}, "Could not resolve hostname",
                 marks=pytest.mark.slow),
    pytest.param(SSH_HOSTS, {"NBDIST_REMOTE_PYTHON": "/nonexistent/python3"},
                 "/nonexistent/python3", marks=pytest.mark.slow),
], ids=["refused", "bad-key", "unknown-host", "no-python"])
def test_a_host_that_cannot_be_reached_is_named_quickly(ssh_hosts, monkeypatch, hosts, env,
                                                        said):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    with pytest.raises(nbdist.LaunchError) as caught:
        nbdist.run_distributed(sleep_forever, hosts=hosts, ssh_options=ssh_options(),
                               nprocs=2, display="none")
    assert time.monotonic() - started < LAUNCH_ERROR_SECONDS
    message = str(caught.value)
    assert caught.value.host in hosts and f"host {caught.value.host}" in message
    assert said in message
    assert "ssh -F" in message  # how to check it by hand
    # the reachable host's agent, waiting for its peer, is gone too (conftest checks)


def test_a_host_whose_torchrun_fails_before_its_ranks_start_is_named(ssh_hosts):
    broken = str(REPO / "tests" / "broken_torch")  # the agent's `import torch` fails
    with pytest.raises(nbdist.LaunchError) as caught:
        nbdist.run_distributed(sleep_forever, **on_hosts(env={"PYTHONPATH": broken}))
    message = str(caught.value)
    assert caught.value.host in SSH_HOSTS
    assert "torchrun failed there before any rank started (exit code 1)" in message
    assert "this torch is broken on purpose" in message  # torchrun's own words


def _interrupt_when(home: str, state: str | None, when: list[float], before=None):
    if state is None:  # connecting: once the job (not ``before``) is followed, before
        deadline = time.monotonic() + 30  # any host answered
        while nbdist.last_job() is before and time.monotonic() < deadline:
            time.sleep(0.001)
    else:
        wait_for_ranks(home, state, 4, timeout=30)
    when.append(time.monotonic())
    _thread.interrupt_main()


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["connecting", "starting", "running"])
def test_interrupt_in_each_phase_leaves_nothing_on_any_host(ssh_hosts, nbdist_home, phase,
                                                            record_property):
    """Before the hosts answered; with every rank up, before the process group; while
    the function runs."""
    when: list[float] = []
    state = {"connecting": None, "starting": "starting", "running": "running"}[phase]
    threading.Thread(target=_interrupt_when, args=(nbdist_home, state, when, nbdist.last_job()),
                     daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        nbdist.run_distributed(sleep_forever, **on_hosts(timeout=60))
    back = time.monotonic() - when[0]
    record_property("seconds_until_return", round(back, 2))
    assert back < 5
    assert nbdist.last_job().status == "interrupted"
    # conftest fails the test if a relay, agent or rank survived on either host


def _kill_a_relay(home: str) -> None:
    """As if host2 went away: its relay (the rank's grandparent) dies at once."""
    job_dir = wait_for_ranks(home, "running", 4)
    rank2 = rank_states(job_dir)[2]["pid"]
    psutil.Process(rank2).parent().parent().kill()


@pytest.mark.slow
def test_a_host_lost_mid_job_is_named_and_its_peers_stopped(ssh_hosts, nbdist_home):
    threading.Thread(target=_kill_a_relay, args=(nbdist_home,), daemon=True).start()
    started = time.monotonic()
    with pytest.raises(nbdist.LaunchError) as caught:
        nbdist.run_distributed(sleep_forever, **on_hosts(timeout=60))
    assert time.monotonic() - started < 30
    assert caught.value.host == "host2"
    assert str(caught.value).startswith("host host2 (ranks 2, 3): the host was lost mid-job")
    # host2's ranks died with their relay, host1's were stopped (conftest checks); the
    # folder the dead relay left is removed by the next relay starting there
    lost = nbdist.last_job().id
    assert [f for f in remote_folders("host2") if f.startswith(lost)]
    nbdist.run_distributed(where_am_i, torch.ones(1), **on_hosts())
    assert not [f for f in remote_folders("host2") if f.startswith(lost)]


def use_my_modules(box):
    import os

    import nearby  # in the caller's folder, never imported there
    import shipmod
    from shippkg import deep  # a package's submodule the caller never imported

    return (shipmod.twice(box.value), type(box).__module__, deep.VALUE, nearby.NAME,
            os.path.dirname(shipmod.__file__).endswith("modules/0"))


@pytest.mark.slow
def test_the_notebooks_own_modules_reach_hosts_without_its_folder(ssh_hosts, tmp_path,
                                                                   monkeypatch):
    """The folder is under the test's tmp_path, which the hosts do not see (a tmpfs
    there): the modules travel with the job."""
    folder = tmp_path / "notebook"
    (folder / "shippkg").mkdir(parents=True)
    (folder / "shipmod.py").write_text(
        "def twice(x):\n    return 2 * x\n\n"
        "class Box:\n    def __init__(self, value):\n        self.value = value\n")
    (folder / "shippkg" / "__init__.py").write_text("")
    (folder / "shippkg" / "deep.py").write_text("VALUE = 42\n")
    (folder / "nearby.py").write_text("NAME = 'nearby'\n")
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))  # as '' is in a notebook
    try:
        import shipmod  # a class of it goes by reference, as cloudpickle does

        values = nbdist.run_distributed(use_my_modules, shipmod.Box(21), return_all=True,
                                        **{**on_hosts(), "nprocs": 1})
    finally:
        for name in ("shipmod", "shippkg"):
            sys.modules.pop(name, None)
    assert values == [(42, "shipmod", 42, "nearby", True)] * 2


def test_a_host_that_cannot_write_the_modules_is_named_with_why(ssh_hosts, monkeypatch):
    from nbdist import shipping

    monkeypatch.setattr(shipping, "pack", lambda files: b"not zlib")  # as a full disk
    started = time.monotonic()
    with pytest.raises(nbdist.LaunchError) as caught:
        nbdist.run_distributed(sleep_forever, **on_hosts())
    assert time.monotonic() - started < LAUNCH_ERROR_SECONDS
    assert caught.value.host in SSH_HOSTS
    assert "the caller's modules could not be written" in str(caught.value)


@pytest.mark.slow
def test_a_timeout_on_two_hosts_shows_where_every_rank_was(ssh_hosts):
    with pytest.raises(nbdist.JobTimeoutError) as caught:
        # past the start of 4 ranks on 2 shared cores (9-10 s on a slow day), so that
        # every rank is in the function when the time runs out
        nbdist.run_distributed(sleep_forever, **on_hosts(timeout=20))
    where = caught.value.stacks  # the dumps came back through each host's relay
    for rank in range(4):
        assert f"rank {rank}: at " in where and "time.sleep(600)" in where
    assert "entry.py" not in where  # nbdist's own frames are counted, not shown


@pytest.mark.slow
def test_ranks_that_never_join_are_named_with_their_host(ssh_hosts):
    with pytest.raises(nbdist.InitTimeoutError) as caught:
        nbdist.run_distributed(lambda x: None, StallWhenUnpickled("NBDIST_HOST", "host2"),
                               **on_hosts(init_timeout=20))  # host1's ranks join by then
    assert caught.value.missing_ranks == [2, 3] and caught.value.hosts == ["host2"]
    assert str(caught.value).startswith("ranks [2, 3] on host2 did not join")
    assert "_stall_where" in caught.value.stacks  # where they were, from host2


def test_a_host_where_no_rank_started_is_named_with_its_last_words(tmp_path):
    """Neither host's ranks started (torchrun on host2 cannot reach the store, and
    host1's waits for it): the error names both, with what each host last said."""
    (tmp_path / "launcher.log").write_text(
        "[host1] waiting for 1 more node\n[host2] connecting to host1:29500\n"
        "[host2] RendezvousConnectionError: the connection to the C10d store has failed\n")
    job = Job(id="j", dir=str(tmp_path), world_size=4, backend="gloo", hosts=["host1", "host2"],
              ranks=[RankStatus(r, log=str(tmp_path / f"rank-{r}.log")) for r in range(4)])
    error = supervise._init_timeout_error(job, 8, where="")
    assert error.missing_ranks == [0, 1, 2, 3] and error.hosts == ["host1", "host2"]
    said = str(error)
    assert "No rank started on host2; the last lines from there:\n  [host2] connecting" in said
    assert "RendezvousConnectionError" in said and "[host1] waiting for 1 more node" in said


@pytest.mark.slow
def test_the_magic_runs_a_cell_on_two_hosts(ssh_hosts, nbdist_home, tmp_path):
    manager = kernel_manager(tmp_path / "kernelspec")
    manager.start_kernel(cwd=str(REPO))
    kernel = Kernel(manager)
    try:
        kernel.run(f"%load_ext nbdist\nimport os\nos.environ['NBDIST_HOME'] = {nbdist_home!r}"
                   f"\nscale = 3")
        kernel.run(f"%%distributed --hosts {','.join(SSH_HOSTS)} --nprocs 1 "
                   f"--ssh-options '{' '.join(ssh_options())}'\n"
                   f"import os\nwho = (rank, world_size, os.environ['NBDIST_HOST'], scale)")
        assert kernel.value("who") == (0, 2, "host1", 3)
    finally:
        kernel.shutdown()


@pytest.mark.slow
def test_a_killed_caller_takes_every_host_along(ssh_hosts, nbdist_home, record_property):
    caller = start_script(f"""
        import nbdist
        def sleep():
            import time
            time.sleep(600)
        nbdist.run_distributed(sleep, hosts={SSH_HOSTS!r}, ssh_options={ssh_options()!r},
                               nprocs=2, display="none")
    """)
    assert kill_caller_once_running(caller, nbdist_home, 4, record_property) < 10


@pytest.mark.slow
def test_pool_on_two_hosts_keeps_ranks_warm(ssh_hosts, nbdist_home):
    with nbdist.Pool(nprocs=2, hosts=SSH_HOSTS, ssh_options=ssh_options()) as pool:
        big = torch.ones(1 << 20)
        first = pool.run(where_am_i, big, return_all=True, display="none")
        pids = [r["pid"] for r in pool.status()["ranks"]]
        assert [v["rank"] for v in first] == [0, 1, 2, 3]
        assert {v["host"] for v in first} == set(SSH_HOSTS)
        for _ in range(3):
            assert pool.run(where_am_i, big, display="none")["sum"] == 6.0
        with pytest.raises(ValueError) as caught:
            pool.run(fail_on_rank_3, "alone", display="none")
        assert KEPT in caught.value.__notes__
        assert "host host2" in "\n".join(caught.value.__notes__)
        assert [r["pid"] for r in pool.status()["ranks"]] == pids
        assert pool.status()["hosts"] == SSH_HOSTS
        assert pool.run(where_am_i, big, display="none")["world"] == 4
        # stop pressed: the signal reaches the ranks through their relays
        threading.Thread(target=_interrupt_when, args=(nbdist_home, "running", []),
                         daemon=True).start()
        with pytest.raises(KeyboardInterrupt) as stopped:
            pool.run(sleep_forever, display="none")
        assert "every rank stopped its task" in "\n".join(stopped.value.__notes__)
        assert [r["pid"] for r in pool.status()["ranks"]] == pids
        pool_id = Path(pool.status()["dir"]).name
    for host in SSH_HOSTS:  # the pool's folder, its tasks' inside, are gone
        assert not [f for f in remote_folders(host) if f.startswith(pool_id)]


# --------------------------------------------------------------------------- Slurm

@pytest.mark.slow
def test_slurm_nodes_form_one_world_and_the_allocation_is_released(slurm_cluster):
    values = nbdist.run_distributed(where_am_i, torch.ones(8), return_all=True,
                                    slurm={"nodes": 2, "partition": "debug"}, nprocs=2,
                                    display="none")
    assert [v["rank"] for v in values] == [0, 1, 2, 3]
    assert sorted(v["host"] for v in values) == ["node1", "node1", "node2", "node2"]
    job = nbdist.last_job()
    assert job.hosts == ["node1", "node2"]  # known once allocated: the display groups by them
    assert not _slurm_jobs(job.id)  # salloc let the nodes go


@pytest.mark.slow
def test_a_pool_of_slurm_steps_serves_tasks_and_gives_the_nodes_back(slurm_cluster):
    with nbdist.Pool(nprocs=1, slurm={"nodes": 2}) as pool:
        for _ in range(3):
            values = pool.run(where_am_i, torch.ones(8), return_all=True, display="none")
            assert [v["host"] for v in values] == ["node1", "node2"]
        assert pool.status()["hosts"] == nbdist.last_job().hosts == ["node1", "node2"]
        pool_id = Path(pool.status()["dir"]).name
        assert len(_slurm_jobs(pool_id)) == 1  # one allocation for the pool's life
    assert not _slurm_jobs(pool_id)


@pytest.mark.slow
def test_a_queued_request_is_shown_and_withdrawn_on_interrupt(slurm_cluster, capsys):
    """Both nodes held by someone else: the display says the request waits; stop
    pressed meanwhile withdraws it."""
    holder = subprocess.run(["salloc", "--nodes", "2", "--exclusive", "--no-shell",
                             "--immediate=30", "--job-name", "someone-else"],
                            capture_output=True, text=True, timeout=60)
    assert "Granted job allocation " in holder.stderr, holder.stderr
    held = holder.stderr.split("Granted job allocation ")[1].split()[0]
    try:
        threading.Thread(target=lambda: (time.sleep(4), _thread.interrupt_main()),
                         daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            nbdist.run_distributed(sleep_forever, slurm={"nodes": 2, "args": ["--exclusive"]},
                                   nprocs=1, display="plain")
        assert "waiting for the Slurm allocation" in capsys.readouterr().out
        assert not _slurm_jobs(nbdist.last_job().id)
    finally:
        subprocess.run(["scancel", held], check=True)


@pytest.mark.slow
def test_inside_an_allocation_the_job_is_a_step_of_it(slurm_cluster, monkeypatch):
    """As in a batch job or a Jupyter server that Slurm started: its nodes, its
    allocation, which stays the user's after the job."""
    holder = subprocess.run(["salloc", "--nodes", "2", "--no-shell", "--immediate=30",
                             "--job-name", "users-own"], capture_output=True, text=True,
                            timeout=60)
    assert "Granted job allocation " in holder.stderr, holder.stderr
    allocation = holder.stderr.split("Granted job allocation ")[1].split()[0]
    try:
        monkeypatch.setenv("SLURM_JOB_ID", allocation)
        monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
        monkeypatch.setenv("SLURM_JOB_NODELIST", "node[1-2]")
        values = nbdist.run_distributed(where_am_i, torch.ones(8), slurm=True, nprocs=1,
                                        return_all=True, display="none")
        assert [v["host"] for v in values] == ["node1", "node2"]
        assert not _slurm_jobs(nbdist.last_job().id)  # no allocation of its own
        still = subprocess.run(["squeue", "-h", "-j", allocation, "-t", "R", "-o", "%i"],
                               capture_output=True, text=True).stdout.split()
        assert still == [allocation]
    finally:
        subprocess.run(["scancel", allocation], check=True)


def test_a_slurm_request_that_can_never_be_granted_fails_at_once(slurm_cluster):
    started = time.monotonic()
    with pytest.raises(nbdist.LaunchError, match="Slurm did not grant the allocation"):
        nbdist.run_distributed(sleep_forever, slurm={"nodes": len(SLURM_NODES) + 1},
                               nprocs=1, display="none")
    assert time.monotonic() - started < LAUNCH_ERROR_SECONDS


def _slurm_jobs(job_id: str) -> list[str]:
    """The Slurm jobs of an nbdist job that hold nodes or wait for them."""
    out = subprocess.run(["squeue", "-h", "-n", f"nbdist-{job_id}", "-t", "PD,R", "-o", "%i"],
                         capture_output=True, text=True).stdout
    return out.split()


def _cancel_a_step(home: str) -> None:
    job_dir = wait_for_ranks(home, "running", 4)
    allocation = _slurm_jobs(job_dir.name)[0]
    steps = subprocess.run(["squeue", "-h", "-s", "-j", allocation, "-o", "%i %N"],
                           capture_output=True, text=True).stdout.split("\n")
    step = next(line.split()[0] for line in steps if line.endswith("node2"))
    subprocess.run(["scancel", step], check=True)


@pytest.mark.slow
def test_a_slurm_step_cancelled_from_outside_is_a_lost_host(slurm_cluster, nbdist_home):
    threading.Thread(target=_cancel_a_step, args=(nbdist_home,), daemon=True).start()
    with pytest.raises(nbdist.NbdistError) as caught:
        nbdist.run_distributed(sleep_forever, slurm={"nodes": 2}, nprocs=2, display="none")
    assert "node2" in str(caught.value)
    assert not _slurm_jobs(nbdist.last_job().id)
