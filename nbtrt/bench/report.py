"""Benchmark results as rows, a text table and markdown; the committed results a checkout holds."""
from __future__ import annotations

import json
import os
from pathlib import Path


def rows(result: dict) -> list[dict]:
    """One flat row per (runner, precision, workload) with speedups over hf-eager on the same workload."""
    base = {r["workload"]: r["tokens_per_s"] for r in result["results"]
            if r["status"] == "ok" and r["runner"] == "hf-eager"}
    out = []
    for r in result["results"]:
        row = {"runner": r["runner"], "precision": r["precision"], "workload": r["workload"], "status": r["status"]}
        if r["status"] == "ok":
            row.update(tokens_per_s=r["tokens_per_s"], requests_per_s=r["requests_per_s"],
                       ttft_p50_ms=1e3 * r["ttft_s"]["p50"], tpot_p50_ms=1e3 * r["tpot_s"]["p50"] if r["tpot_s"] else None,
                       latency_p50_s=r["latency_s"]["p50"], latency_p95_s=r["latency_s"]["p95"],
                       peak_mem_mib=r["peak_memory_bytes"] / 2 ** 20,
                       speedup_vs_hf_eager=r["tokens_per_s"] / base[r["workload"]] if r["workload"] in base else None)
        else:
            row["reason"] = r.get("reason", "")
        out.append(row)
    return out


def table(result: dict) -> str:
    """A fixed-width text table of :func:`rows`."""
    lines = [f"{'runner':24} {'prec':8} {'workload':38} {'tok/s':>9} {'req/s':>7} {'TTFT ms':>8} {'TPOT ms':>8} "
             f"{'p50 s':>7} {'p95 s':>7} {'MiB':>7} {'x HF':>6}"]
    for r in rows(result):
        if r["status"] != "ok":
            lines.append(f"{r['runner']:24} {r['precision']:8} {r['workload']:38} {r['status']}: {r['reason']}")
            continue
        f = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        lines.append(f"{r['runner']:24} {r['precision']:8} {r['workload']:38} {r['tokens_per_s']:9.1f} "
                     f"{r['requests_per_s']:7.2f} {r['ttft_p50_ms']:8.1f} {f(r['tpot_p50_ms'], '8.2f')} "
                     f"{r['latency_p50_s']:7.2f} {r['latency_p95_s']:7.2f} {r['peak_mem_mib']:7.0f} "
                     f"{f(r['speedup_vs_hf_eager'], '6.2f')}")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """A markdown table of :func:`rows`, one line per runner and precision, one column per
    workload: tokens/s and the speedup over HF eager on that workload. Skipped and failed runners
    are listed underneath with their reasons. The README's performance tables are made of it."""
    table_rows = rows(result)
    workloads = list(dict.fromkeys(r["workload"] for r in table_rows))
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for r in table_rows:
        if r["status"] == "ok":
            x = r["speedup_vs_hf_eager"]
            cells.setdefault((r["runner"], r["precision"]), {})[r["workload"]] = (
                f"{r['tokens_per_s']:.1f}" + (f" ({x:.2f}×)" if x is not None else ""))
    lines = ["| runner | precision | " + " | ".join(workloads) + " |", "|---|---|" + "---|" * len(workloads)]
    lines += [f"| {name} | {prec} | " + " | ".join(c.get(w, "-") for w in workloads) + " |"
              for (name, prec), c in cells.items()]
    reasons = sorted({(r["status"], r["runner"], r["reason"]) for r in table_rows if r["status"] != "ok"})
    if reasons:
        lines += [""] + [f"{status.capitalize()}: `{name}`: {reason}" for status, name, reason in reasons]
    return "\n".join(lines)



# ------------------------------------------------------------------------------ committed results and figures
def results_dir(directory: str | Path | None = None) -> Path | None:
    """Where committed benchmark results are read from: ``directory`` if given, else the
    ``NBTRT_RESULTS`` environment variable, else ``benchmarks/results`` of the source checkout nbtrt
    is imported from; None when none of these exists (nbtrt installed as a package, nothing set).

    >>> results_dir("benchmarks/results")  # doctest: +SKIP
    PosixPath('benchmarks/results')
    """
    if directory is not None:
        return Path(directory)
    if os.environ.get("NBTRT_RESULTS"):
        return Path(os.environ["NBTRT_RESULTS"])
    checkout = Path(__file__).resolve().parents[2]  # nbtrt/bench/report.py -> the repository
    found = checkout / "benchmarks" / "results"
    return found if (checkout / "pyproject.toml").is_file() and found.is_dir() else None


def latest(prefix: str = "gpu_nvidia", directory: str | Path | None = None) -> tuple[Path, dict] | None:
    """The newest committed result whose file name starts with ``prefix`` (names end in the date),
    in :func:`results_dir` (``directory``); None when there is none.
    The default: the last full ``benchmarks/gpu.py`` run (``gpu_<device>_<date>.json``; other
    ``gpu_*`` files hold focused experiments).

    >>> path, gpu = latest("gpu_nvidia")  # doctest: +SKIP
    """
    directory = results_dir(directory)
    if directory is None:
        return None
    found = sorted(p for p in Path(directory).glob(f"{prefix}*.json") if not p.stem.endswith("_quick"))
    return (found[-1], json.loads(found[-1].read_text())) if found else None


def gpu_runs(gpu: dict) -> list[dict]:
    """The measurements of a benchmarks/gpu.py result in the shape of :func:`run_all`'s, each with its model."""
    runs = [{**r, "model": model} for model, res in gpu.get("small", {}).items()
            for r in res.values() if isinstance(r, dict) and "runner" in r]
    for key in ("sweep", "mix"):
        section = gpu.get(key) or {}
        runs += [{**r, "model": section.get("model", "")} for r in section.get("results", [])]
    return runs


def llama8b_rows(gpu: dict) -> list[dict]:
    """The 8B decode table of a benchmarks/gpu.py result: step time against the bandwidth floor per precision."""
    rows = []
    for prec, v in gpu.get("llama8b", {}).get("variants", {}).items():
        if "tokens_per_s" in v:
            rows.append({"precision": prec, "weights_GB": v["weight_bytes"] / 1e9, "step_ms": 1e3 * v["decode_step_s"],
                         "floor_ms": 1e3 * v["bandwidth_floor_s"], "step_over_floor": v["step_over_floor"],
                         "achieved_TB_s": v["achieved_tb_s"], "tokens_per_s": v["tokens_per_s"],
                         "speedup_vs_bf16": v["speedup_vs_bf16"], "ttft_ms": 1e3 * v["ttft_s"]})
        else:
            rows.append({"precision": prec, "skipped": v.get("skipped") or v.get("error")})
    return rows
