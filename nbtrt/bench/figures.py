"""Plotly figures of benchmark results (the notebooks' plots)."""
from __future__ import annotations

from ..plots import COLORS, SYMBOLS


def _label(r: dict) -> str:
    return f"{r['runner']} {r['precision']}"


def _bars(groups: dict[str, dict[str, float]], title: str, y_title: str, log_y: bool = False):
    """Grouped bars: {series: {category: value}}."""
    import plotly.graph_objects as go

    fig = go.Figure([go.Bar(name=name, x=list(vals), y=list(vals.values()), text=[f"{v:.3g}" for v in vals.values()],
                            textposition="outside") for name, vals in groups.items()])
    fig.update_layout(barmode="group", title=title, yaxis_title=y_title, template="plotly_white", height=420)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def fig_tokens_vs_batch(runs: list[dict], title: str = "Generation throughput vs batch size"):
    """Tokens/s (context phase included) against batch size, one line per runner and precision."""
    import plotly.graph_objects as go

    lines: dict[str, list[tuple[int, float]]] = {}
    for r in runs:
        if r["status"] == "ok" and r["workload"].startswith("fixed"):
            lines.setdefault(_label(r), []).append((r["batch_size"], r["tokens_per_s"]))
    fig = go.Figure([go.Scatter(x=[b for b, _ in sorted(v)], y=[t for _, t in sorted(v)], name=k, mode="lines+markers")
                     for k, v in lines.items()])
    batches = sorted({b for v in lines.values() for b, _ in v})
    fig.update_layout(title=title, xaxis_title="batch size", yaxis_title="tokens/s", template="plotly_white",
                      height=420, xaxis_type="log", yaxis_type="log")
    fig.update_xaxes(tickmode="array", tickvals=batches, ticktext=[str(b) for b in batches])  # no 1.5, 2.5 ticks
    return fig


def fig_latency(runs: list[dict], workload: str):
    """TTFT and end-to-end latency P50 / P95 per runner on one workload."""
    ok = [r for r in runs if r["status"] == "ok" and r["workload"] == workload]
    groups = {f"{m} {p.upper()}": {_label(r): r[key][p] for r in ok}
              for key, m in (("ttft_s", "TTFT"), ("latency_s", "latency")) for p in ("p50", "p95")}
    return _bars(groups, f"Latency percentiles: {workload}", "seconds", log_y=True)


def fig_speedup(runs: list[dict], baseline: str = "hf-eager"):
    """Tokens/s over the baseline runner's on the same model and workload."""
    base = {(r.get("model"), r["workload"]): r["tokens_per_s"] for r in runs
            if r["status"] == "ok" and r["runner"] == baseline}
    groups: dict[str, dict[str, float]] = {}
    for r in runs:
        key = (r.get("model"), r["workload"])
        if r["status"] == "ok" and r["runner"] != baseline and key in base:
            groups.setdefault(_label(r), {})[" ".join(str(k) for k in key if k)] = r["tokens_per_s"] / base[key]
    return _bars(groups, f"Speedup over {baseline} (tokens/s, context phase included)", f"x {baseline}")


def fig_memory(runs: list[dict]):
    """Peak memory per runner and workload (GPU allocator peak, or CPU resident set)."""
    groups: dict[str, dict[str, float]] = {}
    for r in runs:
        if r["status"] == "ok":
            groups.setdefault(_label(r), {})[r["workload"]] = r["peak_memory_bytes"] / 2 ** 30
    kind = next((r["memory_kind"] for r in runs if r["status"] == "ok"), "")
    return _bars(groups, f"Peak memory ({kind})", "GiB")


def quality_speed(runs: list[dict], quant_rows: list[dict], workload: str | None = None) -> list[dict]:
    """Join speed per precision (tokens/s of nbtrt runners) with the quantization report's
    perplexity per format (rows named as the precision; fp32 is the report's float32)."""
    ppl = {r["name"]: r["perplexity"] for r in quant_rows if r.get("name")}
    # report names of the same arithmetic (the engine's on-the-fly W8A8 is SmoothQuant's layout unsmoothed)
    alias = {"fp32": "float32", "w8a8": "int8_sq"}
    out = []
    for r in runs:
        if r["status"] != "ok" or not r["runner"].startswith("nbtrt") or (workload and r["workload"] != workload):
            continue
        p = ppl.get(alias.get(r["precision"], r["precision"]))
        if p is not None:
            out.append({"runner": r["runner"], "precision": r["precision"], "workload": r["workload"],
                        "tokens_per_s": r["tokens_per_s"], "perplexity": p})
    return out


def fig_quality_speed(points: list[dict]):
    """Perplexity against tokens/s per precision: the deployment trade-off in one picture."""
    import plotly.graph_objects as go

    # colour = runner, symbol = precision, both in the legend: text labels on the points overlap
    # where two precisions have about the same speed and perplexity
    fig = go.Figure()
    runners = list(dict.fromkeys(p["runner"] for p in points))
    precisions = list(dict.fromkeys(p["precision"] for p in points))
    for p in points:
        i, j = runners.index(p["runner"]), precisions.index(p["precision"])
        fig.add_trace(go.Scatter(x=[p["tokens_per_s"]], y=[p["perplexity"]], name=f"{p['runner']} {p['precision']}",
                                 mode="markers", marker={"size": 12, "color": COLORS[i % len(COLORS)],
                                                         "symbol": SYMBOLS[j % len(SYMBOLS)]},
                                 hovertemplate="%{x:.1f} tokens/s<br>perplexity %{y:.3f}<extra>%{fullData.name}</extra>"))
    fig.update_layout(title="Perplexity vs speed per precision", xaxis_title="tokens/s",
                      yaxis_title="perplexity (lower is better)", template="plotly_white", height=420)
    return fig
