"""nbdist against raw torchrun, measured side by side in one run (issue 7).

    python benchmarks/run.py              # the full table, about 6-9 minutes on 2 cores
    python benchmarks/run.py --quick      # smoke mode: tiny sizes, one run each
    python benchmarks/run.py --only launch,logs --json out.json

Every comparison is *paired*: the nbdist job and its baseline run back to back
(alternating which goes first), in the same process, on the same machine. The table
shows the medians of both sides and, as the ratio, the median of the per-pair ratios
(for the result and ship measures: the median of the per-pair differences between a
job with the data and the same job without), so that changes of the machine's load
between pairs cancel out; the details below it list every run. The baselines:

=========  ==================================================================
launch     ``python -m torch.distributed.run --standalone --nproc-per-node 2``
           of a script that only initialises and destroys the process group
result     in one process: ``torch.save(state)`` then ``torch.load`` of the file
throughput the same training function (``workloads.convnet_throughput``) as a
           torchrun script
logs       the same printing function as a torchrun script, its output piped here
ship       a plain ``torch.save`` of the tensor (for scale; the target is absolute)
import     none: the target (50 ms) is absolute
pool       a cold ``run_distributed`` noop job, run between the pool's starts; for
           its result, ``torch.save`` + ``torch.load`` of the tensor; after a
           failed task, a warm noop task after a noop (issue 12)
hosts      several machines over ssh (``multihost.py``): a torchrun agent per
           host started by hand; ssh's own throughput; the same job on one
           machine. Skipped, with the reason, when the hosts cannot be reached
warm       a warm ``%%distributed`` cell in a real Jupyter kernel, interleaved
           cell by cell with ipyparallel's ``%%px`` and jupyter-distributed in
           kernels of their own (``warm_peers.py``; the peers only if installed);
           noop tasks on a warm pool, in the kernel and in a plain script (issue 18)
=========  ==================================================================

The nbdist side runs in this process, like a notebook kernel: torch and nbdist are
imported once, ``run_distributed`` is called per job, and its wall time is what the
caller waits. The result benchmark runs its caller in a child process
(``result_caller.py``), whose memory peak is measured exactly (``VmHWM``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# before torch is imported: the workers get it from nbdist, and torchrun sets it too
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import nbdist  # noqa: E402

sys.path.insert(0, str(HERE))
import workloads  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20


@dataclass
class Config:
    quick: bool
    launch_pairs: int = 7
    result_bytes: int = GiB
    result_pairs: int = 3
    train_pairs: int = 9
    train_steps: int = 30
    train_batch: int = 32
    log_lines: int = 100_000
    log_pairs: int = 3
    ship_bytes: int = GiB
    ship_pairs: int = 5
    import_runs: int = 11
    pool_pairs: int = 5  # pool start vs a cold job
    pool_warm_tasks: int = 4  # warm noop tasks after each start: 20 in all
    pool_result_bytes: int = 256 * MiB
    pool_result_pairs: int = 5
    pool_failure_pairs: int = 5
    pool_leak_tasks: int = 100
    # several machines (multihost.py): 2 hosts x 2 ranks unless said otherwise
    hosts_launch_pairs: int = 3
    hosts_pool_pairs: int = 3  # pool start vs a cold job
    hosts_pool_warm_tasks: int = 7  # after each start: 21 in all
    hosts_payload_bytes: int = 256 * MiB
    hosts_payload_pairs: int = 3
    hosts_scale: tuple[int, ...] = (2, 4, 6)  # hosts x 1 rank
    hosts_scale_rounds: int = 2
    hosts_log_pairs: int = 3  # of log_lines
    # warm cells in real kernels, nbdist beside its peers (warm_peers.py)
    warm_cells: int = 50  # interleaved rounds measured, one cell of each tool per round
    warm_warmup: int = 5  # rounds run first and dropped
    warm_noop_tasks: int = 200  # pool.run(noop) in the kernel, and in a plain script

    @classmethod
    def make(cls, quick: bool) -> "Config":
        if not quick:
            return cls(quick=False)
        return cls(quick=True, launch_pairs=1, result_bytes=8 * MiB, result_pairs=1,
                   train_pairs=1, train_steps=2, log_lines=1000, log_pairs=1,
                   ship_bytes=8 * MiB, ship_pairs=1, import_runs=1, pool_pairs=1,
                   pool_warm_tasks=2, pool_result_bytes=8 * MiB, pool_result_pairs=1,
                   pool_failure_pairs=1, pool_leak_tasks=10, hosts_launch_pairs=1,
                   hosts_pool_pairs=1, hosts_pool_warm_tasks=2,
                   hosts_payload_bytes=8 * MiB, hosts_payload_pairs=1, hosts_scale=(2,),
                   hosts_scale_rounds=1, hosts_log_pairs=1, warm_cells=3,
                   warm_warmup=1, warm_noop_tasks=10)


@dataclass
class Row:
    """One line of the table."""

    measure: str
    nbdist: str
    baseline: str
    ratio: str
    target: str
    met: bool | None  # None: not judged (quick mode, or no target)
    details: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- running jobs

def median(values) -> float:
    return statistics.median(values)


def paired_ratio(nb: list[float], base: list[float]) -> float:
    """The median of the per-pair ratios: each pair ran back to back, so a change in
    the machine's load between pairs (other users, here) cancels out."""
    return median([n / b for n, b in zip(nb, base)])


