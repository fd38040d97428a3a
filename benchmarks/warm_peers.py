"""A warm ``%%distributed`` cell next to the peers that keep workers alive, in real
Jupyter kernels (``run.py --only warm``; issue 18, item 4).

Each tool gets a kernel of its own, started with ``jupyter_client`` from this Python:

===================  =========================================================================
nbdist               ``%load_ext nbdist``, ``%distributed start --nprocs 2``; the measured cells
                     are ``%%distributed`` + ``pass`` (default options: in a kernel the default
                     display is the ipywidgets dashboard) and ``%%distributed --quiet`` + ``pass``
ipyparallel          ``ipyparallel.Cluster(n=2).start_and_connect_sync(activate=True)`` (the 9.x
                     docs' way to register ``%px``); the measured cell is ``%%px`` + ``pass``
jupyter-distributed  its kernel proxy (``python -m jupyter_distributed.kernel``) with
                     ``JUPYTER_DISTRIBUTED_WORLD_SIZE=2``, launched as its Jupyter Server
                     extension launches it (``coordinator.KernelLaunchAdapter.configure_proxy``):
                     every cell runs on 2 persistent rank kernels; the measured cell is ``pass``
===================  =========================================================================

The cells are interleaved: each round runs one cell of every tool, in an order that
rotates by one each round, one cell at a time, so that the machine's load changes
cancel out; the first rounds are warm-up and dropped. A cell's time runs from just
before its ``execute_request`` is sent until both its ``execute_reply`` (shell) and the
kernel's ``status: idle`` (iopub, sent after the reply) have arrived: the cell is done
and every output it produced is in. The table reports that; the time to the reply
alone is in the details. Both sockets are waited on together (``zmq.Poller``), so each
message is stamped when it arrives.

Then, on nbdist's own: ``pool.run(noop, display="none")`` on the kernel's pool (a cell
that times each call), and the same in a plain script process (``python
warm_peers.py noop-script``): ``Pool(nprocs=2)``, a few warm-up tasks, then timed
tasks.

The kernels' environment is explicit: this environment without ``NBDIST_DISPLAY`` (so
``"auto"`` applies, which in a kernel is the dashboard), ``PYTHONPATH`` led by the
checkout whose ``nbdist`` this run imported, run.py's ``NBDIST_HOME``, a private
``IPYTHONDIR`` (no user profile or startup files; ipyparallel writes its cluster files
there) and ``OMP_NUM_THREADS=1``. The peers are optional (``pip install ipyparallel
jupyter-distributed``): one that is not installed, or fails, is a row that says so.
``NBDIST_BENCH_PEERS`` picks them (default ``ipyparallel,jupyter-distributed``; ``none``:
nbdist's side only). Every kernel, cluster and pool started here is stopped at the end;
the processes each kernel had under it are checked gone (and killed, and reported, if
not).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent

PEERS = ("ipyparallel", "jupyter-distributed")
PEERS_ENV = "NBDIST_BENCH_PEERS"
CELL_TIMEOUT = 60.0  # seconds a measured cell may take before its tool is given up
SETUP_TIMEOUT = 180.0  # a kernel's set-up cells (a pool or a cluster starting)
GONE_GRACE = 10.0  # seconds a kernel's processes get to exit after it is shut down


# ---------------------------------------------------------------- kernels

@dataclass
class CellTime:
    reply_s: float  # execute_request sent -> execute_reply received
    done_s: float  # ... -> both the reply and the kernel's status idle received
    iopub: int  # iopub messages of this cell (outputs, comms, status)


@dataclass
class Result:
    status: str | None = None
    ename: str = ""
    evalue: str = ""
    stdout: str = ""
    stderr: str = ""
    outputs: list[str] = field(default_factory=list)  # text/plain of results, displays
    # (and of display updates: jupyter-distributed shows its ranks' outputs in one
    # display, "running" first, then updated with the final outputs)
    time: CellTime | None = None

    def failure(self) -> str:
        return (f"{self.ename}: {self.evalue}".strip(": ")
                or self.stderr.strip()[-300:] or f"status {self.status}")


class KernelTimeout(RuntimeError):
    pass


class KernelSession:
    """One kernel: its manager, a blocking client, and the processes it started."""

    def __init__(self, name: str, km, env: dict[str, str], cwd: str, log_dir: Path):
        import psutil

        self.name = name
        self.km = km
        self.kc = None
        self.closed = False
        self.procs: dict[int, "psutil.Process"] = {}
        # the kernel's own output (and that of what it starts) goes to a file, quoted
        # when something fails, instead of into the benchmark's stderr
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "ab") as log:
            km.start_kernel(env=env, cwd=cwd, stdout=log, stderr=log)
        self.pid = km.provisioner.pid
        self._remember()

    def connect(self, timeout: float) -> None:
        import zmq

        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=timeout)
        self._remember()
        self.poller = zmq.Poller()
        self.shell = self.kc.shell_channel.socket
        self.iopub = self.kc.iopub_channel.socket
        self.poller.register(self.shell, zmq.POLLIN)
        self.poller.register(self.iopub, zmq.POLLIN)

    def _remember(self) -> None:
        """Note the kernel and everything under it, to check at the end that all is gone
        (a process that outlives the kernel has been re-parented away from it)."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            for proc in [root, *root.children(recursive=True)]:
                self.procs.setdefault(proc.pid, proc)
        except psutil.Error:
            pass

    def execute(self, code: str, timeout: float) -> Result:
        """Run ``code``; stamp the reply and the idle status as each arrives."""
        self._drain()  # stragglers of an earlier cell (a comm message) are not this one's
        result = Result()
        reply_at = idle_at = None
        iopub = 0
        start = time.perf_counter()
        msg_id = self.kc.execute(code, allow_stdin=False)
        deadline = start + timeout
        while reply_at is None or idle_at is None:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise KernelTimeout(f"{self.name}: no reply within {timeout:.0f} s to "
                                    f"{code.splitlines()[0]!r}")
            ready = dict(self.poller.poll(max(1, int(min(left, 1.0) * 1000))))
            now = time.perf_counter()
            if not ready and not self.km.is_alive():
                raise KernelTimeout(f"{self.name}: the kernel died during "
                                    f"{code.splitlines()[0]!r}")
            if self.shell in ready:
                while self.shell.poll(0):
                    msg = self.kc.shell_channel.get_msg(timeout=0)
                    if msg["parent_header"].get("msg_id") == msg_id:
                        reply_at = now
                        result.status = msg["content"]["status"]
                        result.ename = msg["content"].get("ename", "")
                        result.evalue = msg["content"].get("evalue", "")
            if self.iopub in ready:
                while self.iopub.poll(0):
                    msg = self.kc.iopub_channel.get_msg(timeout=0)
                    if msg["parent_header"].get("msg_id") != msg_id:
                        continue
                    iopub += 1
                    kind, content = msg["msg_type"], msg["content"]
                    if kind == "status" and content["execution_state"] == "idle":
                        idle_at = now
                    elif kind == "stream":
                        if content["name"] == "stdout":
                            result.stdout += content["text"]
                        else:
                            result.stderr += content["text"]
                    elif kind in ("execute_result", "display_data", "update_display_data"):
                        result.outputs.append(content["data"].get("text/plain", ""))
                    elif kind == "error":
                        result.ename, result.evalue = content["ename"], content["evalue"]
        result.time = CellTime(reply_at - start, max(reply_at, idle_at) - start, iopub)
        return result

    def run(self, code: str, timeout: float = SETUP_TIMEOUT) -> Result:
        """``execute``, raising when the cell failed."""
        result = self.execute(code, timeout)
        if result.status != "ok":
            raise RuntimeError(f"{self.name}: {code.splitlines()[0]!r} failed: "
                               f"{result.failure()}")
        return result

    def _drain(self) -> None:
        for channel in (self.kc.shell_channel, self.kc.iopub_channel):
            while channel.socket.poll(0):
                channel.get_msg(timeout=0)

    def close(self, stop_code: str | None = None) -> list[str]:
        """Stop what the kernel started (``stop_code``), shut it down, and check that
        every process it had is gone; return what had to be killed."""
        if self.closed:
            return []
        self.closed = True
        self._remember()
        if stop_code and self.kc is not None:
            with contextlib.suppress(Exception):
                self.execute(stop_code, 60)
        with contextlib.suppress(Exception):
            if self.kc is not None:
                self.kc.stop_channels()
        with contextlib.suppress(Exception):
            self.km.shutdown_kernel(now=False)
        return _reap(self.procs.values(), GONE_GRACE)


