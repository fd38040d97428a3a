"""Several machines: nbdist's ``hosts=[...]`` over ssh, measured against what a user
would do by hand (``run.py --only hosts``).

The hosts are ``$NBDIST_BENCH_HOSTS`` (default ``host1,host2``) reached with ``ssh -F
$NBDIST_BENCH_SSH_CONFIG`` (default: ``$NBDIST_TEST_SSH_CONFIG`` or
``/etc/nbdist-ci/ssh_config``, the two sshd that ``.ci/hosts`` starts on this machine).
Each measure, and its baseline:

=========  ===========================================================================
launch     a 2 hosts x 2 ranks noop job, against two ``torchrun --nnodes 2 --rdzv-backend
           c10d`` agents started by hand, one ``ssh host 'cd REPO && python -m
           torch.distributed.run ... workloads.py noop'`` per host, in parallel (as in two
           terminals): wall time until both have exited. Paired, alternating order
pool       a warm pool on the same hosts: noop tasks, and its start (``Pool()`` and its
           first task), paired with a cold job of the same shape
payload    a 256 MiB tensor argument: the bytes each relay says it received from the
           caller (``launcher.log``: the payload must cross each link once), and the time
           of that job over the same job with a 4-byte tensor; for scale, ``ssh host 'cat
           > /dev/null'`` of the same bytes to every host at once, over an empty one
scale      a noop job on 2, 4, 6 "hosts" x 1 rank (the same sshd listed several times:
           each entry gets its own relay and folder), in rounds of alternating order
logs       rank 0 printing 100,000 lines on 2 hosts x 1 rank, against the same job on
           this machine alone (``nprocs=2``): every line delivered, wall time
=========  ===========================================================================

``--quick`` runs each once at small sizes. Hosts that cannot be reached skip this
section with the reason in the table, except under ``$CI``, where that is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
import workloads

MiB = 1 << 20
HOSTS = [h for h in os.environ.get("NBDIST_BENCH_HOSTS", "host1,host2").split(",") if h]
SCALE_HOSTS = [h for h in os.environ.get("NBDIST_BENCH_SCALE_HOSTS",
                                         "host1,host2,host3,host4,host5,host6").split(",") if h]
SSH_CONFIG = (os.environ.get("NBDIST_BENCH_SSH_CONFIG")
              or os.environ.get("NBDIST_TEST_SSH_CONFIG") or "/etc/nbdist-ci/ssh_config")
SSH_OPTIONS = ["-F", SSH_CONFIG]
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# what each relay writes last into the caller's launcher.log (nbdist/_remote.py)
RELAY_END = re.compile(r"^\[(?P<host>[^\]]+)\] relay \d+: torchrun ended with (?P<code>-?\d+); "
                       r"received (?P<bytes>\d+) bytes from the caller$", re.MULTILINE)
LATE_LOG: list[float] = []  # seconds waited for the relays' last lines after a call returned
SSH_CPU: list[float] = []  # CPU seconds of the caller's ssh clients (reaped) in each hosts_job


def bench_hosts(cfg, run) -> list:
    """The section; ``run`` is run.py (its Row, pairing and job helpers)."""
    why = unreachable()
    if why:
        if os.environ.get("CI"):
            raise RuntimeError(f"CI: the multi-host benchmarks need their hosts: {why}")
        run.log(f"hosts: skipped: {why}")
        return [run.Row("several machines (hosts section): skipped", why, "—", "—", "—", None)]
    del LATE_LOG[:]
    rows = _launch(cfg, run)
    rows += _pool(cfg, run)
    rows += _payload(cfg, run)
    rows += _scale(cfg, run)
    rows += _logs(cfg, run)
    if LATE_LOG:
        rows[-1].details.append(
            f"launcher.log lacked a relay's last line when the call returned, in "
            f"{len(LATE_LOG)} jobs (waited up to {max(LATE_LOG):.3f} s for it)")
    return rows


def unreachable() -> str | None:
    """Why the hosts cannot be used, or None (every one answers ``ssh HOST true``)."""
    if not Path(SSH_CONFIG).is_file():
        return f"no ssh config at {SSH_CONFIG} (.ci/hosts writes it, as root)"
    if shutil.which("ssh") is None:
        return "no ssh client on PATH"
    procs = {h: subprocess.Popen(["ssh", *SSH_OPTIONS, "-o", "BatchMode=yes", "-o",
                                  "ConnectTimeout=5", h, "true"], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for h in dict.fromkeys(HOSTS)}
    bad = []
    for host, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            bad.append(f"`ssh -F {SSH_CONFIG} {host} true` failed ({proc.returncode}: "
                       f"{err.decode(errors='replace').strip()[-200:]})")
    return "; ".join(bad) or None


# ---------------------------------------------------------------- running jobs

def hosts_job(run, fn, *args, hosts=None, nprocs=2, **kwargs):
    """A ``run_distributed`` call on ``hosts``; (seconds, value, [(host, bytes received)])."""
    hosts = hosts or HOSTS
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds, value, job = run.nbdist_job(fn, *args, keep=True, nprocs=nprocs, hosts=hosts,
                                         ssh_options=SSH_OPTIONS, **kwargs)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    SSH_CPU.append(after.ru_utime + after.ru_stime - kids.ru_utime - kids.ru_stime)
    received = relays_received(Path(job.dir), len(hosts))
    shutil.rmtree(job.dir, ignore_errors=True)
    return seconds, value, received


def relays_received(folder: Path, nhosts: int) -> list[tuple[str, int]]:
    """Bytes each relay received from the caller, from their last lines in launcher.log.

    The caller's stderr threads may write those lines just after the call returns: up
    to 2 s are waited for them (and how long, noted in LATE_LOG)."""
    start = time.perf_counter()
    while True:
        try:
            ends = list(RELAY_END.finditer((folder / "launcher.log").read_text()))
        except FileNotFoundError:
            ends = []
        if len(ends) >= nhosts or time.perf_counter() - start > 2:
            break
        time.sleep(0.01)
    if time.perf_counter() - start > 0.005:
        LATE_LOG.append(time.perf_counter() - start)
    bad = [m.group(0) for m in ends if m.group("code") != "0"]
    if len(ends) != nhosts or bad:
        raise RuntimeError(f"expected {nhosts} relays ending with 0 in {folder}/launcher.log, "
                           f"saw {[m.group(0) for m in ends]}")
    return sorted((m.group("host"), int(m.group("bytes"))) for m in ends)


def first_host_address() -> str:
    """The address ssh reaches the first host at (``ssh -G``): the store's, for torchrun."""
    out = subprocess.run(["ssh", *SSH_OPTIONS, "-G", HOSTS[0]], check=True, text=True,
                         stdout=subprocess.PIPE).stdout
    return next(line.split()[1] for line in out.splitlines() if line.startswith("hostname "))


