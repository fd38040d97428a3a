"""The caller side of the result benchmark, in a process of its own (run by ``run.py``).

    python benchmarks/result_caller.py NBYTES PAIRS OUT.json [--no-noop-job]

Per round, interleaved: a manual ``torch.save`` + ``torch.load`` of a state dict of
NBYTES in this process, a job whose rank 0 builds such a dict and drops it, and the
same job returning it (``--no-noop-job``, quick mode: not the dropping one). The memory peak of the returning call is exact: the kernel's
high-water mark (``VmHWM``) is reset just before it (``/proc/self/clear_refs``) and
read just after, and compared with the resident size before the call.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import nbdist  # noqa: E402

sys.path.insert(0, str(HERE))
import workloads  # noqa: E402
from run import LineSink  # noqa: E402


def status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # "reset the peak resident set size" (Linux >= 4.0)


def job(give_back: bool, nbytes: int):
    with contextlib.redirect_stdout(LineSink()):
        start = time.perf_counter()
        value = nbdist.run_distributed(workloads.make_state, nbytes, give_back, nprocs=2,
                                       display="plain")
        return time.perf_counter() - start, value


def manual(nbytes: int, folder: str) -> tuple[float, float]:
    state = _state(nbytes)
    path = Path(folder) / "state.pt"
    start = time.perf_counter()
    torch.save(state, path)
    saved = time.perf_counter()
    loaded = torch.load(path)
    done = time.perf_counter()
    del state, loaded
    path.unlink()
    return saved - start, done - saved


def _state(nbytes: int, tensors: int = 32) -> dict:
    """The dict ``workloads.make_state`` builds on rank 0."""
    numel = nbytes // 4 // tensors
    return {f"layer{i}.weight": torch.full((numel,), float(i)) for i in range(tensors)}


def main(nbytes: int, pairs: int, out: str, noop_job: bool = True) -> None:
    r: dict = {k: [] for k in ("manual_s", "manual_save_s", "manual_load_s", "none_s",
                               "ret_s", "peak_call_bytes", "peak_read_bytes", "read_s")}
    home = os.environ.get("NBDIST_HOME") or tempfile.gettempdir()

    def run_manual():
        with tempfile.TemporaryDirectory(dir=home) as folder:
            save_s, load_s = manual(nbytes, folder)
        r["manual_save_s"].append(save_s)
        r["manual_load_s"].append(load_s)
        r["manual_s"].append(save_s + load_s)

    def run_none():
        if noop_job:
            r["none_s"].append(job(False, nbytes)[0])
            shutil.rmtree(nbdist.last_job().dir, ignore_errors=True)

    def run_ret():
        gc.collect()
        before = status_bytes("VmRSS")
        reset_peak()
        ret_s, state = job(True, nbytes)
        r["peak_call_bytes"].append(status_bytes("VmHWM") - before)
        start = time.perf_counter()
        for tensor in state.values():  # bring every page in, as using the result would
            tensor.view(torch.uint8)[::4096].sum()
        r["read_s"].append(time.perf_counter() - start)
        r["peak_read_bytes"].append(status_bytes("VmHWM") - before)
        assert sum(t.numel() * t.element_size() for t in state.values()) == nbytes
        del state
        shutil.rmtree(nbdist.last_job().dir, ignore_errors=True)
        r["ret_s"].append(ret_s)

    for i in range(pairs):  # ABBA order, so that drift in the machine's load cancels
        steps = (run_manual, run_none, run_ret) if i % 2 == 0 else (run_ret, run_none,
                                                                     run_manual)
        for step in steps:
            step()
    Path(out).write_text(json.dumps(r))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
         noop_job="--no-noop-job" not in sys.argv[4:])
