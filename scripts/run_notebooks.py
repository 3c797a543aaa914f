#!/usr/bin/env python
"""Execute every notebook in notebooks/ (sorted), headless, the way `make demo` does.

Each notebook runs with nbclient in a kernel that is *this* interpreter (so the venv's
nbtrt, torch, ... are the ones used), with its own folder as the working directory.
Executed copies go to build/notebooks/, and build/summary.md lists each notebook's
status and runtime plus every output line that starts with "SUMMARY:" (and says so when a
notebook printed none). Each notebook's kernel is shut down when the notebook ends, so idle
kernels do not hold memory while the next one runs. The executed copies keep the widgets'
final state, and each widget output's plain-text form is replaced by a text stand-in drawn from
that state (a progress bar's final count, a dropdown's choice, an output area's text) instead of
the ``VBox(children=...`` repr captured when the widget was first shown.
Exits non-zero if any notebook fails, naming the failing cell.

    .venv/bin/python scripts/run_notebooks.py                 # all of notebooks/*.ipynb
    .venv/bin/python scripts/run_notebooks.py notebooks/01_convert.ipynb
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_NAME = "nbtrt-current"


@dataclass
class Result:
    path: Path
    ok: bool = False
    seconds: float = 0.0
    failure: str = ""
    summary: list[str] = field(default_factory=list)


def kernel_manager(kernel_dir: Path):
    """A kernel manager whose only kernel is this interpreter, whatever other kernelspecs exist."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = kernel_dir / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python {sys.version_info.major}.{sys.version_info.minor} (nbtrt run)",
        "language": "python",
    }))
    ksm = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)


def output_text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    if output.get("output_type") in ("execute_result", "display_data"):
        return output.get("data", {}).get("text/plain", "")
    return ""


def summary_lines(nb) -> list[str]:
    lines = []
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            text = output_text(output)
            text = "".join(text) if isinstance(text, list) else text
            lines += [ln.strip() for ln in text.splitlines() if ln.startswith("SUMMARY:")]
    return lines


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def widget_text(model_id: str, states: dict, depth: int = 0) -> str:
    """A plain-text stand-in for a widget from its saved state (children one per line, or side
    by side in an HBox, as the browser lays them out)."""
    state = states.get(model_id, {}).get("state", {})
    if depth > 20 or not state:
        return ""
    name = state.get("_model_name", "")
    if state.get("children") is not None:
        parts = [widget_text(c.removeprefix("IPY_MODEL_"), states, depth + 1) for c in state["children"]]
        return ("  " if name == "HBoxModel" else "\n").join(p for p in parts if p)
    if name == "OutputModel":
        return "\n".join(_plain(o) for o in state.get("outputs", [])).strip()
    description = state.get("description") or ""
    label = f"{description}: " if description else ""
    if "Progress" in name:
        value, top = float(state.get("value") or 0), float(state.get("max") or 0)
        filled = int(20 * value / top) if top else 0
        return f"{label}[{'#' * filled}{'.' * (20 - filled)}] {value:g}/{top:g}"
    if "index" in state and state.get("_options_labels") is not None:  # Dropdown, ToggleButtons, Select
        index, labels = state["index"], state["_options_labels"]
        chosen = [labels[i] for i in index] if isinstance(index, list) else ([labels[index]] if index is not None else [])
        return f"{label}{', '.join(map(str, chosen))}"
    if name in ("HTMLModel", "HTMLMathModel", "LabelModel"):
        return re.sub(r"<[^>]+>", "", html.unescape(str(state.get("value", "")))).strip()
    if name == "ButtonModel":
        return f"[{description}]"
    if "value" in state:
        return f"{label}{state['value']}"
    return ""


def _plain(output) -> str:
    text = output_text(output)
    return "".join(text) if isinstance(text, list) else text


def add_widget_stand_ins(nb) -> int:
    """Give every widget output a text/plain stand-in drawn from the widget's final saved state."""
    states = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    replaced = 0
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            view = output.get("data", {}).get(WIDGET_VIEW)
            if view:
                text = widget_text(view.get("model_id", ""), states)
                output["data"]["text/plain"] = text or "(an interactive widget: open the notebook in JupyterLab)"
                replaced += 1
    return replaced