def _free_port() -> int:
    # the first host is this machine here; elsewhere a random free port of ours is as
    # good a guess as a user's
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def raw_torchrun_on_hosts(name: str, *args, nprocs: int = 2) -> float:
    """``workloads.NAME`` under one hand-started torchrun agent per host; wall seconds.

    Each agent is what a user types in a terminal on that host (here: through ssh, all
    started at once). ``is_host`` says which agent holds the c10d store: on separate
    machines torchrun infers it from the endpoint's address, but these test hosts share
    one network stack, where every agent would match 127.0.0.1 and try to bind it."""
    endpoint = f"{first_host_address()}:{_free_port()}"
    rdzv_id = f"bench-{uuid.uuid4().hex[:8]}"
    procs = []
    with tempfile.TemporaryDirectory(prefix="nbdist-bench-") as tmp, \
            contextlib.ExitStack() as files:
        start = time.perf_counter()
        for i, host in enumerate(HOSTS):
            script = " ".join([
                f"cd {REPO} &&", sys.executable, "-m", "torch.distributed.run",
                "--nnodes", str(len(HOSTS)), "--nproc-per-node", str(nprocs),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id,
                # join_timeout: an agent left alone gives up in 60 s instead of 600
                "--rdzv-conf", f"is_host={int(i == 0)},join_timeout=60",
                "benchmarks/workloads.py", name, "/dev/null",
                *(shlex.quote(json.dumps(a)) for a in args)])
            err = files.enter_context(open(Path(tmp) / f"{i}.err", "wb"))
            procs.append((host, subprocess.Popen(
                ["ssh", *SSH_OPTIONS, host, script], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err)))
        try:
            codes = [p.wait(timeout=300) for _, p in procs]
        finally:
            for _, p in procs:
                if p.poll() is None:  # only after a failure elsewhere or a timeout
                    p.kill()
                    p.wait()
        seconds = time.perf_counter() - start
        if any(codes):
            raise RuntimeError("raw torchrun on hosts failed: " + "; ".join(
                f"{host} exit {p.returncode}: "
                f"{(Path(tmp) / f'{i}.err').read_text(errors='replace')[-1500:]}"
                for i, (host, p) in enumerate(procs) if p.returncode))
    return seconds


