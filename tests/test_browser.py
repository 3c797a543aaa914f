"""The notebooks in a real browser: JupyterLab on loopback, Debian's Chromium through Playwright.

What a person would see: the chat answer growing while it streams and Stop ending it, the
layer-diff figure drawn with its traces, the SmoothQuant figure on a log axis, the build progress
bar advancing to completion, and 04 chatting with the engine 03 built. Screenshots land in
build/screenshots/ (not committed) for a person to look at: 01's layer diff, 02's SmoothQuant
figure, 04's chat after two turns.
"""
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from browser.lab import (browser_page, cell_errors, jupyter_lab, open_notebook, progress_bar_states,
                         record_progress_bars, run_all, shutdown_kernels, wait_until_done)

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "build" / "screenshots"
NOTEBOOK_TIMEOUT_S = 1200


@pytest.fixture(scope="module")
def notebook_root(tmp_path_factory):
    # a copy: JupyterLab autosaves, and the committed notebooks stay without outputs
    root = tmp_path_factory.mktemp("notebooks")
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        shutil.copy(notebook, root / notebook.name)
    return root


@pytest.fixture(scope="module")
def lab(notebook_root):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with jupyter_lab(notebook_root, SHOTS / "jupyterlab.log") as server:
        yield server


@pytest.fixture
def page(lab):
    with browser_page() as page:
        yield page
    shutdown_kernels(*lab)


def run_notebook(page, lab, name):
    url, token = lab
    open_notebook(page, url, token, name)
    record_progress_bars(page)
    run_all(page)
    wait_until_done(page, NOTEBOOK_TIMEOUT_S)
    page.screenshot(path=str(SHOTS / f"{Path(name).stem}-done.png"), full_page=False)
    assert cell_errors(page) == [], f"{name} raised in the browser"


def test_convert_draws_the_layer_diff(page, lab):
    run_notebook(page, lab, "01_convert.ipynb")
    figures = page.evaluate(
        "() => [...document.querySelectorAll('.js-plotly-plot')].map(g => ({"
        " title: (g.layout && g.layout.title && g.layout.title.text) || '',"
        " traces: (g.data || []).length,"
        " points: (g.data || []).reduce((n, t) => n + (t.y ? t.y.length : 0), 0),"
        " drawn: g.querySelectorAll('.scatterlayer .trace, .heatmaplayer .hm, .barlayer .trace').length}))")
    layer_diffs = [f for f in figures if re.search(r"layer", f["title"], re.I)]
    assert layer_diffs, f"no layer-diff figure among {figures}"
    assert any(f["traces"] > 0 and f["points"] > 0 and f["drawn"] > 0 for f in layer_diffs), layer_diffs
    layer_diff = page.locator(".js-plotly-plot").filter(has_text="Error vs layer").first
    layer_diff.scroll_into_view_if_needed()
    layer_diff.screenshot(path=str(SHOTS / "01_convert-layer-diff.png"))


def test_quantize_draws_smoothquant_on_a_log_axis(page, lab):
    run_notebook(page, lab, "02_quantize.ipynb")
    figure = page.locator(".js-plotly-plot").filter(has_text="Input channels of").first
    figure.scroll_into_view_if_needed()
    drawn = figure.evaluate("g => ({yaxis: g.layout.yaxis.type, traces: g.data.length,"
                            " points: g.data.map(t => (t.y || []).length),"
                            " lines: g.querySelectorAll('.scatterlayer .trace path.js-line').length})")
    assert drawn["yaxis"] == "log" and drawn["traces"] == 2, drawn  # before and after smoothing
    assert min(drawn["points"]) > 0 and drawn["lines"] == 2, drawn
    figure.screenshot(path=str(SHOTS / "02_quantize-smoothquant.png"))


def test_build_progress_bar_advances_and_completes(page, lab):
    run_notebook(page, lab, "03_build.ipynb")
    seen = progress_bar_states(page)  # every state the bars passed through (a MutationObserver)
    build = [(label, width) for label, width in seen if re.search(r"build|export", label, re.I)]
    assert build, f"no build progress bar seen; bars: {sorted(set(seen))[:10]}"
    assert any(0 < width < 100 for _, width in build), f"build bar never seen mid-way: {sorted(set(build))}"
    assert any(width == 100 for _, width in build), f"build bar never completed: {sorted(set(build))}"


