"""Where the time of a 2-process noop job goes, nbdist next to raw torchrun.

    python benchmarks/profile_launch.py [--runs 5]

Nothing in nbdist or torch is edited. Every process of both kinds of job (torchrun's
agent, the ranks) starts with a ``sitecustomize`` from a temporary folder put on
``PYTHONPATH``; it appends time stamps to one file: interpreter up, torch imported,
nbdist imported, rendezvous done, workers started, ``init_process_group`` /
``destroy_process_group`` entered and left, atexit. nbdist's ranks also stamp their
own status events (payload loaded = "joining"). In the caller, nbdist's steps are
timed by wrapping its functions (pack, Popen, supervise, read result, kill, save).
The printed table gives the median duration of each segment of the launch (from
the call to the agent's interpreter, its torch import, the rendezvous, the ranks'
imports, ... to the call's return) for both launches, and the difference.

Caveat: the import hook itself costs ~1 µs per ``import`` statement in the child
processes, the same for both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("OMP_NUM_THREADS", "1")

import nbdist  # noqa: E402
from nbdist import api, job as job_mod, supervise  # noqa: E402
from nbdist.launch import local  # noqa: E402

sys.path.insert(0, str(HERE))
import workloads  # noqa: E402

SITECUSTOMIZE = r'''
import builtins, os, sys, time, json, atexit
_T0 = time.time()
_OUT = os.environ.get("NBDIST_PROFILE")

def _cmd():
    try:
        return open("/proc/self/cmdline", "rb").read().split(b"\0")
    except OSError:
        return []

_ARGV = _cmd()
if b"nbdist._agent" in _ARGV or b"torch.distributed.run" in _ARGV:
    _ROLE = "agent"
elif any(a.endswith(b"entry.py") or a.endswith(b"workloads.py") for a in _ARGV):
    _ROLE = "rank"
else:
    _ROLE = None

def _stamp(event, t=None):
    line = json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "role": _ROLE,
                       "rank": os.environ.get("RANK"), "event": event,
                       "t": time.time() if t is None else t}) + "\n"
    fd = os.open(_OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, line.encode())
    os.close(fd)

if _OUT and _ROLE:
    _stat = open("/proc/self/stat").read()
    _ticks = int(_stat[_stat.rindex(")") + 2:].split()[19])
    _since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    _stamp("exec", _T0 - (_since_boot - _ticks / os.sysconf("SC_CLK_TCK")))
    _stamp("python up", _T0)
    atexit.register(_stamp, "atexit")
    _orig_import = builtins.__import__
    _seen = set()

    def _wrap(obj, attr, event):
        fn = getattr(obj, attr)
        def wrapper(*a, **k):
            _stamp(event + " >")
            try:
                return fn(*a, **k)
            finally:
                _stamp(event + " <")
        setattr(obj, attr, wrapper)

    def _ready(name):
        module = sys.modules.get(name)
        return module is not None and not getattr(module.__spec__, "_initializing", False)

    def _after_import():
        mods = sys.modules
        if "torch" not in _seen and _ready("torch"):
            _seen.add("torch")
            _stamp("torch imported")
        if "nbdist" not in _seen and _ready("nbdist"):
            _seen.add("nbdist")
            _stamp("nbdist imported")
        if "c10d" not in _seen and _ready("torch.distributed"):
            _seen.add("c10d")
            d = mods["torch.distributed"]
            _wrap(d, "init_process_group", "init_process_group")
            _wrap(d, "destroy_process_group", "destroy_process_group")
        name = "torch.distributed.elastic.agent.server.api"
        if "agent" not in _seen and _ready(name):
            _seen.add("agent")
            _wrap(mods[name].SimpleElasticAgent, "_rendezvous", "rendezvous")
            _wrap(mods[name].SimpleElasticAgent, "_exit_barrier", "exit barrier")
        name = "torch.distributed.elastic.agent.server.local_elastic_agent"
        if "local" not in _seen and _ready(name):
            _seen.add("local")
            agent = mods[name].LocalElasticAgent
            _wrap(agent, "_start_workers", "start workers")
            monitor = agent._monitor_workers

            def _monitor(*a, **k):
                result = monitor(*a, **k)
                if result.state.name != "HEALTHY" and "exited" not in _seen:
                    _seen.add("exited")
                    _stamp("sees the ranks exited")
                return result
            agent._monitor_workers = _monitor
        if "run" not in _seen and _ready("torch.distributed.run"):
            _seen.add("run")
            _stamp("agent imports done")

    def _import(name, *a, **k):
        top = name not in sys.modules
        module = _orig_import(name, *a, **k)
        if top and len(_seen) < 7:
            _after_import()
        return module

    builtins.__import__ = _import
'''


class CallerStamps:
    """Wraps nbdist's caller-side steps to time them in this process."""

    def __init__(self):
        self.stamps: list[tuple[str, float]] = []
        self._wrap(api, "write_payload", "pack")
        self._wrap(local.Launch, "__init__", "Popen torchrun")
        self._wrap(supervise.Supervisor, "follow", "supervise (until torchrun exits)")
        self._wrap(job_mod.Job, "take_result", "read result")
        self._wrap(local.Launch, "kill", "Launch.kill")
        self._wrap(job_mod.Job, "save", "job.save")

    def _wrap(self, obj, attr, event):
        fn = getattr(obj, attr, None)
        if fn is None:  # a step this version of nbdist does not have
            return
        stamps = self.stamps

        def wrapper(*a, **k):
            stamps.append((event + " >", time.time()))
            try:
                return fn(*a, **k)
            finally:
                stamps.append((event + " <", time.time()))
        setattr(obj, attr, wrapper)


