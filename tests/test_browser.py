"""The dashboard in a real browser: JupyterLab + headless Chromium, driven by Playwright.

Opens a notebook that trains a small DDP model with ``%%distributed``, ``track`` and
``report``, runs it, checks what the page shows mid-run (a progress bar per rank, the
loss chart, rank 0's printed lines, the kernel busy), switches the per-rank log view
to rank 1 and waits for rank 1's printed lines in it, then checks what it shows after
(the static summary that replaces the widgets, with every rank's last log lines; the
kernel never shown idle while the cell ran). It takes two screenshots mid-run: the
dashboard, and the dashboard following rank 1's log. With
``NBDIST_UPDATE_SCREENSHOT=1`` they are written to ``docs/dashboard.png`` and
``docs/dashboard-ranks.png``.

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and the ``jupyterlab``
and ``playwright`` Python packages; skips, saying which is missing, without them.
Playwright's own browser download is never used: Chromium is the system's.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("NBDIST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
DOCS = Path(__file__).resolve().parent.parent / "docs"
DOCS_SCREENSHOT = DOCS / "dashboard.png"
DOCS_RANKS_SCREENSHOT = DOCS / "dashboard-ranks.png"

SETUP = """\
import os
os.environ["NBDIST_HOME"] = {home!r}
%load_ext nbdist"""

TRAIN = """\
%%distributed --nprocs 2
import time
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

torch.manual_seed(rank)
X = torch.randn(1024, 16)
y = X @ torch.linspace(-1, 1, 16).unsqueeze(1) + 0.1 * torch.randn(1024, 1)
model = DDP(torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.02)
for epoch in track(range(4), desc="epoch"):
    for i in track(range(40), desc="train"):
        xb, yb = X[i * 25:(i + 1) * 25], y[i * 25:(i + 1) * 25]
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        report(loss=loss, lr=0.02)
        time.sleep(0.05)
    print(f"epoch {epoch}: loss {loss.item():.4f} on rank {rank}")
for percent in range(0, 101, 25):  # a line redrawn in place, as tqdm does
    print(f"\\rsaving {percent}%", end="", flush=True)
    time.sleep(0.1)