def test_chat_widget_streams_and_stops(page, lab, notebook_root):
    engine_json = notebook_root / "work" / "build" / "engine" / "engine.json"
    if not engine_json.is_file():  # run alone: 03 builds the engine 04 must use
        run_notebook(page, lab, "03_build.ipynb")
    built = engine_json.read_bytes()
    run_notebook(page, lab, "04_chat.ipynb")
    # 04 chats with 03's engine, says which, and did not build another
    # textContent, not innerText: JupyterLab skips rendering cells out of view (content-visibility)
    outputs = page.locator(".jp-OutputArea-output").all_text_contents()
    assert any("Chatting with work/build/engine" in t for t in outputs), outputs[:5]
    assert not any("No engine at" in t for t in outputs)
    assert engine_json.read_bytes() == built
    # the chat cell's DOM hooks are CSS classes set by nbtrt/widgets/chat.py (tests/browser_chat.md)
    chat = page.locator(".nbtrt-chat").last
    chat.scroll_into_view_if_needed()
    engine = chat.locator(".nbtrt-chat-engine")
    history = engine.locator(".nbtrt-chat-history")
    finished = engine.locator(".nbtrt-chat-turn:not(.nbtrt-chat-live)")  # newest first in the DOM
    live = engine.locator(".nbtrt-chat-live")
    box = chat.locator(".nbtrt-chat-input textarea")
    send = chat.get_by_role("button", name="Send")
    stop = chat.get_by_role("button", name="Stop")
    send_enabled = "el => !el.disabled"

    def answered(action, timeout_ms):
        """Do ``action`` and wait for the new turn to finish (Send may not be disabled yet right after the click)."""
        before = finished.count()
        action()
        page.wait_for_function(
            "([hist, send, n]) => hist.querySelectorAll('.nbtrt-chat-turn:not(.nbtrt-chat-live)').length > n"
            " && !send.disabled", arg=[history.element_handle(), send.element_handle(), before], timeout=timeout_ms)

    # Enter adds a line to the multi-line input; it does not send
    turns_before = finished.count()
    box.fill("first line")
    box.press("Enter")
    assert box.input_value().count("\n") == 1 and finished.count() == turns_before

    # Stop: the answer grows while it streams, Stop ends it, the turn shows its stats and the marker
    box.fill("Write a long, detailed story about a lighthouse keeper and a storm.")
    send.click()
    lengths = []
    deadline = time.time() + 120
    while time.time() < deadline and len(set(lengths)) < 3:
        lengths.append(len(live.inner_text()) if live.is_visible() else 0)
        time.sleep(0.05)
    assert len(set(lengths)) >= 3 and lengths[-1] > 0, f"answer did not stream: {lengths[:20]}"
    page.screenshot(path=str(SHOTS / "04_chat-streaming.png"))
    stop.click()
    page.wait_for_function(send_enabled, arg=send.element_handle(), timeout=30_000)
    stopped = finished.first
    assert stopped.locator(".nbtrt-chat-marker").inner_text().strip() == "[stopped]"
    assert re.search(r"\d+ tokens? · TTFT \d+ ms", stopped.locator(".nbtrt-chat-stats").inner_text())
    input_y = box.bounding_box()["y"]
    pane_height = history.evaluate("el => el.clientHeight")

    # the engine is ready for the next message at once; user text is shown exactly as typed
    typed = "Say hello. <b>bold</b> **x**"
    box.fill(typed)
    answered(lambda: send.click(), 120_000)
    hello = finished.first
    assert typed in hello.locator(".nbtrt-chat-user").inner_text()
    assert hello.locator(".nbtrt-chat-user b, .nbtrt-chat-user strong").count() == 0
    assert hello.locator(".nbtrt-chat-error").count() == 0
    assert re.search(r"\d+ tokens? · TTFT \d+ ms", hello.locator(".nbtrt-chat-stats").inner_text())
    assert "[stopped]" not in hello.inner_text()

    # the history scrolls inside a pane of fixed height; the input stays where it was
    pane = history.evaluate("el => ({scroll: el.scrollHeight, client: el.clientHeight})")
    assert pane["scroll"] > pane["client"] and abs(pane["client"] - pane_height) <= 2, pane
    assert abs(box.bounding_box()["y"] - input_y) <= 2
    chat.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "04_chat-two-turns.png"))

    # compare mode: the first-difference line, and the note that both sides share the CPU
    chat.get_by_label("compare with the HF reference").check()
    box.fill("Name three primary colors.")
    answered(lambda: send.click(), 180_000)
    assert chat.locator(".nbtrt-chat-reference").is_visible()
    line = chat.locator(".nbtrt-chat-compare").inner_text()
    assert re.search(r"compare: (identical|first difference at token \d+: engine .* vs HF .*)", line), line
    assert "CPU" in chat.locator(".nbtrt-chat-compare-note").inner_text()

    # export writes the transcript as JSON and Markdown
    target = notebook_root / "chat"
    chat.locator(".nbtrt-chat-export-path input").fill(str(target))
    chat.get_by_role("button", name="Export").click()
    status = chat.locator(".nbtrt-chat-export-status")
    status.filter(has_text="wrote").wait_for(timeout=30_000)
    assert "chat.json" in status.inner_text() and "chat.md" in status.inner_text()
    data = json.loads(target.with_suffix(".json").read_text())
    assert [t["user"] for t in data["turns"]][-2:] == [typed, "Name three primary colors."]
    assert data["turns"][-1]["assistant"]["finish"] in ("stop", "length", "stopped")
    assert target.with_suffix(".md").read_text().strip()
