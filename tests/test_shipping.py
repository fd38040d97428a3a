"""What the caller sends hosts of its own modules (``nbdist/shipping.py``).

The real trip, to hosts that do not see the caller's folders, is in test_hosts.py;
here, which files are chosen and how a host lays them out.
"""

from __future__ import annotations

import importlib
import sys

import pytest

from nbdist import shipping


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A notebook's folder: a module and a package it imported, and files it did not."""
    root = tmp_path / "project"
    (root / "mypkg" / "inner").mkdir(parents=True)
    (root / "mymod.py").write_text("X = 1\n")
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "inner" / "deep.py").write_text("Y = 2\n")  # never imported
    (root / "mypkg" / "__pycache__").mkdir()
    (root / "mypkg" / "__pycache__" / "stale.py").write_text("")
    (root / "notes.txt").write_text("data, not code")
    elsewhere = tmp_path / "src"  # another folder of the user's on sys.path
    elsewhere.mkdir()
    (elsewhere / "lib_of_mine.py").write_text("Z = 3\n")
    (elsewhere / "unused.py").write_text("")  # not the working directory: not sent
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(elsewhere))
    monkeypatch.syspath_prepend(str(root))
    for name in ("mymod", "mypkg", "lib_of_mine"):
        monkeypatch.delitem(sys.modules, name, raising=False)
        importlib.import_module(name)
    yield root
    for name in ("mymod", "mypkg", "lib_of_mine"):
        sys.modules.pop(name, None)


def test_own_modules_are_sent_whole_packages_too_and_installed_ones_not(project):
    files, left_out = shipping.collect(list(sys.path), str(project))
    sent = {(sys.path[index], path) for index, path, _ in files}
    mine = {(p, path) for p, path in sent if p.startswith(str(project.parent))}
    assert mine == {(str(project), "mymod.py"), (str(project), "mypkg/__init__.py"),
                    (str(project), "mypkg/inner/deep.py"),
                    (str(project.parent / "src"), "lib_of_mine.py")}
    assert not left_out
    # nothing of the standard library, installed packages (torch, pytest) or nbdist
    assert not [path for _, path in sent if path.startswith(("torch/", "_pytest/", "nbdist/",
                                                            "json/"))]


def test_past_the_size_limit_whole_modules_are_left_out_and_named(project, monkeypatch):
    monkeypatch.setattr(shipping, "MAX_BYTES", 10)  # mymod.py (6 bytes) fits, no more
    files, left_out = shipping.collect([str(project)], str(project))
    assert [path for _, path, _ in files] == ["mymod.py"]
    assert left_out == ["mypkg (past 0 MiB of source)"]


def test_a_host_puts_them_just_before_the_folder_they_came_from(project, tmp_path):
    sys_path = ["/gone/elsewhere", str(project), "/usr/lib/python3.11"]
    files, _ = shipping.collect(sys_path, str(project))
    roots = shipping.unpack(shipping.pack(files), tmp_path / "host")
    assert roots == {1: tmp_path / "host" / "1"}
    assert (tmp_path / "host" / "1" / "mypkg" / "inner" / "deep.py").read_text() == "Y = 2\n"
    # after it: a host that has the folder (a shared filesystem) imports from there
    assert shipping.with_sent(sys_path, roots) == [
        "/gone/elsewhere", str(project), str(tmp_path / "host" / "1"), "/usr/lib/python3.11"]
    with pytest.raises(ValueError, match="outside"):
        shipping.unpack(shipping.pack([(0, "../escape.py", b"")]), tmp_path / "host")


def test_a_folder_listed_twice_is_sent_once_and_namespaces_and_hidden_folders(project,
                                                                              monkeypatch):
    (project / "spaced").mkdir()  # a namespace package: no __init__.py
    (project / "spaced" / "part.py").write_text("W = 4\n")
    hidden = project.parent / ".tool"  # a debugger's folder, say
    hidden.mkdir()
    (hidden / "probe.py").write_text("")
    monkeypatch.syspath_prepend(str(hidden))
    try:
        for name in ("spaced", "probe"):
            importlib.import_module(name)
        files, _ = shipping.collect([str(project), str(hidden), str(project) + "/."],
                                    str(project))
    finally:
        for name in ("spaced", "probe"):
            sys.modules.pop(name, None)
    assert {index for index, _, _ in files} == {0}
    assert "spaced/part.py" in [path for _, path, _ in files]