def raw_torchrun(name: str, *args, nprocs: int = 2, capture: bool = False):
    """Run ``workloads.NAME(*args)`` under raw torchrun; (seconds, rank 0's value, stdout).

    A failed run is retried once, and said so: a rank of the raw ConvNet baseline was
    seen to abort once in gloo's teardown ("terminate called without an active
    exception"), which is torch's flake, not a measure of either side.
    """
    try:
        return _raw_torchrun(name, *args, nprocs=nprocs, capture=capture)
    except RuntimeError as exc:
        log(f"{exc}".splitlines()[0] + " -- retrying once; its stderr ends with: "
            + " | ".join(str(exc).splitlines()[1:4]))
        return _raw_torchrun(name, *args, nprocs=nprocs, capture=capture)


def _raw_torchrun(name: str, *args, nprocs: int, capture: bool):
    with tempfile.TemporaryDirectory(prefix="nbdist-bench-") as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nprocs), str(HERE / "workloads.py"), name, str(out),
               *(json.dumps(a) for a in args)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=capture or None)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode()
            raise RuntimeError(f"raw torchrun {name} failed ({proc.returncode}):\n{err[-3000:]}")
        return seconds, json.loads(out.read_text()), proc.stdout if capture else None


class LineSink(io.TextIOBase):
    """Stands in for ``sys.stdout``: counts the lines nbdist delivers, keeps no text."""

    def __init__(self):
        self.lines = 0
        self.numbered = 0  # lines of workloads.print_lines ("line I of N")
        self.last = ""
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        text = self._partial + text
        parts = text.split("\n")
        self._partial = parts.pop()
        self.lines += len(parts)
        self.numbered += sum(line.startswith("line ") for line in parts)
        for line in reversed(parts):
            if line.startswith("line "):
                self.last = line
                break
        return len(text)


CALLER_CPU: list[float] = []  # CPU share of this process during each nbdist job


def nbdist_job(fn, *args, sink: io.TextIOBase | None = None, keep: bool = False,
               nprocs: int = 2, **kwargs):
    """``run_distributed(fn, *args)`` as a notebook would; (seconds, value, job)."""
    sink = sink or LineSink()
    with contextlib.redirect_stdout(sink):
        cpu = time.process_time()
        start = time.perf_counter()
        value = nbdist.run_distributed(fn, *args, nprocs=nprocs, display="plain", **kwargs)
        seconds = time.perf_counter() - start
        CALLER_CPU.append((time.process_time() - cpu) / seconds)
    job = nbdist.last_job()
    if not keep:
        shutil.rmtree(job.dir, ignore_errors=True)
    return seconds, value, job


def pool_task(pool, fn, *args, keep: bool = False, display: str = "none", **kwargs):
    """``pool.run(fn, *args)`` as a notebook would; (seconds, value)."""
    with contextlib.redirect_stdout(LineSink()):
        start = time.perf_counter()
        value = pool.run(fn, *args, display=display, **kwargs)
        seconds = time.perf_counter() - start
    if not keep:
        shutil.rmtree(nbdist.last_job().dir, ignore_errors=True)
    return seconds, value