print()
weights = model.module.weight.detach()"""


def missing_tools() -> str | None:
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
    for module, package in (("playwright.sync_api", "playwright"),
                            ("jupyterlab", "jupyterlab")):
        try:
            __import__(module)
        except ImportError:
            return f"the {package} package is not installed (pip install {package})"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's child process: get SIGTERM if pytest dies without cleaning up."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def write_notebook(path: Path, home: str) -> None:
    cells = [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
              "source": source} for source in (SETUP.format(home=home), TRAIN)]
    path.write_text(json.dumps({
        "cells": cells, "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                    "language": "python"}}}))


@pytest.fixture
def lab(tmp_path, nbdist_home):
    """A JupyterLab server on a free loopback port, stopped with its kernels afterwards."""
    reason = missing_tools()
    if reason:
        pytest.skip(f"browser check skipped: {reason}")
    root = tmp_path / "lab"
    root.mkdir()
    write_notebook(root / "dashboard.ipynb", nbdist_home)
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ)
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "workspaces")):
        env[var] = str(tmp_path / sub)
    # no "get notified about Jupyter news?" toast over the screenshot
    news = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    log = open(tmp_path / "lab.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", "--allow-root", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         "--LabApp.news_url=", "--ServerApp.open_browser=False",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n"
                                       + (tmp_path / "lab.log").read_text()[-3000:])
                time.sleep(0.3)
        yield base, token
    finally:
        try:  # shuts its kernels down too
            urllib.request.urlopen(urllib.request.Request(
                f"{base}/api/shutdown?token={token}", method="POST"), timeout=5)
            server.wait(timeout=20)
        except Exception:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        log.close()


KERNEL_IDLE = """() => {
  const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const kernel = panel && panel.sessionContext && panel.sessionContext.session
    && panel.sessionContext.session.kernel;
  return !!kernel && kernel.status === 'idle'
    && document.querySelectorAll('.jp-Cell').length === 2;
}"""

DASHBOARD_LIVE = """() => {
  const out = document.querySelectorAll('.jp-Cell')[1]?.querySelector('.jp-OutputArea');
  if (!out) return false;
  const bars = out.querySelectorAll('.widget-hprogress .progress-bar');
  const moving = [...bars].filter(b => parseFloat(b.style.width || '0') > 15);
  return bars.length === 2 && moving.length === 2
    && out.querySelector('svg polyline') !== null
    && out.innerText.includes('running') && out.innerText.includes('epoch 0: loss');
}"""

# from here on, record the kernel status JupyterLab shows, and the status messages of
# each cell (by its execute request), with the page's clock in milliseconds
WATCH_KERNEL = """() => {
  const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  const log = window.nbdistLog = {shown: [], cells: [], statuses: []};
  kernel.statusChanged.connect((_, status) => log.shown.push([performance.now(), status]));
  kernel.anyMessage.connect((_, args) => {
    const msg = args.msg;
    if (args.direction === 'send' && msg.header.msg_type === 'execute_request')
      log.cells.push(msg.header.msg_id);
    if (args.direction === 'recv' && msg.header.msg_type === 'status')
      log.statuses.push([performance.now(), msg.parent_header.msg_id,
                         msg.content.execution_state]);
  });
}"""

SHOWN_STATUS = """() =>
  window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status"""

TRAIN_CELL_ENDED = """() => {
  const log = window.nbdistLog;
  return log.cells.length === 2 && log.statuses.some(
    ([, parent, state]) => parent === log.cells[1] && state === 'idle');
}"""


def idle_while_running(log: dict) -> list[float]:
    """How long (ms) JupyterLab showed the kernel idle while the training cell ran."""
    train = log["cells"][1]
    begin = next(t for t, parent, s in log["statuses"] if parent == train and s == "busy")
    end = next(t for t, parent, s in log["statuses"] if parent == train and s == "idle")
    periods, idle_since = [], None
    for t, status in log["shown"]:
        if status == "idle" and idle_since is None:
            idle_since = t
        elif status != "idle" and idle_since is not None:
            if begin <= idle_since < end:
                periods.append(t - idle_since)
            idle_since = None
    if idle_since is not None and begin <= idle_since < end:
        periods.append(end - idle_since)
    return periods


RANK1_LOG_SHOWN = """() => {
  const log = document.querySelectorAll('.jp-Cell')[1]?.querySelector('.nbdist-log');
  // a line printed before the pick, and one printed after: the view follows the log
  return !!log && log.innerText.includes('epoch 0: loss')
    && log.innerText.includes('epoch 1: loss') && log.innerText.includes('on rank 1');
}"""

STDOUT = '[data-mime-type="application/vnd.jupyter.stdout"]'

DASHBOARD_DONE = """() => {
  const out = document.querySelectorAll('.jp-Cell')[1]?.querySelector('.jp-OutputArea');
  return !!out && !!out.querySelector('.nbdist-dashboard')
    && out.innerText.includes('succeeded');
}"""


@pytest.mark.slow
def test_dashboard_in_jupyterlab_with_headless_chromium(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    base, token = lab
    shot, ranks_shot = tmp_path / "dashboard.png", tmp_path / "dashboard-ranks.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000},
                                    device_scale_factor=1)
            page.set_default_timeout(60_000)  # no step may wait forever
            page.goto(f"{base}/lab/tree/dashboard.ipynb?token={token}")
            page.wait_for_function(KERNEL_IDLE, timeout=90_000, polling=250)
            page.evaluate(WATCH_KERNEL)
            # fire and forget: the command's promise resolves only when the cells end
            page.evaluate("() => { const app = window.jupyterapp;"
                          " if (app.shell.collapseLeft) app.shell.collapseLeft();"
                          " app.commands.execute('notebook:run-all-cells'); }")
            page.wait_for_function(DASHBOARD_LIVE, timeout=90_000, polling=200)
            cell = page.locator(".jp-Cell").nth(1)
            cell.scroll_into_view_if_needed()
            time.sleep(0.5)  # let the widgets finish drawing this update
            cell.screenshot(path=str(shot))
            text = cell.locator(".jp-OutputArea").inner_text()
            assert "rank 0" in text and "rank 1" in text and "epoch" in text
            assert "loss=" in text and "it/s" in text
            mid_run_status = page.evaluate(SHOWN_STATUS)

            # follow rank 1's log: the click reaches the kernel while the cell runs (the
            # wait costs nothing: the job runs on meanwhile, and the test waits for it)
            output = cell.locator(".jp-OutputArea")
            picked = time.monotonic()
            output.locator(".nbdist-log-picker button",
                           has_text=re.compile(r"^\s*1\s*$")).click()
            page.wait_for_function(RANK1_LOG_SHOWN, timeout=20_000, polling=100)
            pick_seconds = time.monotonic() - picked
            time.sleep(0.3)
            output.screenshot(path=str(ranks_shot))
            rank1_log = output.locator(".nbdist-log").inner_text()
            still_running = "running" in output.locator(".widget-html").first.inner_text()

            page.wait_for_function(DASHBOARD_DONE, timeout=90_000, polling=250)
            cell.screenshot(path=str(tmp_path / "final.png"))
            final = cell.locator(".jp-OutputArea").inner_text()
            streamed = "".join(output.locator(STDOUT).all_inner_texts())
            tails = [d.text_content() for d in
                     output.locator(".nbdist-dashboard details").all()]
            page.wait_for_function(TRAIN_CELL_ENDED, timeout=60_000, polling=250)
            log = page.evaluate("() => window.nbdistLog")
        finally:
            browser.close()
    # the widgets make JupyterLab ask the kernel for a subshell mid-cell: the kernel
    # must still show busy until the cell ends (a blink of a few ms is not seen)
    assert mid_run_status == "busy", log
    assert max(idle_while_running(log), default=0.0) < 250, log
    assert final.count("done") >= 2 and "100%" in final
    assert "epoch 3: loss" in final
    assert "saving 100%" in final and "saving 50%" not in final  # \r redrew the line
    assert shot.stat().st_size > 10_000
    # the per-rank view showed rank 1's own lines, mid-run, within a couple of renders
    assert still_running and pick_seconds < 10, pick_seconds
    assert "rank 1's output, live" in rank1_log and "epoch 1: loss" in rank1_log
    assert "on rank 1" in rank1_log and "on rank 0" not in rank1_log
    assert "epoch 3: loss" in streamed and "on rank 1" not in streamed  # rank 0's, as ever
    # the saved notebook keeps each rank's last lines, one collapsed block per rank
    assert len(tails) == 2 and "rank 0" in tails[0] and "rank 1" in tails[1], tails
    assert "epoch 3: loss" in tails[1] and "on rank 1" in tails[1]
    if os.environ.get("NBDIST_UPDATE_SCREENSHOT") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)
        shutil.copyfile(ranks_shot, DOCS_RANKS_SCREENSHOT)
