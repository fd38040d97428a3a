"""The README's demo works as advertised."""

import re

from helpers import REPO, run_script


def test_ddp_convnet_demo_trains_and_keeps_ranks_in_sync():
    proc = run_script(f"exec(open({str(REPO / 'examples/ddp_convnet.py')!r}).read())",
                      timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "weights identical on both ranks: True" in proc.stdout
    accuracy = float(re.search(r"accuracy on held-out synthetic data: ([\d.]+)%",
                               proc.stdout).group(1))
    assert accuracy > 90