def read_stamps(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def timeline(stamps: list[dict], t0: float, extra: list[tuple[str, float]] = ()) -> dict:
    """Phase → seconds since the call; per role the first ('>' / single) stamps."""
    out: dict[str, float] = {}
    for name, t in extra:
        out.setdefault(f"caller: {name}", t - t0)
    for s in stamps:
        role = s["role"]
        key = f"{role}: {s['event']}" if role == "agent" else f"ranks: {s['event']}"
        # for ranks keep the *last* rank to reach each phase: the job waits for it
        if role == "rank":
            out[key] = max(out.get(key, 0.0), s["t"] - t0)
        else:
            out.setdefault(key, s["t"] - t0)
    return out


def rank_events(job_dir: Path, t0: float) -> dict:
    """nbdist's own status events per rank (last rank to reach each state)."""
    out: dict[str, float] = {}
    for path in job_dir.glob("events-rank-*.jsonl"):
        for line in path.read_text().splitlines():
            e = json.loads(line)
            if e["kind"] == "status":
                key = f"ranks: nbdist status {e['state']}"
                out[key] = max(out.get(key, 0.0), e["time"] - t0)
    return out


def run_raw(env: dict) -> tuple[float, dict]:
    out = Path(env["NBDIST_PROFILE"])
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(HERE / "workloads.py"), "noop",
               str(Path(tmp) / "o.json")]
        t0 = time.time()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        t1 = time.time()
    phases = timeline(read_stamps(out), t0)
    phases["caller: call returns"] = t1 - t0
    return t1 - t0, phases


