"""The fast tier's code paths import no torch, checked in a fresh interpreter.

In a session that collected the other tiers too, torch is imported before any test
runs, so conftest's package fixture cannot tell; a fresh process can. It runs the
tier's key scenarios — a supervised timeout with stacks, a pool keeping its ranks
after a health check (the check's payload unpickled), results read back, the mirror
— then imports the relay's module, and says which torch modules it holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEY_SCENARIOS = [  # in tests/fast
    "test_supervise.py::test_timeout_kills_and_names_the_running_ranks_with_their_stacks",
    "test_pool_rules.py::test_every_rank_done_gives_rank_0_value",
    "test_pool_rules.py::test_a_task_that_raises_on_one_rank_keeps_the_pool_once_healthy",
    "test_relay_pipe.py::test_mirror_sends_what_grows_and_appears_with_the_events_last",
]
SCRIPT = f"""
import sys, pytest
code = pytest.main(["-q", "-p", "no:cacheprovider",
                    *["tests/fast/" + node for node in {KEY_SCENARIOS!r}]])
import nbdist._remote  # a host's relay: it must start without torch
print("EXIT", int(code))
print("TORCH", "torch" in sys.modules)
"""


def test_the_key_scenarios_run_without_importing_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines()
                 if line.startswith(("EXIT ", "TORCH ")))
    assert lines.get("EXIT") == "0", out.stdout + out.stderr
    assert lines.get("TORCH") == "False", "the fast tier's code paths imported torch"