_noop: list[float] = []


def noop_job_seconds() -> float:
    """Quick mode's stand-in for a measure's own baseline job: one nbdist noop job."""
    if not _noop:
        _noop.append(nbdist_job(workloads.noop)[0])
    return _noop[0]


def paired(a, b, pairs: int) -> tuple[list, list]:
    """Call ``a()`` and ``b()`` ``pairs`` times each, alternating who goes first."""
    ra, rb = [], []
    for i in range(pairs):
        if i % 2 == 0:
            ra.append(a())
            rb.append(b())
        else:
            rb.append(b())
            ra.append(a())
    return ra, rb


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 0.1 else f"{seconds * 1000:.0f} ms"


def judge(ok: bool, cfg: Config) -> bool | None:
    return None if cfg.quick else ok


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the measures

def bench_launch(cfg: Config) -> list[Row]:
    if not cfg.quick:  # both sides read torch's files from the page cache from now on
        raw_torchrun("noop")
        nbdist_job(workloads.noop)
    raw, nb = paired(lambda: raw_torchrun("noop")[0],
                     lambda: nbdist_job(workloads.noop)[0], cfg.launch_pairs)
    _noop[:] = nb[:1]
    ratio = paired_ratio(nb, raw)
    return [Row(
        f"cold launch, 2-process noop ({len(nb)} pairs)",
        fmt_s(median(nb)), f"{fmt_s(median(raw))} raw torchrun", f"{ratio:.3f}×",
        "≤ 1.05×", judge(ratio <= 1.05, cfg),
        [f"nbdist s: {', '.join(f'{x:.2f}' for x in nb)}",
         f"raw s:    {', '.join(f'{x:.2f}' for x in raw)}",
         f"ratio of the medians {median(nb) / median(raw):.3f}×"])]


def bench_result(cfg: Config) -> list[Row]:
    """Runs ``result_caller.py`` in a child: timing pairs plus its exact memory peak."""
    with tempfile.TemporaryDirectory(prefix="nbdist-bench-") as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, str(HERE / "result_caller.py"),
                        str(cfg.result_bytes), str(cfg.result_pairs), str(out),
                        *(["--no-noop-job"] if cfg.quick else [])],
                       check=True, stdin=subprocess.DEVNULL)
        r = json.loads(out.read_text())
    if cfg.quick:
        r["none_s"] = [noop_job_seconds()] * len(r["ret_s"])
    extra = [ret - none for ret, none in zip(r["ret_s"], r["none_s"])]
    manual = r["manual_s"]
    ratio = median(extra) / median(manual)
    size = cfg.result_bytes
    peak = max(r["peak_call_bytes"])
    peak_read = max(r["peak_read_bytes"])
    size_txt = f"{size / GiB:g} GiB" if size >= GiB else f"{size / MiB:g} MiB"
    return [
        Row(f"return a {size_txt} state dict: time over a noop job",
            fmt_s(median(extra)), f"{fmt_s(median(manual))} torch.save + torch.load",
            f"{ratio:.3f}×", "≤ 1.2×", judge(ratio <= 1.2, cfg),
            [f"job returning it s: {', '.join(f'{x:.2f}' for x in r['ret_s'])}",
             f"same job, None s:   {', '.join(f'{x:.2f}' for x in r['none_s'])}",
             f"manual save s: {', '.join(f'{x:.2f}' for x in r['manual_save_s'])}; "
             f"load s: {', '.join(f'{x:.2f}' for x in r['manual_load_s'])}",
             f"caller reading every page afterwards: "
             f"{', '.join(f'{x:.2f}' for x in r['read_s'])} s"]),
        Row(f"return a {size_txt} state dict: caller's peak memory",
            f"{peak / MiB:.0f} MiB ({peak / size:.2f}× result)",
            f"{size / MiB:.0f} MiB result", f"{peak / size:.2f}×", "≤ 1.2× result",
            judge(peak / size <= 1.2, cfg),
            [f"peak RSS growth during run_distributed: "
             f"{', '.join(f'{x / MiB:.0f}' for x in r['peak_call_bytes'])} MiB",
             f"after also reading every tensor: {peak_read / MiB:.0f} MiB "
             f"({peak_read / size:.2f}×, file-backed pages of the mapped result)"]),
    ]