def run_nbdist(env: dict, caller: CallerStamps) -> tuple[float, dict]:
    import contextlib
    import io

    caller.stamps.clear()
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        t0 = time.time()
        with contextlib.redirect_stdout(io.StringIO()):
            nbdist.run_distributed(workloads.noop, nprocs=2, display="plain")
        t1 = time.time()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    job_dir = Path(nbdist.last_job().dir)
    phases = timeline(read_stamps(Path(env["NBDIST_PROFILE"])), t0, caller.stamps)
    phases.update(rank_events(job_dir, t0))
    phases["caller: call returns"] = t1 - t0
    shutil.rmtree(job_dir, ignore_errors=True)
    return t1 - t0, phases




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nbdist-profile-"))
    (work / "site").mkdir()
    (work / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    os.environ["NBDIST_HOME"] = str(work / "home")
    caller = CallerStamps()
    raw_runs, nb_runs = [], []
    try:
        for i in range(args.runs + 1):  # the first pair warms the page cache, dropped
            for side in (("raw", "nb") if i % 2 else ("nb", "raw")):
                prof = work / f"stamps-{i}-{side}.jsonl"
                env = dict(os.environ, NBDIST_PROFILE=str(prof),
                           PYTHONPATH=os.pathsep.join(
                               [str(work / "site")] + [p for p in
                                                       os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
                if side == "raw":
                    result = run_raw(env)
                else:
                    result = run_nbdist(env, caller)
                if i:
                    (raw_runs if side == "raw" else nb_runs).append(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{args.runs} runs of each, interleaved; load average now "
          f"{os.getloadavg()[0]:.1f}\n")
    print(segments_table(raw_runs, nb_runs))
    print(f"\nmedian wall: raw {statistics.median(t for t, _ in raw_runs):.3f} s, "
          f"nbdist {statistics.median(t for t, _ in nb_runs):.3f} s")


# (segment, the phase it starts at, the phase it ends at); a phase missing on one side
# (raw torchrun has no nbdist import) makes that side's segment start at the previous one
SEGMENTS = [
    ("caller: pack the payload, start torchrun", None, "agent: python up"),
    ("agent: import nbdist (nbdist only)", "agent: python up", "agent: nbdist imported"),
    ("agent: import torch", "agent: nbdist imported|agent: python up",
     "agent: torch imported"),
    ("agent: rendezvous (TCPStore), spawn ranks", "agent: torch imported",
     "ranks: python up"),
    ("ranks: import nbdist (nbdist only)", "ranks: python up", "ranks: nbdist imported"),
    ("ranks: import torch (both ranks at once)", "ranks: nbdist imported|ranks: python up",
     "ranks: torch imported"),
    ("ranks: load payload, init_process_group", "ranks: torch imported",
     "ranks: init_process_group <"),
    ("ranks: fn, destroy_process_group, result", "ranks: init_process_group <",
     "ranks: atexit"),
    ("ranks: interpreter teardown, agent notices", "ranks: atexit",
     "agent: sees the ranks exited"),
    ("agent: exit barrier", "agent: sees the ranks exited", "agent: exit barrier <"),
    ("agent: interpreter teardown, caller notices", "agent: exit barrier <",
     "caller: supervise (poll until torchrun exits) <|caller: call returns"),
    ("caller: load result, kill, save job record",
     "caller: supervise (poll until torchrun exits) <|caller: call returns",
     "caller: call returns"),
]


def _phase(phases: dict, names: str | None) -> float | None:
    if names is None:
        return 0.0
    for name in names.split("|"):
        if name in phases:
            return phases[name]
    return None


def segments_table(raw_runs: list, nb_runs: list) -> str:
    """Median duration of each segment of the launch, per side, and the difference."""
    def durations(runs):
        out: dict[str, list[float]] = {}
        for _, phases in runs:
            for name, begin, end in SEGMENTS:
                a, b = _phase(phases, begin), _phase(phases, end)
                if a is not None and b is not None:
                    out.setdefault(name, []).append(b - a)
        return out

    raw, nb = durations(raw_runs), durations(nb_runs)
    lines = ["| segment of a 2-process noop job | raw torchrun | nbdist | nbdist − raw |",
             "|---|---|---|---|"]
    for name, _, _ in SEGMENTS:
        r = statistics.median(raw[name]) if name in raw else 0.0
        n = statistics.median(nb[name]) if name in nb else 0.0
        lines.append(f"| {name} | {r:.3f} s | {n:.3f} s | {n - r:+.3f} s |")
    r = statistics.median(t for t, _ in raw_runs)
    n = statistics.median(t for t, _ in nb_runs)
    lines.append(f"| **wall time of the call (median)** | **{r:.3f} s** | **{n:.3f} s** "
                 f"| **{n - r:+.3f} s** |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