def ssh_cat(nbytes: int) -> float:
    """``ssh HOST 'cat > /dev/null'`` of ``nbytes`` to every host at once; wall seconds
    until all are done."""
    with tempfile.NamedTemporaryFile(dir=os.environ["NBDIST_HOME"]) as f:
        f.truncate(nbytes)  # a sparse file: read as zeros, no disk involved
        start = time.perf_counter()
        procs = []
        for host in HOSTS:
            with open(f.name, "rb") as src:
                procs.append(subprocess.Popen(
                    ["ssh", *SSH_OPTIONS, host, "cat > /dev/null"], stdin=src))
        if any(p.wait(timeout=300) for p in procs):
            raise RuntimeError(f"ssh cat failed: {[p.returncode for p in procs]}")
        return time.perf_counter() - start


def _s(values) -> str:
    return ", ".join(f"{x:.2f}" for x in values)


def _shape(hosts, nprocs) -> str:
    return f"{len(hosts)} hosts × {nprocs} rank{'s' if nprocs > 1 else ''}"


# ---------------------------------------------------------------- the measures

def _launch(cfg, run) -> list:
    def nb():
        return hosts_job(run, workloads.noop)[0]

    def raw():
        return raw_torchrun_on_hosts("noop")

    if not cfg.quick:  # both sides read torch's files from the page cache from now on
        raw()
        nb()
    raw_s, nb_s = run.paired(raw, nb, cfg.hosts_launch_pairs)
    COLD[:] = nb_s
    ratio = run.paired_ratio(nb_s, raw_s)
    return [run.Row(
        f"launch on {_shape(HOSTS, 2)} over ssh, noop ({len(nb_s)} pairs)",
        run.fmt_s(run.median(nb_s)), f"{run.fmt_s(run.median(raw_s))} a torchrun per host "
        f"by hand (ssh, c10d)", f"{ratio:.3f}×", "≤ 1.1×", run.judge(ratio <= 1.1, cfg),
        [f"nbdist s: {_s(nb_s)}", f"raw s:    {_s(raw_s)}",
         f"ratio of the medians {run.median(nb_s) / run.median(raw_s):.3f}×",
         f"CPU of the caller's ssh clients per nbdist job: {_s(SSH_CPU[-len(nb_s):])} s"])]


COLD: list[float] = []  # the launch measure's nbdist jobs (for quick mode's pool pairs)


def _pool(cfg, run) -> list:
    pools: list = []
    close_s: list[float] = []

    def close():
        while pools:
            start = time.perf_counter()
            pools.pop().close()
            close_s.append(time.perf_counter() - start)

    def cold():
        close()
        return COLD[0] if cfg.quick else hosts_job(run, workloads.noop)[0]

    def pooled():
        close()
        start = time.perf_counter()
        pools.append(run.nbdist.Pool(nprocs=2, hosts=HOSTS, ssh_options=SSH_OPTIONS))
        run.pool_task(pools[-1], workloads.noop, display="plain")  # as a job shows
        first = time.perf_counter() - start
        warm = [run.pool_task(pools[-1], workloads.noop)[0]
                for _ in range(cfg.hosts_pool_warm_tasks)]
        return first, warm

    try:
        cold_s, pooled_r = run.paired(cold, pooled, cfg.hosts_pool_pairs)
    finally:
        close()
    first = [f for f, _ in pooled_r]
    warm_all = [w for _, ws in pooled_r for w in ws]
    warm = run.median(warm_all)
    start_ratio = run.paired_ratio(first, cold_s)
    cold_txt = f"{run.fmt_s(run.median(cold_s))} cold {_shape(HOSTS, 2)} noop job"
    return [
        run.Row(f"noop task on a warm {_shape(HOSTS, 2)} pool (median of {len(warm_all)})",
                run.fmt_s(warm), cold_txt, f"{warm / run.median(cold_s):.4f}×", "≤ 0.1 s",
                run.judge(warm <= 0.1, cfg),
                ["warm task ms, per pool: " + "; ".join(
                    ", ".join(f"{1000 * w:.0f}" for w in ws) for _, ws in pooled_r),
                 f"slowest {run.fmt_s(max(warm_all))}"]),
        run.Row(f"{_shape(HOSTS, 2)} pool start: Pool() and its first noop task "
                f"({len(first)} pairs)", run.fmt_s(run.median(first)), cold_txt,
                f"{start_ratio:.3f}×", "none set (one machine: ≤ 1.05×)", None,
                [f"pool start s: {_s(first)}", f"cold job s:   {_s(cold_s)}",
                 f"pool.close() s: {_s(close_s)}"]),
    ]