def bench_throughput(cfg: Config) -> list[Row]:
    args = (cfg.train_steps, 3, cfg.train_batch)
    del CALLER_CPU[:]
    raw_r, nb_r = paired(
        lambda: raw_torchrun("convnet_throughput", *args)[1],
        lambda: nbdist_job(workloads.convnet_throughput, *args)[1],
        cfg.train_pairs)
    raw = [r["samples_per_s"] for r in raw_r]
    nb = [r["samples_per_s"] for r in nb_r]

    def cpu_ms(results):
        return ", ".join(f"{r['step_cpu_ms']:.1f}" for r in results)
    ratio = paired_ratio(nb, raw)
    return [Row(
        f"MNIST ConvNet DDP training throughput (batch {cfg.train_batch}/rank, median "
        f"step of {cfg.train_steps}, {len(nb)} pairs)",
        f"{median(nb):.0f} samples/s", f"{median(raw):.0f} samples/s torchrun script",
        f"{ratio:.3f}×", "≥ 0.98×", judge(ratio >= 0.98, cfg),
        [f"nbdist samples/s: {', '.join(f'{x:.0f}' for x in nb)}",
         f"raw samples/s:    {', '.join(f'{x:.0f}' for x in raw)}",
         f"ratio of the medians {median(nb) / median(raw):.3f}×",
         f"rank 0's CPU time per step, ms: nbdist {cpu_ms(nb_r)}; raw {cpu_ms(raw_r)}",
         f"the caller (this process) used {100 * median(CALLER_CPU):.1f} % of a core "
         f"while the nbdist jobs ran"])]


def bench_logs(cfg: Config) -> list[Row]:
    n = cfg.log_lines
    delivered = []

    def raw():
        seconds, _, out = raw_torchrun("print_lines", n, capture=True)
        lines = [x for x in out.splitlines() if x.startswith("line ")]
        delivered.append(("raw", len(lines), lines[-1] if lines else ""))
        return seconds

    def nb():
        sink = LineSink()
        seconds, _, _ = nbdist_job(workloads.print_lines, n, sink=sink)
        # the sink also sees nbdist's own "[nbdist] job ... succeeded" line
        delivered.append(("nbdist", sink.lines - 1, sink.last))
        return seconds

    raw_s, nb_s = paired(raw, nb, cfg.log_pairs)
    ratio = paired_ratio(nb_s, raw_s)
    expected_last = f"line {n - 1} of {n}"
    complete = [d for d in delivered if d[0] == "nbdist" and d[1] == n and d[2] == expected_last]
    all_there = len(complete) == cfg.log_pairs
    pct = 100 * min(d[1] for d in delivered if d[0] == "nbdist") / n
    return [Row(
        f"{n:,} rank-0 log lines: delivered, wall time",
        f"{pct:.0f} %, {fmt_s(median(nb_s))}", f"{fmt_s(median(raw_s))} raw torchrun",
        f"{ratio:.3f}×", "100 %, ≤ 1.2×", judge(all_there and ratio <= 1.2, cfg),
        [f"lines seen per run (side, count, last): {delivered}",
         f"nbdist s: {', '.join(f'{x:.2f}' for x in nb_s)}",
         f"raw s:    {', '.join(f'{x:.2f}' for x in raw_s)}",
         f"ratio of the medians {median(nb_s) / median(raw_s):.3f}×"])]


