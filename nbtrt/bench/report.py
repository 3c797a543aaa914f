"""Benchmark results as rows, a text table and markdown; the committed results a checkout holds."""
from __future__ import annotations

import html
import json
import os
import statistics
from pathlib import Path

from ..plots import Table

BUSY_LOAD_PER_CORE = 1.0  # a 1-minute load average above the core count: the timings shared the CPU
SPREAD_LIMIT = 0.25  # repeats whose tokens/s range over more than 25% of their median disagree


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
                       tok_s_spread_pct=_spread_pct(r),
                       peak_mem_mib=r["peak_memory_bytes"] / 2 ** 20,
                       speedup_vs_hf_eager=r["tokens_per_s"] / base[r["workload"]] if r["workload"] in base else None)
        else:
            row["reason"] = r.get("reason", "")
        out.append(row)
    return out


def _spread_pct(run: dict) -> float | None:
    """(max - min) / median of the repeats' tokens/s, in percent; None with fewer than two repeats."""
    reps = run.get("tokens_per_s_repeats") or []
    if len(reps) < 2:
        return None
    return 100 * (max(reps) - min(reps)) / statistics.median(reps)


def warnings(result: dict) -> list[str]:
    """Why the timings of ``result`` may not be trusted: the machine was busy (load average above
    its core count, while measuring or when the run ended) or a runner's repeats disagree.

    >>> warnings({"machine": {"cpu_count": 2, "load_average_1_5_15": [7.5, 6, 5]}, "results": []})
    ['BUSY MACHINE: load average 7.5 on 2 cores while measuring: other processes shared the CPU, timings (and speedups) are unreliable; re-run on an idle machine']
    """
    cores = (result.get("machine") or {}).get("cpu_count") or os.cpu_count() or 1
    loads = [(result.get("machine") or {}).get("load_average_1_5_15", [0])[0]]
    loads += [r["load_average_1m"] for r in result.get("results", []) if "load_average_1m" in r]
    out = []
    if max(loads) > BUSY_LOAD_PER_CORE * cores:
        out.append(f"BUSY MACHINE: load average {max(loads):.3g} on {cores} cores while measuring: other processes "
                   "shared the CPU, timings (and speedups) are unreliable; re-run on an idle machine")
    noisy = [f"{r['runner']} {r['precision']} on {r['workload']} ({r['tok_s_spread_pct']:.0f}%)" for r in rows(result)
             if r.get("tok_s_spread_pct") is not None and r["tok_s_spread_pct"] > 100 * SPREAD_LIMIT]
    if noisy:
        out.append(f"REPEATS DISAGREE: tokens/s varied by more than {100 * SPREAD_LIMIT:.0f}% of the median across "
                   f"repeats for {', '.join(noisy)}: the machine was not quiet, treat these figures as rough")
    return out


class BenchReport(Table):
    """The notebook view of a benchmark: :func:`rows` (with the tokens/s spread of the repeats) as an
    HTML table, under a loud banner when :func:`warnings` has anything to say.

    >>> BenchReport({"machine": {}, "results": []}).warnings
    []
    """

    def __init__(self, result: dict, max_rows: int | None = None):
        machine = result.get("machine") or {}
        load = machine.get("load_average_1_5_15")
        where = f"{machine.get('processor') or ''}, {machine.get('cpu_count')} cores" + (
            f", load average {load[0]:.3g} at the end" if load else "")
        super().__init__(rows(result), max_rows=max_rows, title=f"{result.get('model', '')} ({where})")
        self.result, self.warnings = result, warnings(result)

    def _repr_html_(self) -> str:
        banner = "".join(f"<p style='background:#fdd;border:2px solid #d62728;padding:6px;font-weight:bold'>"
                         f"⚠ {html.escape(w)}</p>" for w in self.warnings)
        return banner + super()._repr_html_()

    def __str__(self) -> str:  # print(report) gives the text table, warnings first
        return table(self.result)


def table(result: dict) -> str:
    """A fixed-width text table of :func:`rows`, after the :func:`warnings` if there are any."""
    lines = [f"!! {w}" for w in warnings(result)] + [f"{'runner':24} {'prec':8} {'workload':38} {'tok/s':>9} {'req/s':>7} {'TTFT ms':>8} {'TPOT ms':>8} "
             f"{'p50 s':>7} {'p95 s':>7} {'MiB':>7} {'x HF':>6} {'spread':>7}"]
    for r in rows(result):
        if r["status"] != "ok":
            lines.append(f"{r['runner']:24} {r['precision']:8} {r['workload']:38} {r['status']}: {r['reason']}")
            continue
        f = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        lines.append(f"{r['runner']:24} {r['precision']:8} {r['workload']:38} {r['tokens_per_s']:9.1f} "
                     f"{r['requests_per_s']:7.2f} {r['ttft_p50_ms']:8.1f} {f(r['tpot_p50_ms'], '8.2f')} "
                     f"{r['latency_p50_s']:7.2f} {r['latency_p95_s']:7.2f} {r['peak_mem_mib']:7.0f} "
                     f"{f(r['speedup_vs_hf_eager'], '6.2f')} {f(r['tok_s_spread_pct'], '6.0f') + '%' if r['tok_s_spread_pct'] is not None else '      -'}")
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
