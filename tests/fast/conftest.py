"""The fast tier: fakes instead of torchrun, a fake clock instead of sleeps, no torch.

Every test in this folder is marked ``fast`` (``python -m pytest -m fast``). They drive
the real supervisor, pool rules, protocol and relay with :mod:`fakes` standing in for
the launch: no torchrun, no ssh, and no ``import torch`` anywhere in the code they run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items):
    # this hook sees the whole session's items: mark only this folder's
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.fast)


@pytest.fixture(scope="package", autouse=True)
def no_torch_imported():
    """Fails the folder's last test if anything in it imported torch. Run after another
    tier that imported torch already, it cannot tell: test_no_torch.py checks that in a
    fresh process."""
    before = "torch" in sys.modules
    yield
    if not before:
        assert "torch" not in sys.modules, "a fast test imported torch"
