"""A JupyterLab server on loopback driven by Debian's Chromium through Playwright.

Playwright's own browser download cannot work here, so the system browser is launched
through ``executable_path``; ``expose_app_in_browser`` lets the test run JupyterLab
commands (run all cells) the way a person would from the Run menu.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = os.environ.get("NBTRT_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def jupyter_lab(root: Path, log: Path):
    """Start JupyterLab serving ``root``; yield its base URL with token."""
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
           "--LabApp.expose_app_in_browser=True", "--allow-root", "--ServerApp.disable_check_xsrf=True",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"jupyter lab exited early; see {log}")
                time.sleep(0.5)
        else:
            raise RuntimeError(f"jupyter lab did not start in 120 s; see {log}")
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def shutdown_kernels(url: str, token: str) -> None:
    """Stop every kernel the server runs, so an idle notebook's thread pools stop using the CPU."""
    import json

    headers = {"Authorization": f"token {token}"}
    with urllib.request.urlopen(urllib.request.Request(f"{url}/api/kernels", headers=headers), timeout=10) as r:
        kernels = json.load(r)
    for kernel in kernels:
        req = urllib.request.Request(f"{url}/api/kernels/{kernel['id']}", headers=headers, method="DELETE")
        urllib.request.urlopen(req, timeout=30).close()


@contextlib.contextmanager
def browser_page(viewport=(1400, 1000)):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            yield page
        finally:
            browser.close()


def open_notebook(page, url: str, token: str, relpath: str) -> None:
    page.goto(f"{url}/lab/tree/{relpath}?token={token}&reset")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell", timeout=120_000)
    page.wait_for_selector(".jp-Notebook", timeout=120_000)
    # the kernel must be idle before "run all" or the first cells can be dropped
    page.wait_for_function(
        "() => { const w = window.jupyterapp.shell.currentWidget;"
        " return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
        " && w.sessionContext.session.kernel.status === 'idle'; }", timeout=180_000)


def run_all(page) -> None:
    # the "get notified about Jupyter news?" toast covers part of the page: answer it
    no = page.get_by_role("button", name="No")
    if no.count():
        no.first.click()
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")


def wait_until_done(page, timeout_s: float, poll=None) -> None:
    """Wait until no cell is queued or running ('[*]'), calling ``poll()`` while waiting."""
    deadline = time.time() + timeout_s
    time.sleep(1.0)
    while time.time() < deadline:
        busy = page.evaluate(
            "() => { const w = window.jupyterapp.shell.currentWidget;"
            " const status = w.sessionContext.session.kernel.status;"
            " const pending = [...document.querySelectorAll('.jp-InputPrompt')].some(e => e.textContent.includes('*'));"
            " return status !== 'idle' || pending; }")
        if poll:
            poll()
        if not busy:
            return
        time.sleep(0.5)
    raise TimeoutError(f"notebook still running after {timeout_s} s")


def record_progress_bars(page) -> None:
    """Record every (label, width %) state any progress bar passes through, from now on."""
    page.evaluate("""() => {
        window.__nbtrtBars = new Set();
        const record = () => document.querySelectorAll('.widget-hprogress').forEach(p => {
            const box = p.closest('.widget-hbox');
            const width = parseFloat(p.querySelector('.progress-bar').style.width) || 0;
            window.__nbtrtBars.add(JSON.stringify([box ? box.innerText : '', width]));
        });
        new MutationObserver(record).observe(document.body,
            {subtree: true, childList: true, attributes: true, characterData: true});
    }""")


def progress_bar_states(page) -> list[tuple[str, float]]:
    return [tuple(x) for x in page.evaluate("() => [...window.__nbtrtBars].map(s => JSON.parse(s))")]


def cell_errors(page) -> list[str]:
    return page.evaluate(
        "() => [...document.querySelectorAll('.jp-RenderedText[data-mime-type=\"application/vnd.jupyter.stderr\"]')]"
        ".map(e => e.textContent).filter(t => /Error|Traceback/.test(t))")
