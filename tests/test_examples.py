"""The README's demo works as advertised."""

import re

import pytest

from helpers import REPO, run_script


@pytest.mark.slow
def test_ddp_convnet_demo_trains_and_keeps_ranks_in_sync():
    proc = run_script(f"exec(open({str(REPO / 'examples/ddp_convnet.py')!r}).read())",
                      timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "weights identical on both ranks: True" in proc.stdout
    accuracy = float(re.search(r"accuracy on held-out synthetic data: ([\d.]+)%",
                               proc.stdout).group(1))
    assert accuracy > 90


@pytest.mark.slow
def test_pool_notebook_loads_once_trains_in_two_cells_and_evaluates(tmp_path, nbdist_home):
    """examples/mnist_pool.ipynb: the ranks stay up and keep their state between cells."""
    from kernel_util import run_notebook

    nb = run_notebook(REPO / "examples" / "mnist_pool.ipynb", tmp_path)  # inherits NBDIST_HOME
    outputs = [out for c in nb.cells if c.cell_type == "code" for out in c.get("outputs", ())]
    assert not [out for out in outputs if out.output_type == "error"], outputs
    text = "\n".join(out.get("text", "") for out in outputs)

    assert re.search(r"\[nbdist\] pool ready in [\d.]+ s: 2 ranks \(pids \d+, \d+\), gloo, "
                     r"persist", text), text
    # each rank built its own half of the data once, in the pool's processes
    pids = [re.search(rf"\[rank {r}\] pid (\d+): 1000 of 2000 images", text).group(1)
            for r in (0, 1)]
    assert "epoch 1: loss" in text and "epoch 2: loss" in text, text
    # the second training cell ran on the same ranks: no relaunch, a few ms of overhead
    epoch = float(re.search(r"epoch 2: loss [\d.]+ \(([\d.]+) s\)", text).group(1))
    wall = re.search(r"Wall time: ([\d.]+) (s|ms)\b", text)
    assert wall, text
    overhead = float(wall.group(1)) / (1000 if wall.group(2) == "ms" else 1) - epoch
    assert overhead < 2.5, text  # a cold job takes seconds to start
    assert re.search(rf"pool up: 2 ranks on cpu, gloo, 3 tasks run, idle [\d.]+s, persist\n"
                     rf"  rank 0 idle \(pid {pids[0]}\), rank 1 idle \(pid {pids[1]}\)",
                     text), text
    assert "[nbdist] from rank 0: state, accuracy, history" in text, text
    found = re.search(r"test accuracy in the notebook: ([\d.]+) \(on the ranks: ([\d.]+)\)",
                      text)
    assert found, text
    in_notebook, on_ranks = float(found.group(1)), float(found.group(2))
    assert in_notebook > 0.9 and abs(in_notebook - on_ranks) < 0.01, text
    assert "[nbdist] pool stopped after 4 task(s): its ranks are gone" in text, text