def _payload(cfg, run) -> list:
    nbytes = cfg.hosts_payload_bytes
    big = torch.ones(nbytes // 4, dtype=torch.int32)  # one 1 per page: checksum = pages
    small = torch.ones(1, dtype=torch.int32)
    got: list[list[int]] = []
    small_got: list[list[int]] = []
    sums: list[list[int]] = []
    ssh_cpu: dict[str, list[float]] = {"big": [], "small": []}

    def with_big():
        seconds, values, received = hosts_job(run, workloads.touch, big, return_all=True)
        got.append(received)
        sums.append([v["checksum"] for v in values])
        ssh_cpu["big"].append(SSH_CPU[-1])
        return seconds

    def with_small():
        seconds, _, received = hosts_job(run, workloads.touch, small, return_all=True)
        small_got.append(received)
        ssh_cpu["small"].append(SSH_CPU[-1])
        return seconds

    if not cfg.quick:  # first writes of memory this VM has not used lately cost more
        with_big()
        del got[:], sums[:], ssh_cpu["big"][:]
    big_s, small_s = run.paired(with_big, with_small, cfg.hosts_payload_pairs)
    extra = run.median([b - s for b, s in zip(big_s, small_s)])
    rate = nbytes / max(extra, 1e-3) / 1e6
    cat_s, empty_s = run.paired(lambda: ssh_cat(nbytes), lambda: ssh_cat(0),
                                cfg.hosts_payload_pairs)
    cat_rate = nbytes / max(run.median([c - e for c, e in zip(cat_s, empty_s)]), 1e-3) / 1e6
    # the payload file is the tensor plus torch.save's ~1 KiB; the wire adds a ~100-byte
    # header per 1 MiB chunk; the job's spec is the small job's bytes
    overhead = [r - s for rs, ss in zip(got, small_got) for (_, r), (_, s) in zip(rs, ss)]
    once = all(nbytes <= o <= nbytes * 1.01 for o in overhead)
    pages = nbytes // workloads.PAGE
    intact = all(s == pages for ss in sums for s in ss)
    size = f"{nbytes / MiB:g} MiB"
    verdict = ("once per host" if once else "NOT once per host") + \
        ("" if intact else ", ranks read WRONG data")
    return [run.Row(
        f"a {size} tensor argument to {_shape(HOSTS, 2)}: bytes each relay received, "
        f"time over a 4-byte one", f"{rate:.0f} MB/s per host; {verdict} "
        f"({run.median(overhead) / MiB:.2f} MiB more than the small job)",
        f"{cat_rate:.0f} MB/s ssh cat to every host at once", f"{rate / cat_rate:.2f}×",
        "once per host", run.judge(once and intact, cfg),
        [f"job with the tensor s: {_s(big_s)}"
         + ("" if cfg.quick else " (after one unmeasured warm-up job)"),
         f"same job, 4-byte tensor s: {_s(small_s)}",
         f"bytes each relay received, per big job: {got}; per small job: {small_got}",
         f"each rank's checksum (expected {pages}): {sums}",
         (f"CPU of the caller's ssh clients, big jobs: {_s(ssh_cpu['big'])} s; small "
          f"jobs: {_s(ssh_cpu['small'])} s"),
         f"ssh cat of {size} to every host s: {_s(cat_s)}; of nothing: {_s(empty_s)}"])]


def _scale(cfg, run) -> list:
    counts = cfg.hosts_scale
    times: dict[int, list[float]] = {k: [] for k in counts}
    cpu: dict[int, list[float]] = {k: [] for k in counts}
    ssh_cpu: dict[int, list[float]] = {k: [] for k in counts}
    if not cfg.quick:
        hosts_job(run, workloads.noop, hosts=_hosts(counts[-1]), nprocs=1)
    for round_ in range(cfg.hosts_scale_rounds):
        for k in (counts if round_ % 2 == 0 else counts[::-1]):
            before = time.process_time()
            seconds = hosts_job(run, workloads.noop, hosts=_hosts(k), nprocs=1)[0]
            cpu[k].append(time.process_time() - before)
            ssh_cpu[k].append(SSH_CPU[-1])
            times[k].append(seconds)
    TWO_HOSTS_NOOP[:] = times.get(2, [])
    med = {k: run.median(v) for k, v in times.items()}
    lo, hi = counts[0], counts[-1]
    slope = (med[hi] - med[lo]) / (hi - lo) if hi > lo else 0.0
    return [run.Row(
        f"noop launch vs host count, 1 rank per host ({', '.join(map(str, counts))} hosts; "
        f"{cfg.hosts_scale_rounds} rounds)",
        "; ".join(f"{k}: {run.fmt_s(med[k])}" for k in counts), "—",
        f"+{slope:.2f} s per host", "— (for the 64-node plan)", None,
        [f"{k} hosts s: {_s(times[k])}; caller CPU {_s(cpu[k])} s, its ssh clients "
         f"{_s(ssh_cpu[k])} s" for k in counts]
        + [(f"this machine has {os.cpu_count()} cores: every host's agent and rank import "
            f"torch on them at once")])]


TWO_HOSTS_NOOP: list[float] = []  # the scale measure's 2 hosts x 1 rank noop jobs


def _hosts(k: int) -> list[str]:
    """``k`` distinct host names (nbdist takes each once): the two of ``HOSTS``, then
    ``SCALE_HOSTS``' (.ci/hosts names the same two sshd host3..host6 too)."""
    names = list(dict.fromkeys(HOSTS[:2] + SCALE_HOSTS))
    if k > len(names):
        raise SystemExit(f"{k} hosts asked, {len(names)} named: set NBDIST_BENCH_SCALE_HOSTS")
    return names[:k]


def _logs(cfg, run) -> list:
    """Each side: the printing job, then a noop job of the same shape (what the lines
    themselves cost is the difference)."""
    n = cfg.log_lines
    seen = []
    hosts = _hosts(2)

    def remote():
        sink = run.LineSink()
        seconds = hosts_job(run, workloads.print_lines, n, hosts=hosts, nprocs=1,
                            sink=sink)[0]
        seen.append(("hosts", sink.numbered, sink.last))
        if cfg.quick:  # the scale measure's 2-host job stands in
            return seconds, TWO_HOSTS_NOOP[0]
        return seconds, hosts_job(run, workloads.noop, hosts=hosts, nprocs=1)[0]

    def local():
        sink = run.LineSink()
        seconds = run.nbdist_job(workloads.print_lines, n, sink=sink)[0]
        seen.append(("local", sink.numbered, sink.last))
        noop = run.noop_job_seconds() if cfg.quick else run.nbdist_job(workloads.noop)[0]
        return seconds, noop

    remote_r, local_r = run.paired(remote, local, cfg.hosts_log_pairs)
    remote_s, local_s = [p for p, _ in remote_r], [p for p, _ in local_r]
    ratio = run.paired_ratio(remote_s, local_s)
    extra_remote = run.median([p - q for p, q in remote_r])
    extra_local = run.median([p - q for p, q in local_r])
    last = f"line {n - 1} of {n}"
    mine = [s for s in seen if s[0] == "hosts"]
    complete = all(count == n and tail == last for _, count, tail in mine)
    pct = 100 * min(count for _, count, _ in mine) / n
    return [run.Row(
        f"{n:,} rank-0 log lines through the relay ({_shape(hosts, 1)}): delivered, wall time",
        f"{pct:.0f} %, {run.fmt_s(run.median(remote_s))}",
        f"{run.fmt_s(run.median(local_s))} same job on one machine (2 ranks)",
        f"{ratio:.3f}×", "100 % (time: none set)", run.judge(complete, cfg),
        [f"lines seen per run (side, count, last): {seen}",
         f"through the relay s: {_s(remote_s)}; its noop job: {_s(q for _, q in remote_r)}",
         f"one machine s:       {_s(local_s)}; its noop job: {_s(q for _, q in local_r)}",
         (f"the lines' own cost (job minus its noop, median): through the relay "
          f"{run.fmt_s(extra_remote)}, one machine {run.fmt_s(extra_local)}")])]
