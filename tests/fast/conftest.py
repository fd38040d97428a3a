"""The fast tier: fakes instead of torchrun, a fake clock instead of sleeps, no torch.

Every test in this folder is marked ``fast`` (``python -m pytest -m fast``). They drive
the real supervisor, pool rules, protocol and relay with :mod:`fakes` standing in for
the launch: no torchrun, no ssh, and no ``import torch`` anywhere in the code they run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items):
    # this hook sees the whole session's items: mark only this folder's
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.fast)


@pytest.fixture(autouse=True)
def nbdist_home(tmp_path, monkeypatch):
    """tests/conftest.py's, lighter: a private ``NBDIST_HOME``, and no process left
    behind. Nothing here starts ranks, so a leftover can only be a child of this
    process (a relay): one look at those, not a scan of every process per job folder."""
    home = str(tmp_path / "nbdist-home")
    monkeypatch.setenv("NBDIST_HOME", home)
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    yield home
    left = [child for child in psutil.Process().children(recursive=True)
            if child.pid not in before and child.status() != psutil.STATUS_ZOMBIE]
    for child in left:  # clean up for the next test, but still fail this one
        child.kill()
    assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="package", autouse=True)
def no_torch_imported():
    """Fails the folder's last test if torch was imported while its tests ran (by
    unpickling a payload, say). Imports at collection, and a session where another
    tier imported torch first, are test_no_torch.py's to catch, in a fresh process."""
    before = "torch" in sys.modules
    yield
    if not before:
        assert "torch" not in sys.modules, "a fast test imported torch"
