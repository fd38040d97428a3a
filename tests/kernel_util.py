"""A real Jupyter kernel for tests: this Python's ipykernel, talked to over ZMQ.

The kernel runs ``sys.executable`` (the test venv's Python) through a kernelspec
written into a private folder, so it works from a fresh clone whatever kernelspecs are
installed (or not) on the machine.
"""

from __future__ import annotations

import ast
import json
import queue
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

KERNEL_NAME = "nbdist-test-python"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def kernel_manager(spec_root: Path) -> KernelManager:
    """A KernelManager (not started) for this Python's ipykernel."""
    spec_dir = Path(spec_root) / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "nbdist tests", "language": "python",
    }))
    specs = KernelSpecManager(kernel_dirs=[str(spec_root)])
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


@dataclass
class Reply:
    """What one execute request produced, as far as it has been read."""

    status: str | None = None  # "ok" | "error" | None while running
    ename: str | None = None
    evalue: str | None = None
    traceback: list[str] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""
    results: list[str] = field(default_factory=list)  # text/plain of execute_result
    execution_count: int | None = None  # the N of the cell's In[N]

    @property
    def error_text(self) -> str:
        """The traceback as the notebook shows it, without colours."""
        return _ANSI.sub("", "\n".join(self.traceback))

    def __str__(self) -> str:
        return (f"status={self.status} ename={self.ename}\n--- stdout\n{self.stdout}"
                f"--- stderr\n{self.stderr}--- traceback\n{self.error_text}")


class Pending:
    """An execute request in flight: read its output until a condition holds."""

    def __init__(self, kernel: "Kernel", msg_id: str):
        self.kernel = kernel
        self.msg_id = msg_id
        self.reply = Reply()
        self._idle = False

    def wait_for(self, condition: Callable[[Reply], bool], timeout: float) -> Reply:
        deadline = time.monotonic() + timeout
        while not condition(self.reply):
            if self._idle:
                raise AssertionError(f"the cell finished before the condition held:\n{self.reply}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"condition not met in {timeout}s:\n{self.reply}")
            self._read_one(left)
        return self.reply

    def result(self, timeout: float = 120) -> Reply:
        self.wait_for(lambda _: self._idle, timeout)
        deadline = time.monotonic() + timeout
        while self.reply.status is None:
            msg = self.kernel.client.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == self.msg_id:
                self.reply.status = msg["content"]["status"]
                self.reply.execution_count = msg["content"].get("execution_count")
        return self.reply

    def _read_one(self, timeout: float) -> None:
        try:
            msg = self.kernel.client.get_iopub_msg(timeout=min(timeout, 1.0))
        except queue.Empty:
            return
        if msg["parent_header"].get("msg_id") != self.msg_id:
            return
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            if content["name"] == "stdout":
                self.reply.stdout += content["text"]
            else:
                self.reply.stderr += content["text"]
        elif kind == "error":
            self.reply.ename = content["ename"]
            self.reply.evalue = content["evalue"]
            self.reply.traceback = content["traceback"]
        elif kind == "execute_result":
            self.reply.results.append(content["data"].get("text/plain", ""))
        elif kind == "status" and content["execution_state"] == "idle":
            self._idle = True


class Kernel:
    """A started kernel and its client."""

    def __init__(self, km: KernelManager):
        self.km = km
        self.client = km.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def submit(self, code: str) -> Pending:
        return Pending(self, self.client.execute(code))

    def execute(self, code: str, timeout: float = 120) -> Reply:
        return self.submit(code).result(timeout)

    def run(self, code: str, timeout: float = 120) -> Reply:
        """Execute ``code`` and fail the test if it raised."""
        reply = self.execute(code, timeout)
        assert reply.status == "ok", f"cell failed:\n{code}\n{reply}"
        return reply

    def value(self, expr: str) -> Any:
        """The value of a Python literal expression evaluated in the kernel."""
        out = self.run(f"print(repr(({expr})))").stdout
        return ast.literal_eval(out.strip())

    def shutdown(self) -> None:
        self.client.stop_channels()
        self.km.shutdown_kernel(now=False)


def run_notebook(path: Path, workdir: Path):
    """Execute a notebook top to bottom in this Python's kernel; return it with outputs.

    The kernel starts in ``workdir`` and inherits the environment (``NBDIST_HOME``).
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    km = kernel_manager(workdir / "kernelspec")
    try:
        NotebookClient(nb, km=km, timeout=300,
                       resources={"metadata": {"path": str(workdir)}}).execute()
    finally:  # nbclient leaves a kernel it did not create running
        if km.has_kernel:
            km.shutdown_kernel(now=False)
    return nb
