#!/usr/bin/env python
"""Execute every notebook in notebooks/ (sorted), headless, the way `make demo` does.

Each notebook runs with nbclient in a kernel that is *this* interpreter (so the venv's
nbtrt, torch, ... are the ones used), with its own folder as the working directory.
Executed copies go to build/notebooks/, and build/summary.md lists each notebook's
status and runtime plus every output line that starts with "SUMMARY:".
Exits non-zero if any notebook fails, naming the failing cell.

    .venv/bin/python scripts/run_notebooks.py                 # all of notebooks/*.ipynb
    .venv/bin/python scripts/run_notebooks.py notebooks/01_convert.ipynb
"""

from __future__ import annotations

import argparse
import json
import os
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
        client.execute()
        result.ok = True
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as exc:
        result.failure = failing_cell(nb) or f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
        if isinstance(exc, CellTimeoutError):
            result.failure = f"a cell ran past {timeout} s ({result.failure})"
    except Exception as exc:  # kernel could not start, notebook unreadable, ...
        result.failure = f"{type(exc).__name__}: {exc}"
    finally:
        result.seconds = time.perf_counter() - t0
        out_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out_dir / path.name)
    result.summary = summary_lines(nb)
    return result


def write_summary(results: list[Result], out: Path, nb_dir: Path) -> None:
    lines = ["# nbtrt notebook run", "",
             f"Python {sys.version.split()[0]} ({sys.executable}), {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", ""]
    if not results:
        lines.append(f"No notebooks in {nb_dir}.")
    else:
        lines += ["| notebook | status | runtime (s) |", "|---|---|---|"]
        lines += [f"| {r.path.name} | {'ok' if r.ok else 'FAILED'} | {r.seconds:.1f} |" for r in results]
        for r in results:
            if r.failure or r.summary:
                lines += ["", f"## {r.path.name}", ""]
            if r.failure:
                lines.append(f"FAILED at {r.failure}")
            lines += [f"- {s}" for s in r.summary]
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
            for s in r.summary:
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