def failing_cell(nb) -> str:
    for i, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if output.get("output_type") == "error":
                first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")
                return (f"cell {i + 1}/{len(nb.cells)} (`{first[:80]}`): {output.get('ename')}: "
                        f"{str(output.get('evalue', '')).splitlines()[0] if output.get('evalue') else ''}")
    return ""


def run_one(path: Path, out_dir: Path, kernel_dir: Path, timeout: int) -> Result:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    result = Result(path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, km=kernel_manager(kernel_dir), timeout=timeout,
                            resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    try:
        # the kernel manager is ours, not the client's: without cleanup_kc the kernel outlives the notebook
        client.execute(cleanup_kc=True)
        result.ok = True
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as exc:
        result.failure = failing_cell(nb) or f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
        if isinstance(exc, CellTimeoutError):
            result.failure = f"a cell ran past {timeout} s ({result.failure})"
    except Exception as exc:  # kernel could not start, notebook unreadable, ...
        result.failure = f"{type(exc).__name__}: {exc}"
    finally:
        result.seconds = time.perf_counter() - t0
        _shut_down(client)
        client.set_widgets_metadata()  # also when a cell failed: the widgets made so far
        add_widget_stand_ins(nb)
        out_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out_dir / path.name)
    result.summary = summary_lines(nb)
    return result


def _shut_down(client) -> None:
    """Stop the notebook's kernel if execution left it running (an error, a timeout)."""
    km = client.km
    if km is not None and km.has_kernel:
        try:
            km.shutdown_kernel(now=False)
        except Exception:  # already dead, or will not stop gracefully
            km.shutdown_kernel(now=True)


def write_summary(results: list[Result], out: Path, nb_dir: Path) -> None:
    lines = ["# nbtrt notebook run", "",
             f"Python {sys.version.split()[0]} ({sys.executable}), {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", ""]
    if not results:
        lines.append(f"No notebooks in {nb_dir}.")
    else:
        lines += ["| notebook | status | runtime (s) |", "|---|---|---|"]
        lines += [f"| {r.path.name} | {'ok' if r.ok else 'FAILED'} | {r.seconds:.1f} |" for r in results]
        for r in results:
            lines += ["", f"## {r.path.name}", ""]
            if r.failure:
                lines.append(f"FAILED at {r.failure}")
            lines += [f"- {s}" for s in r.summary] or ["- (no SUMMARY: line: the notebook should print one)"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: notebooks/*.ipynb)")
    ap.add_argument("--out", type=Path, default=ROOT / "build", help="where executed copies and summary.md go")
    ap.add_argument("--timeout", type=int, default=int(os.environ.get("NBTRT_CELL_TIMEOUT", "1800")),
                    help="seconds one cell may run (default 1800, or $NBTRT_CELL_TIMEOUT)")
    args = ap.parse_args(argv)

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")  # the kernels inherit this: no model hub, ever
    nb_dir = ROOT / "notebooks"
    paths = [p.resolve() for p in args.notebooks] or sorted(nb_dir.glob("*.ipynb"))
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="nbtrt-kernels-") as kdir:
        for path in paths:
            print(f"[notebooks] {path.name} ...", flush=True)
            r = run_one(path, args.out / "notebooks", Path(kdir), args.timeout)
            print(f"[notebooks] {path.name}: {'ok' if r.ok else 'FAILED at ' + r.failure} ({r.seconds:.1f} s)",
                  flush=True)
            for s in r.summary or ["(no SUMMARY: line: the notebook should print one)"]:
                print(f"    {s}", flush=True)
            results.append(r)
    write_summary(results, args.out / "summary.md", nb_dir)
    failed = [r for r in results if not r.ok]
    print(f"[notebooks] {len(results) - len(failed)} passed, {len(failed)} failed; "
          f"summary: {args.out / 'summary.md'}", flush=True)
    for r in failed:
        print(f"[notebooks] FAILED {r.path.name}: {r.failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
