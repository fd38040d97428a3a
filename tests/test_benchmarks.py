"""Smoke test of the benchmarks: ``benchmarks/run.py --quick`` runs and prints its table.

The numbers are not judged here (a shared CI machine says nothing about them); the
full benchmark, ``python benchmarks/run.py``, is run by hand. See benchmarks/README.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO

MEASURES = ("cold launch", "return a 8 MiB state dict: time", "caller's peak memory",
            "training throughput", "rank-0 log lines", "shipped to 2 ranks",
            "import nbdist",
            # the pool group (issue 12)
            "noop task on a warm 2-rank pool", "pool start", "tensor from a warm task",
            "after a failed-but-healthy task", "warm noop tasks back to back")


@pytest.mark.slow
def test_quick_benchmarks_run_and_print_the_table(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| measure | nbdist | baseline | ratio | target | met |"
    for measure in MEASURES:
        assert any(measure in line for line in table), (measure, proc.stdout)
    assert all(line.endswith("| smoke |") for line in table[2:]), table

    rows = {r["measure"]: r for r in json.loads(out.read_text())["rows"]}
    logs = next(r for m, r in rows.items() if "log lines" in m)
    assert logs["nbdist"].startswith("100 %"), logs  # every line delivered
    ship = next(r for m, r in rows.items() if "shipped" in m)
    assert "written once" in ship["nbdist"] and "pages shared" in ship["nbdist"], ship
    failed = next(r for m, r in rows.items() if "failed-but-healthy" in m)
    assert "NOT kept" not in failed["nbdist"], failed  # the health check kept the pool
    leaks = next(r for m, r in rows.items() if "back to back" in m)
    assert "+0 processes" in leaks["nbdist"], leaks  # the pool's 3 processes, no more