def bench_ship(cfg: Config) -> list[Row]:
    big = torch.full((cfg.ship_bytes // 4,), 1.0)
    small = torch.zeros(1)
    seen: dict = {}

    def with_big():
        seconds, values, _ = nbdist_job(workloads.touch, big, True, return_all=True)
        seen.update(files=values[0].get("job_files", {}), ranks=values)
        return seconds

    def with_small():
        if cfg.quick:
            return noop_job_seconds()
        return nbdist_job(workloads.touch, small, return_all=True)[0]

    if not cfg.quick:  # the first 1 GiB written to memory this VM has not used lately
        with_big()     # costs several times more (3 s instead of 0.3 s): not measured
    big_s, small_s = paired(with_big, with_small, cfg.ship_pairs)
    extra = median([b - s for b, s in zip(big_s, small_s)])
    rate = cfg.ship_bytes / max(extra, 1e-3) / 1e9
    # the baseline: how fast this machine's torch.save writes the same tensor (the
    # faster of two, for the same first-write reason as the warm-up above)
    save_s = []
    with tempfile.TemporaryDirectory(prefix="nbdist-bench-", dir=_home()) as tmp:
        for _ in range(2):
            start = time.perf_counter()
            torch.save(big, Path(tmp) / "big.pt")
            save_s.append(time.perf_counter() - start)
            (Path(tmp) / "big.pt").unlink()
    save_rate = cfg.ship_bytes / min(save_s) / 1e9
    del big

    files = seen["files"]
    large = {name: size for name, size in files.items() if size >= cfg.ship_bytes // 2}
    once = list(large) == ["payload.pt"]
    ranks = seen["ranks"]
    # each rank maps the payload; Pss ≈ Rss / 2 when both ranks share the pages
    shares = [r["pss_kib"] / r["rss_kib"] for r in ranks if r.get("rss_kib")]
    mapped = all(r["rss_kib"] * 1024 >= 0.9 * cfg.ship_bytes for r in ranks)
    shared = mapped and all(s <= 0.6 for s in shares)
    size_txt = (f"{cfg.ship_bytes / GiB:g} GiB" if cfg.ship_bytes >= GiB
                else f"{cfg.ship_bytes / MiB:g} MiB")
    verdict = ("written once" if once else f"NOT once: {large}") + \
        (", pages shared" if shared else ", pages NOT shared")
    return [Row(
        f"a captured {size_txt} tensor shipped to 2 ranks (each reads every page)",
        f"{rate:.2f} GB/s; {verdict}", f"{save_rate:.2f} GB/s torch.save",
        f"{rate / save_rate:.2f}×", "once, ≥ 1 GB/s, shared",
        judge(once and shared and rate >= 1.0, cfg),
        [f"job with the tensor s: {', '.join(f'{x:.2f}' for x in big_s)} "
         f"(after one unmeasured warm-up job)",
         f"same job, 4-byte tensor s: {', '.join(f'{x:.2f}' for x in small_s)}",
         f"job dir files ≥ half the tensor: {large}",
         "per rank: " + "; ".join(
             f"rank {r['rank']} maps {Path(r['mapped_file'] or '?').name}: "
             f"Rss {r['rss_kib'] / 1024:.0f} MiB, Pss {r['pss_kib'] / 1024:.0f} MiB, "
             f"anon {r['rss_anon_kib'] / 1024:.0f} MiB, touch {r['touch_s']:.2f} s"
             for r in ranks)])]


def bench_import(cfg: Config) -> list[Row]:
    # nbdist's package imports its modules on first use: the second figure is what the
    # first ``nbdist.run_distributed`` adds (api, job, displays), paid once per kernel
    code = ("import time, torch; t = time.perf_counter(); import nbdist; "
            "t1 = time.perf_counter(); nbdist.run_distributed; "
            "print(t1 - t, time.perf_counter() - t1)")
    # the nbdist this run imported (a checkout on PYTHONPATH, or the installed one)
    where = str(Path(nbdist.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [where] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    times, first_use = [], []
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(cfg.import_runs):
            out = subprocess.run([sys.executable, "-c", code], check=True, text=True,
                                 stdout=subprocess.PIPE, cwd=cwd, env=env).stdout
            times.append(float(out.split()[-2]))
            first_use.append(float(out.split()[-1]))
    ms = 1000 * median(times)
    return [Row(f"import nbdist, torch already imported (median of {len(times)} fresh "
                f"interpreters)", f"{ms:.0f} ms", "—", "—", "≤ 50 ms",
                judge(ms <= 50, cfg),
                [f"ms: {', '.join(f'{1000 * x:.0f}' for x in times)}",
                 f"then the first nbdist.run_distributed lookup: "
                 f"{1000 * median(first_use):.0f} ms (median)"])]


def bench_track(cfg: Config) -> list[Row]:
    """``track()`` overhead lives in ``track_overhead.py`` (another owner); shown if there."""
    script = HERE / "track_overhead.py"
    if not script.exists() or cfg.quick:  # its own owner smoke-tests it
        return []
    cmd = [sys.executable, str(script)] + (["--quick"] if cfg.quick else [])
    proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          cwd=REPO, stdin=subprocess.DEVNULL)
    lines = proc.stdout.strip().splitlines()
    return [Row("track() per-iteration overhead (benchmarks/track_overhead.py)",
                lines[-1] if lines else "(no output)", "—", "—", "≤ 2 µs", None,
                lines[-5:] if proc.returncode == 0 else [f"exit {proc.returncode}"] + lines[-5:])]


def bench_pool(cfg: Config) -> list[Row]:
    """Warm pools (issue 12): one pool per start pair, the last one kept for the rest."""
    rows, pool, warm = _pool_start_and_warm(cfg)
    try:
        rows += _pool_result(cfg, pool)
        rows += _pool_after_failure(cfg, pool, warm)
        rows += _pool_leaks(cfg, pool)
    finally:
        pool.close()
    return rows


def _pool_start_and_warm(cfg: Config):
    """Pairs of (a cold noop job, a new pool's first noop task then warm noop tasks)."""
    pools: list = []  # the pool of the latest pair, closed before the next measure

    def close():
        while pools:
            pools.pop().close()

    def cold():
        close()
        return noop_job_seconds() if cfg.quick else nbdist_job(workloads.noop)[0]

    def pooled():
        close()
        start = time.perf_counter()
        pools.append(nbdist.Pool(nprocs=2))
        pool_task(pools[-1], workloads.noop, display="plain")  # as nbdist_job shows it
        first = time.perf_counter() - start
        warm = [pool_task(pools[-1], workloads.noop)[0] for _ in range(cfg.pool_warm_tasks)]
        return first, warm

    if not cfg.quick:  # both sides read torch's files from the page cache from now on
        cold()
        pooled()
    cold_s, pooled_r = paired(cold, pooled, cfg.pool_pairs)
    if not pools:  # the last pair ran its cold job last
        pools.append(nbdist.Pool(nprocs=2))
        pool_task(pools[-1], workloads.noop)
    first = [f for f, _ in pooled_r]
    warm_all = [w for _, ws in pooled_r for w in ws]
    speedup = paired_ratio(cold_s, [median(ws) for _, ws in pooled_r])
    start_ratio = paired_ratio(first, cold_s)
    warm = median(warm_all)
    cold_txt = f"{fmt_s(median(cold_s))} cold run_distributed noop"
    rows = [
        Row(f"noop task on a warm 2-rank pool (median of {len(warm_all)})", fmt_s(warm),
            cold_txt, f"{1 / speedup:.4f}× ({speedup:.0f}× faster)",
            "≤ 0.05 s; ≥ 30× faster", judge(warm <= 0.05 and speedup >= 30, cfg),
            ["warm task ms, per pair: " + "; ".join(
                ", ".join(f"{1000 * w:.0f}" for w in ws) for _, ws in pooled_r),
             f"cold job s: {', '.join(f'{x:.2f}' for x in cold_s)}",
             f"ratio of the medians: {median(cold_s) / warm:.0f}× faster"]),
        Row(f"pool start: Pool() and its first noop task ({len(first)} pairs)",
            fmt_s(median(first)), cold_txt, f"{start_ratio:.3f}×", "≤ 1.05×",
            judge(start_ratio <= 1.05, cfg),
            [f"pool start s: {', '.join(f'{x:.2f}' for x in first)}",
             f"cold job s:   {', '.join(f'{x:.2f}' for x in cold_s)}",
             f"ratio of the medians {median(first) / median(cold_s):.3f}×"]),
    ]
    return rows, pools[0], warm


def _pool_result(cfg: Config, pool) -> list[Row]:
    """A warm task returning a tensor, over the same task dropping it, vs save + load."""
    nbytes = cfg.pool_result_bytes
    tensor = torch.full((nbytes // 4,), 1.0)  # what rank 0 builds, for the manual side
    read_s: list[float] = []

    def manual():
        with tempfile.TemporaryDirectory(prefix="nbdist-bench-", dir=_home()) as tmp:
            path = Path(tmp) / "tensor.pt"
            start = time.perf_counter()
            torch.save(tensor, path)
            loaded = torch.load(path)
            seconds = time.perf_counter() - start
        del loaded
        return seconds

    def task():
        none_s = pool_task(pool, workloads.make_tensor, nbytes, False)[0]
        ret_s, value = pool_task(pool, workloads.make_tensor, nbytes, True, keep=True)
        start = time.perf_counter()  # bring every page in, as using the result would
        value.view(torch.uint8)[::workloads.PAGE].sum()
        read_s.append(time.perf_counter() - start)
        assert value.numel() * value.element_size() == nbytes
        del value
        shutil.rmtree(nbdist.last_job().dir, ignore_errors=True)
        return ret_s, none_s

    if not cfg.quick:  # first writes of memory this VM has not used lately cost more
        manual()
        task()
        del read_s[:]
    manual_s, tasks = paired(manual, task, cfg.pool_result_pairs)
    extra = [ret - none for ret, none in tasks]
    ratio = median(extra) / median(manual_s)
    size = f"{nbytes / MiB:g} MiB"
    return [Row(
        f"return a {size} tensor from a warm task: time over a noop task",
        fmt_s(median(extra)), f"{fmt_s(median(manual_s))} torch.save + torch.load",
        f"{ratio:.3f}×", "≤ 1.0×", judge(ratio <= 1.0, cfg),
        [f"task returning it s: {', '.join(f'{r:.3f}' for r, _ in tasks)}",
         f"same task, None s:   {', '.join(f'{n:.3f}' for _, n in tasks)}",
         f"manual save + load s: {', '.join(f'{x:.3f}' for x in manual_s)}",
         f"caller reading every page afterwards: "
         f"{', '.join(f'{x:.3f}' for x in read_s)} s"])]


def _pool_after_failure(cfg: Config, pool, warm: float) -> list[Row]:
    """A noop task right after one that raised on rank 1, paired with one after a noop."""
    from nbdist.pool import KEPT

    failed_s: list[float] = []
    kept: list[bool] = []

    def after_failure():
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(LineSink()):
                pool.run(workloads.fail_on, 1, display="none")
            kept.append(False)  # it did not fail: the measure is void
        except ValueError as exc:
            kept.append(KEPT in getattr(exc, "__notes__", ()))
        failed_s.append(time.perf_counter() - start)
        shutil.rmtree(nbdist.last_job().dir, ignore_errors=True)
        return pool_task(pool, workloads.noop)[0]

    def after_noop():
        pool_task(pool, workloads.noop)
        return pool_task(pool, workloads.noop)[0]

    after_s, plain_s = paired(after_failure, after_noop, cfg.pool_failure_pairs)
    after = median(after_s)
    ratio = paired_ratio(after_s, plain_s)
    return [Row(
        "noop task after a failed-but-healthy task (rank 1 raised, pool kept)",
        fmt_s(after) + ("" if all(kept) else "; pool NOT kept"),
        f"{fmt_s(median(plain_s))} after a noop task", f"{ratio:.2f}×", "≤ 0.2 s",
        judge(all(kept) and after <= 0.2, cfg),
        [f"after the failed task ms: {', '.join(f'{1000 * x:.0f}' for x in after_s)}",
         f"after a noop task ms:     {', '.join(f'{1000 * x:.0f}' for x in plain_s)}",
         f"the failed task itself (error, health check) ms: "
         f"{', '.join(f'{1000 * x:.0f}' for x in failed_s)}; pool kept: {kept}",
         f"warm noop task of the start pairs: {fmt_s(warm)}"])]


def _pool_leaks(cfg: Config, pool) -> list[Row]:
    """What ``pool_leak_tasks`` warm tasks leave in this process (folders kept: nbdist
    prunes them, as for a user)."""
    for _ in range(5):  # warm up caches (imports, the first job folders)
        pool_task(pool, workloads.noop, keep=True)
    gc.collect()
    before = _footprint()
    times = [pool_task(pool, workloads.noop, keep=True)[0] for _ in range(cfg.pool_leak_tasks)]
    gc.collect()
    after = _footprint()
    fds = after["fds"] - before["fds"]
    threads = after["threads"] - before["threads"]
    new = sorted(after["processes"] - before["processes"])
    gone = sorted(before["processes"] - after["processes"])
    rss = (after["rss_kib"] - before["rss_kib"]) / 1024
    n = cfg.pool_leak_tasks
    return [Row(
        f"{n} warm noop tasks back to back: what stays behind in the caller",
        f"{fds:+d} fds, {threads:+d} threads, {len(new):+d} processes, RSS {rss:+.1f} MiB",
        "—", "—", "0 fds/threads/processes, RSS ≤ +5 MiB",
        judge(fds <= 0 and threads <= 0 and not new and not gone and rss <= 5, cfg),
        [f"before: {before['fds']} fds, {before['threads']} threads, "
         f"{len(before['processes'])} processes (torchrun's agent and its ranks), "
         f"RSS {before['rss_kib'] / 1024:.0f} MiB; after: {after['fds']} fds, "
         f"{after['threads']} threads, {len(after['processes'])} processes, "
         f"RSS {after['rss_kib'] / 1024:.0f} MiB",
         f"new processes {new}, gone {gone}",
         f"{n} tasks in {sum(times):.2f} s, median {fmt_s(median(times))}, "
         f"slowest {fmt_s(max(times))}"])]


def _footprint() -> dict:
    """This process's open fds, threads, descendant processes and resident size."""
    return {"fds": len(os.listdir("/proc/self/fd")),
            "threads": workloads._status_kib("Threads"),  # a count, not KiB
            "processes": set(_descendants(os.getpid())),
            "rss_kib": workloads._status_kib("VmRSS")}


def _descendants(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):  # a process that just exited
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                for child in map(int, f.read().split()):
                    found += [child, *_descendants(child)]
    return found


def bench_hosts(cfg: Config) -> list[Row]:
    """Several machines over ssh: in ``multihost.py``, with this module's helpers."""
    import multihost
    return multihost.bench_hosts(cfg, sys.modules[__name__])


def bench_warm(cfg: Config) -> list[Row]:
    """Warm cells in real kernels, beside ipyparallel and jupyter-distributed."""
    import warm_peers
    return warm_peers.bench_warm(cfg, sys.modules[__name__])


BENCHES = {
    "launch": bench_launch,
    "result": bench_result,
    "throughput": bench_throughput,
    "logs": bench_logs,
    "ship": bench_ship,
    "import": bench_import,
    "track": bench_track,
    "pool": bench_pool,
    "hosts": bench_hosts,
    "warm": bench_warm,
}


def _home() -> str:
    return os.environ["NBDIST_HOME"]


def table(rows: list[Row], cfg: Config) -> str:
    head = ["measure", "nbdist", "baseline", "ratio", "target", "met"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        met = "smoke" if cfg.quick else {True: "yes", False: "**no**", None: "—"}[r.met]
        out.append(f"| {r.measure} | {r.nbdist} | {r.baseline} | {r.ratio} | "
                   f"{r.target} | {met} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: tiny sizes, one run per side; numbers not judged")
    parser.add_argument("--only", default=",".join(BENCHES),
                        help=f"comma-separated subset of: {', '.join(BENCHES)}")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    cfg = Config.make(args.quick)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")

    # the jobs of this run only (inside $NBDIST_HOME when set); removed at the end
    parent = os.environ.get("NBDIST_HOME")
    if parent:
        os.makedirs(parent, exist_ok=True)
    home = tempfile.mkdtemp(prefix="nbdist-bench-home-", dir=parent)
    os.environ["NBDIST_HOME"] = home
    rows: list[Row] = []
    started = time.perf_counter()
    try:
        for name in names:
            log(f"{name} ...")
            t = time.perf_counter()
            rows += BENCHES[name](cfg)
            log(f"{name} done in {time.perf_counter() - t:.0f} s")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    load = os.getloadavg()
    print(f"\nnbdist benchmarks ({'quick smoke mode: numbers not judged' if cfg.quick else 'full'}), "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, load average "
          f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, "
          f"{time.perf_counter() - started:.0f} s in all\n")
    print(table(rows, cfg))
    print()
    for r in rows:
        print(f"- {r.measure}")
        for d in r.details:
            print(f"    {d}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"quick": cfg.quick, "config": asdict(cfg), "rows": [asdict(r) for r in rows]},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
