"""scripts/run_notebooks.py (what `make demo` runs) on a small real notebook: the kernel stops when
the notebook ends, widget outputs get text stand-ins from their final state, SUMMARY lines are collected."""
import importlib.util
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_notebooks"] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_demo_run_stops_kernels_and_keeps_widgets_readable(runner, tmp_path):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "nbtrt", "display_name": "Python 3 (nbtrt)",
                                                           "language": "python"}})
    pid_file = tmp_path / "kernel.pid"
    nb.cells = [
        nbformat.v4.new_code_cell(f"import os, ipywidgets\nfrom tqdm.auto import tqdm\n"
                                  f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))"),
        nbformat.v4.new_code_cell("ipywidgets.Dropdown(options=['none', 'fp8'], value='none', description='KV cache')"),
        nbformat.v4.new_code_cell("for _ in tqdm(range(7), desc='steps'):\n    pass"),
        nbformat.v4.new_code_cell("print('SUMMARY: tiny ok')"),
    ]
    src = tmp_path / "nb" / "tiny.ipynb"
    src.parent.mkdir()
    nbformat.write(nb, src)
    result = runner.run_one(src, tmp_path / "out", tmp_path / "kernels", timeout=120)
    assert result.ok, result.failure
    assert result.summary == ["SUMMARY: tiny ok"]
    pid = int(pid_file.read_text())
    deadline = time.time() + 15
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(pid), "the notebook's kernel still runs after the notebook ended"

    done = nbformat.read(tmp_path / "out" / "tiny.ipynb", as_version=4)
    assert done.metadata.kernelspec.name == "nbtrt"
    assert done.metadata.widgets  # the widget state is saved with the notebook
    texts = [o["data"]["text/plain"] for c in done.cells for o in c.get("outputs", []) if runner.WIDGET_VIEW in
             o.get("data", {})]
    assert "KV cache: none" in texts
    bar = next(t for t in texts if t.startswith("steps"))
    assert "100%" in bar and "7/7" in bar and "children=" not in bar  # the final count, not the repr at 0%


def test_summary_says_when_a_notebook_printed_no_summary(runner, tmp_path):
    r = runner.Result(Path("x.ipynb"), ok=True, seconds=1.0)
    runner.write_summary([r], tmp_path / "summary.md", tmp_path)
    assert "no SUMMARY: line" in (tmp_path / "summary.md").read_text()