def log_tail(path: Path, lines: int = 8) -> str:
    """The last lines of a kernel's log (without ipykernel's TCP warning), on one line."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    kept = [line for line in text if line.strip() and "without encryption" not in line]
    return " | ".join(kept[-lines:])


def _log_said(path: Path) -> str:
    tail = log_tail(path)
    return f"; its kernel's log ends: {tail}" if tail else ""


def _reap(procs, grace: float) -> list[str]:
    """Wait for ``procs`` to exit; kill (by pid, each one) those that do not."""
    import psutil

    alive = [p for p in procs if _running(p)]
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _running(p)]
    left = []
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            left.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
    return left


def _running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kernel_manager(spec_root: Path, name: str, argv: list[str], **spec):
    """A KernelManager for a kernelspec written under ``spec_root/kernels``."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    spec_dir = spec_root / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps(
        {"argv": argv, "display_name": name, "language": "python", **spec}))
    specs = KernelSpecManager(kernel_dirs=[str(spec_root / "kernels")])
    return KernelManager(kernel_name=name, kernel_spec_manager=specs)


PYTHON_KERNEL = "nbdist-bench-python"


def _python_kernel_argv() -> list[str]:
    return [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


# ---------------------------------------------------------------- the tools

@dataclass
class Tool:
    """One measured cell: a tool, in a kernel, with its timings."""

    key: str
    label: str
    code: str
    session: KernelSession | None = None
    times: list[CellTime] = field(default_factory=list)
    error: str | None = None  # why it is not (or no longer) measured
    note: str = ""  # what its set-up said (versions, pool start, ...)


def kernel_env(home: str, scratch: Path) -> dict[str, str]:
    """The kernels' environment, spelled out (see the module's docstring)."""
    import nbdist

    where = str(Path(nbdist.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "NBDIST_DISPLAY"}
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != where]
    env["PYTHONPATH"] = os.pathsep.join([where, *rest])
    env["NBDIST_HOME"] = home
    env["IPYTHONDIR"] = str(scratch / "ipython")
    env["OMP_NUM_THREADS"] = "1"
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # ipykernel's debugger warning, on stderr
    return env


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


IPP_STOP = "if '_ipp_cluster' in globals(): _ipp_cluster.stop_cluster_sync()"


def _start_nbdist(spec_root: Path, env, cwd, register) -> tuple[KernelSession, str]:
    km = _kernel_manager(spec_root, PYTHON_KERNEL, _python_kernel_argv())
    session = register(KernelSession("nbdist", km, env, cwd, spec_root), "%distributed stop")
    session.connect(60)
    probe = session.run(
        "%load_ext nbdist\n"
        f"import sys, json; sys.path.insert(0, {str(HERE)!r})\n"
        "import nbdist, nbdist.display, workloads\n"
        "print(json.dumps([nbdist.__file__, nbdist.display.resolve('auto')]))")
    where, display = json.loads(probe.stdout.strip().splitlines()[-1])
    start = session.run("%distributed start --nprocs 2")
    session._remember()  # the pool's agent and ranks
    note = (f"nbdist from {Path(where).parent}, default display in this kernel: "
            f"{display!r}; %distributed start --nprocs 2 returned in "
            f"{start.time.done_s:.2f} s ({start.stdout.strip()}), the first cells wait "
            f"for its ranks (warm-up)")
    return session, note


def _start_ipyparallel(spec_root: Path, env, cwd, register) -> tuple[KernelSession, str]:
    km = _kernel_manager(spec_root, PYTHON_KERNEL, _python_kernel_argv())
    session = register(KernelSession("ipyparallel", km, env, cwd, spec_root), IPP_STOP)
    session.connect(60)
    start = session.run(
        "import ipyparallel as ipp\n"
        "_ipp_cluster = ipp.Cluster(n=2)\n"
        "rc = _ipp_cluster.start_and_connect_sync(activate=True)\n"
        "print(len(rc.ids))")
    session._remember()  # the controller and the engines
    engines = start.stdout.strip().splitlines()[-1]
    check = session.run("%%px\nimport os\nos.getpid()")
    note = (f"ipyparallel {_version('ipyparallel')}: Cluster(n=2).start_and_connect_sync"
            f"(activate=True) took {start.time.done_s:.2f} s, {engines} engines; "
            f"%%px answered from {len(check.outputs)} engines")
    if len(check.outputs) != 2:
        raise RuntimeError(f"%%px ran on {len(check.outputs)} engines, not 2: {check.outputs}")
    return session, note


def _start_jupyter_distributed(spec_root: Path, env, cwd,
                               register) -> tuple[KernelSession, str]:
    # the rank kernels: our Python kernel, found through JUPYTER_PATH by the proxy
    _kernel_manager(spec_root, PYTHON_KERNEL, _python_kernel_argv())
    km = _kernel_manager(spec_root, "nbdist-bench-jupyter-distributed",
                         [sys.executable, "-m", "jupyter_distributed.kernel", "-f",
                          "{connection_file}"], interrupt_mode="message")
    proxy_env = dict(env, JUPYTER_PATH=os.pathsep.join(
        [str(spec_root), *[p for p in env.get("JUPYTER_PATH", "").split(os.pathsep) if p]]),
        JUPYTER_DISTRIBUTED_BASE_KERNEL=PYTHON_KERNEL, JUPYTER_DISTRIBUTED_WORLD_SIZE="2",
        JUPYTER_DISTRIBUTED_CWD=cwd)
    # no stop cell: the kernel's shutdown_request stops its rank kernels
    session = register(KernelSession("jupyter-distributed", km, proxy_env, cwd, spec_root),
                       None)
    start = time.perf_counter()
    session.connect(120)  # the first kernel_info starts the rank kernels
    ready = time.perf_counter() - start
    session._remember()  # the rank kernels
    check = session.run("import os\nos.environ['RANK'], os.getpid()")
    text = check.outputs[-1] if check.outputs else ""  # the final state of its display
    ranks = sum(f"[Rank {r} — ok]\n('{r}'," in text for r in range(2))
    note = (f"jupyter-distributed {_version('jupyter-distributed')}: proxy and 2 rank "
            f"kernels ready in {ready:.2f} s; a cell answered from {ranks} ranks")
    if ranks != 2:
        raise RuntimeError(f"a cell ran on {ranks} ranks, not 2: {text[:300]}")
    return session, note


STARTERS = {"ipyparallel": _start_ipyparallel,
            "jupyter-distributed": _start_jupyter_distributed}
MODULES = {"ipyparallel": "ipyparallel", "jupyter-distributed": "jupyter_distributed"}
PEER_CELLS = {"ipyparallel": ("ipyparallel `%%px` + `pass`, 2 engines", "%%px\npass"),
              "jupyter-distributed": ("jupyter-distributed `pass`, 2 rank kernels", "pass")}


def chosen_peers() -> list[str]:
    raw = os.environ.get(PEERS_ENV)
    if raw is None:
        return list(PEERS)
    names = [n.strip() for n in raw.split(",") if n.strip() and n.strip() != "none"]
    return [n for n in PEERS if n in names]


def _installed(peer: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(MODULES[peer]) is not None


# ---------------------------------------------------------------- measuring

def interleave(tools: list[Tool], rounds: int, warmup: int, log) -> None:
    """``warmup + rounds`` rounds; each runs every live tool's cell once, rotating."""
    for r in range(warmup + rounds):
        live = [t for t in tools if t.error is None]
        if not live:
            return
        k = r % len(live)
        for tool in live[k:] + live[:k]:
            try:
                result = tool.session.execute(tool.code, CELL_TIMEOUT)
            except Exception as exc:  # a hung or dead kernel: this tool stops here
                tool.error = f"cell {r + 1} failed: {type(exc).__name__}: {exc}" + \
                    _log_said(tool.session.log_path)
                log(f"warm: {tool.key}: {tool.error}")
                continue
            if result.status != "ok":
                tool.error = f"cell {r + 1} failed: {result.failure()}"
                log(f"warm: {tool.key}: {tool.error}")
            elif r >= warmup:
                tool.times.append(result.time)


NOOP_LOOP = """\
import json as _json, time as _time, workloads as _workloads
from nbdist.session import SESSION as _SESSION
_times = []
for _i in range({warmup} + {n}):
    _start = _time.perf_counter()
    _SESSION.kernel_pool.run(_workloads.noop, display="none")
    _times.append(_time.perf_counter() - _start)
print(_json.dumps(_times[{warmup}:]))
"""


def noop_script(n: int, warmup: int, out: str) -> None:
    """``python warm_peers.py noop-script N WARMUP OUT``: a plain script's warm tasks."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import nbdist
    import workloads

    start = time.perf_counter()
    with nbdist.Pool(nprocs=2) as pool:
        pool.run(workloads.noop, display="none")
        first = time.perf_counter() - start
        times = []
        for _ in range(warmup + n):
            t = time.perf_counter()
            pool.run(workloads.noop, display="none")
            times.append(time.perf_counter() - t)
    Path(out).write_text(json.dumps({"start_s": first, "times": times[warmup:]}))


def run_noop_script(n: int, warmup: int, env: dict[str, str], cwd: str,
                    leftovers: list[str]) -> dict:
    """Run ``noop_script`` in a fresh process; what it leaves behind goes to
    ``leftovers`` (killed)."""
    import psutil

    out = Path(cwd) / "noop-script.json"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "noop-script",
                             str(n), str(warmup), str(out)], env=env, cwd=cwd,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 300 + n
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    seen.setdefault(child.pid, child)
            if time.monotonic() > deadline:
                raise TimeoutError("the noop script ran past its time")
            time.sleep(0.2)
        text = proc.stdout.read()
        if proc.returncode != 0:
            raise RuntimeError(f"noop script exited {proc.returncode}: {text[-500:]}")
        return json.loads(out.read_text())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        left = _reap(seen.values(), GONE_GRACE)
        if left:
            leftovers.append(f"the noop script: killed {left}")


def one_line(text: str, limit: int = 240) -> str:
    """``text`` fit for a table cell: one line, ``|`` escaped, at most ``limit`` chars."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 \
        else values[0]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"


def bench_warm(cfg, run) -> list:
    """The ``warm`` section of ``run.py`` (``run`` is that module: Row, judge, log)."""
    Row, log = run.Row, run.log
    rows: list = []
    peers = chosen_peers()
    n, warmup = cfg.warm_cells, cfg.warm_warmup
    home = os.environ["NBDIST_HOME"]
    load_before = os.getloadavg()
    kernel_notes: list[str] = []
    leftovers: list[str] = []
    stopped: list[str] = []  # each kernel, and how many processes it had under it
    with tempfile.TemporaryDirectory(prefix="nbdist-bench-warm-") as scratch:
        scratch_p = Path(scratch)
        cwd = str(scratch_p / "cwd")
        os.makedirs(cwd)
        env = kernel_env(home, scratch_p)
        nb = Tool("nbdist", "`%%distributed` + `pass`, default options (dashboard)",
                  "%%distributed\npass")
        quiet = Tool("nbdist-quiet", "`%%distributed --quiet` + `pass`",
                     "%%distributed --quiet\npass")
        peer_tools = {p: Tool(p, *PEER_CELLS[p]) for p in PEERS}
        for p in PEERS:
            if p not in peers:
                peer_tools[p].error = f"not run ({PEERS_ENV}={os.environ.get(PEERS_ENV)!r})"
            elif not _installed(p):
                peer_tools[p].error = f"not installed (pip install {p})"
        in_kernel: list[float] = []
        with contextlib.ExitStack() as stack:  # closes every kernel, even on an error

            def register(session: KernelSession, stop_code: str | None) -> KernelSession:
                def close():
                    left = session.close(stop_code)
                    stopped.append(f"{session.name} ({len(session.procs)})")
                    if left:
                        leftovers.append(f"{session.name}: killed {left}")
                stack.callback(close)
                return session

            try:
                log("warm: nbdist kernel ...")
                nb.session, nb.note = _start_nbdist(scratch_p, env, cwd, register)
                quiet.session = nb.session
            except Exception as exc:
                nb.error = quiet.error = (f"failed to start: {type(exc).__name__}: {exc}"
                                          + _log_said(scratch_p / "nbdist.log"))
                log(f"warm: nbdist: {nb.error}")
            for p in PEERS:
                tool = peer_tools[p]
                if tool.error:
                    continue
                log(f"warm: {p} kernel ...")
                try:
                    tool.session, tool.note = STARTERS[p](scratch_p, env, cwd, register)
                except Exception as exc:
                    tool.error = (f"failed to start: {type(exc).__name__}: {exc}"
                                  + _log_said(scratch_p / f"{p}.log"))
                    log(f"warm: {p}: {tool.error}")
            tools = [nb, quiet, *peer_tools.values()]
            log(f"warm: {warmup} + {n} interleaved rounds of "
                f"{sum(t.error is None for t in tools)} cells")
            interleave(tools, n, warmup, log)
            if nb.session is not None and nb.error is None:
                log(f"warm: {cfg.warm_noop_tasks} noop tasks on the kernel's pool ...")
                try:
                    out = nb.session.run(NOOP_LOOP.format(n=cfg.warm_noop_tasks, warmup=5),
                                         timeout=60 + cfg.warm_noop_tasks)
                    in_kernel = json.loads(out.stdout.strip().splitlines()[-1])
                except Exception as exc:
                    kernel_notes.append(f"in the kernel: {type(exc).__name__}: {exc}")
            log("warm: stopping the kernels ...")
        log(f"warm: {cfg.warm_noop_tasks} noop tasks in a plain script ...")
        try:
            script = run_noop_script(cfg.warm_noop_tasks, 5, env, cwd, leftovers)
        except Exception as exc:
            script = {"error": f"{type(exc).__name__}: {exc}"}
    load_after = os.getloadavg()

    # ---- rows
    measured_peers = [t for t in peer_tools.values() if t.error is None and t.times]

    def median_done(tool: Tool) -> float:
        return statistics.median(t.done_s for t in tool.times)

    fastest = min(measured_peers, key=median_done, default=None)
    env_line = (f"kernels' environment: PYTHONPATH={env['PYTHONPATH']}, NBDIST_DISPLAY unset, "
                f"NBDIST_HOME=<this run's>, IPYTHONDIR=<private>, OMP_NUM_THREADS=1; "
                f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
                f"kernels stopped (processes each had, itself included, all checked "
                f"gone): {', '.join(stopped) or 'none'}")
    timing_line = ("time: execute_request sent until both execute_reply and status idle "
                   "received; " f"{warmup} warm-up rounds dropped, {n} interleaved rounds")

    def describe(tool: Tool) -> list[str]:
        done = [t.done_s for t in tool.times]
        reply = [t.reply_s for t in tool.times]
        return [f"{tool.key}: median {ms(statistics.median(done))}, p90 {ms(p90(done))}, "
                f"min {ms(min(done))}; to the reply alone: median "
                f"{ms(statistics.median(reply))}; iopub messages per cell: "
                f"{statistics.median(t.iopub for t in tool.times):.0f}",
                f"{tool.key} ms: {', '.join(f'{1000 * x:.0f}' for x in done)}"]

    def paired(tool: Tool, base: Tool) -> float:
        # per round: the two cells ran within one round (interleaved), so their ratio
        # cancels the load of that moment; the rounds align while both tools ran
        return statistics.median(a.done_s / b.done_s for a, b in zip(tool.times, base.times))

    for tool, target in ((nb, True), (quiet, False)):
        measure = f"warm {tool.label} in a kernel, 2-rank pool (median of {len(tool.times)})"
        if tool.error is not None or not tool.times:
            rows.append(Row(measure, one_line(tool.error or "no cells measured"), "—", "—",
                            "≤ the fastest peer" if target else "—", False if target else None,
                            [x for x in (tool.note, tool.error, env_line) if x]))
            continue
        done = [t.done_s for t in tool.times]
        text = f"{ms(statistics.median(done))} (p90 {ms(p90(done))})"
        details = [*describe(tool), *([tool.note] if tool.note else []), timing_line,
                   env_line]
        if fastest is None:
            rows.append(Row(measure, text, "no peer measured", "—",
                            "≤ the fastest peer" if target else "—", None, details))
            continue
        ratio = paired(tool, fastest)
        base_med = median_done(fastest)
        for other in measured_peers:
            details.append(f"median of the per-round ratios to {other.key}: "
                           f"{paired(tool, other):.2f}×; ratio of the medians "
                           f"{median_done(tool) / median_done(other):.2f}×")
        rows.append(Row(
            measure, text, f"{ms(base_med)} {fastest.label}", f"{ratio:.2f}×",
            "≤ 1.0× the fastest peer" if target else "—",
            run.judge(ratio <= 1.0, cfg) if target else None, details))
    for tool in peer_tools.values():
        measure = f"peer: {tool.label} (median of {len(tool.times)})"
        if tool.error is not None or not tool.times:
            rows.append(Row(measure, "—", one_line(tool.error or "no cells measured"), "—",
                            "—", None, [x for x in (tool.note, tool.error) if x]))
            continue
        done = [t.done_s for t in tool.times]
        rows.append(Row(measure, "—", f"{ms(statistics.median(done))} (p90 {ms(p90(done))})",
                        "—", "—", None, [*describe(tool), tool.note]))

    for where, times, extra in (
            ("inside the kernel (the %distributed pool)", in_kernel, kernel_notes),
            ("in a plain script", script.get("times", []),
             [script["error"]] if "error" in script else
             [f"Pool(nprocs=2) and its first task: {script['start_s']:.2f} s"])):
        measure = (f"noop task on a warm 2-rank pool, pool.run(noop, display='none'), "
                   f"{where} (median of {len(times)})")
        if not times:
            rows.append(Row(measure, one_line("not measured: " + "; ".join(extra)), "—",
                            "—", "≤ 2 ms (idle machine)", False, extra))
            continue
        med = statistics.median(times)
        rows.append(Row(
            measure, f"{ms(med)} (min {ms(min(times))}, p90 {ms(p90(times))})", "—", "—",
            "≤ 2 ms (idle machine)", run.judge(med <= 0.002, cfg),
            [f"ms: {', '.join(f'{1000 * x:.1f}' for x in times)}", *extra,
             f"load average {load_before[0]:.1f} before the section, "
             f"{load_after[0]:.1f} after"]))
    if leftovers:
        rows.append(Row("warm: processes left behind after shutdown",
                        one_line("; ".join(leftovers)), "—", "—", "none", False, leftovers))
    return rows


def main(argv: list[str]) -> int:
    if argv[:1] == ["noop-script"]:
        sys.path.insert(0, str(HERE))
        noop_script(int(argv[1]), int(argv[2]), argv[3])
        return 0
    # otherwise: run.py's warm section alone
    sys.path.insert(0, str(HERE))
    import run

    return run.main(["--only", "warm", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
