"""Plotly figures of comparison reports. Every trace carries the computed values themselves
(``customdata`` holds exact errors where the drawn value is transformed for a log scale)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..plots import LOG_FLOOR, error_lines
from .capture import KIND_LABELS

if TYPE_CHECKING:
    from .compare import Report

METRIC_LABELS = {"rel_l2": "relative L2 error ‖cand−ref‖/‖ref‖", "max_abs": "max |cand−ref|",
                 "mean_abs": "mean |cand−ref|", "one_minus_cosine": "1 − cosine similarity"}


def _reports(reports) -> dict[str, "Report"]:
    if isinstance(reports, dict):
        return dict(reports)
    if not isinstance(reports, (list, tuple)):
        reports = [reports]
    return {r.label: r for r in reports}


def error_vs_layer(reports, kind: str | None = None, metric: str | None = None, threshold: float | None = None,
                   title: str | None = None):
    """One line per comparison. ``kind=None``: every captured tensor in execution order;
    ``kind="block"`` (or "attn", ...): that tensor kind against the layer index.
    Each report's threshold (its precision's tolerance unless ``threshold`` is given) is drawn,
    and its first divergence is marked with an x.

    >>> error_vs_layer({"fp32": r32, "bf16": r16}, kind="block")  # doctest: +SKIP
    """
    reports = _reports(reports)
    first = next(iter(reports.values()))
    metric = metric or first.metric
    series, marks, lines = {}, {}, {}
    for label, r in reports.items():
        tensors = [t for t in r.tensors if kind is None or t.kind == kind]
        xs = [t.name if kind is None else (t.layer if t.layer is not None else t.name) for t in tensors]
        series[label] = (xs, [t.error(metric) for t in tensors])
        # a report's own threshold is for its own metric; another metric needs an explicit one
        limit = threshold if threshold is not None else (r.threshold if metric == r.metric else None)
        if limit is None:
            continue
        lines[f"threshold ({r.precision})" if r.precision else f"threshold ({label})"] = limit
        d = r.divergence(limit, metric)
        if d is not None and (kind is None or d.kind == kind):
            marks[label] = (d.name if kind is None else d.layer, d.value, d.name)
    if len(set(lines.values())) == 1:
        lines = {"threshold": next(iter(lines.values()))}
    what = "every captured tensor" if kind is None else KIND_LABELS[kind]
    fig = error_lines(series, threshold=lines, marks=marks, y_title=METRIC_LABELS.get(metric, metric),
                      x_title="tensor, in execution order (ticks: block outputs)" if kind is None else "layer",
                      title=title or f"Error vs layer: {what}")
    if kind is None:  # a hundred tensor names do not fit under an axis: label the block outputs only
        names = list(dict.fromkeys(x for xs, _ in series.values() for x in xs))
        blocks = [n for n in names if n.startswith("layers.") and n.count(".") == 1]
        step = max(1, len(blocks) // 15)
        shown = set(blocks[: max(len(blocks) - step, 1): step]) | {"embed", "lm_head"}
        ticks = [n for n in names if n in shown]
        fig.update_xaxes(tickmode="array", tickvals=ticks, tickangle=0,
                         ticktext=["logits" if n == "lm_head" else n.removeprefix("layers.") for n in ticks])
    return fig


def heatmap(report: "Report", kind: str = "block", metric: str = "rel_l2", batch: int = 0):
    """Layer x token heatmap of a per-token metric for one tensor kind (colour: log10 of the
    error; ``customdata`` holds the errors themselves)."""
    import plotly.graph_objects as go

    tensors = report.of_kind(kind)
    if not tensors:
        raise ValueError(f"no {kind!r} tensors in this report; captured kinds: "
                         f"{sorted({t.kind for t in report.tensors})}")
    values = np.stack([t.tokens[metric][batch] for t in tensors])  # [layers, tokens]
    shown = np.log10(np.clip(np.nan_to_num(values, nan=np.inf, posinf=1e30), LOG_FLOOR, None))
    ys = [t.layer if t.layer is not None else t.name for t in tensors]
    tokens = report.token_text if batch == 0 else [str(i) for i in report.input_ids[batch]]
    labels = [[repr(tok) for tok in tokens] for _ in tensors]
    fig = go.Figure(go.Heatmap(
        z=shown, x=report.positions, y=ys, customdata=values, text=labels, colorscale="Viridis",
        colorbar={"title": f"log10 {metric}"},
        hovertemplate="layer %{y}, token %{x} %{text}<br>" + metric + " %{customdata:.3e}<extra></extra>"))
    fig.update_layout(title=f"{KIND_LABELS[kind]}: {metric} per layer and token ({report.label})",
                      xaxis_title="token position", yaxis_title="layer", template="plotly_white", height=420)
    return fig


def histogram(report: "Report", name: str):
    """Histogram of ``candidate - reference`` over every element of one tensor."""
    import plotly.graph_objects as go

    t = report[name]
    edges, counts = t.hist
    centers = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure(go.Bar(x=centers, y=counts, width=float(edges[1] - edges[0]), name=name,
                           hovertemplate="diff %{x:.3e}<br>count %{y}<extra></extra>"))
    fig.update_layout(title=f"{name}: candidate − reference ({report.label}); max |diff| {t.metrics['max_abs']:.3g}",
                      xaxis_title="difference", yaxis_title="elements", template="plotly_white", height=360,
                      bargap=0)
    return fig


def topk_table(report: "Report", position: int = -1, batch: int = 0):
    """Top-k next tokens at one position: reference and candidate probabilities side by side."""
    import plotly.graph_objects as go

    T = len(report.input_ids[batch])
    if not -T <= position < T:
        raise ValueError(f"position {position} is outside the {T}-token input")
    pos = position % T
    if pos not in report.positions:
        raise ValueError(f"position {pos} was not captured (captured: {report.positions[:8]} ...)")
    rows = report.topk[batch][report.positions.index(pos)]
    cols = {
        "token": [r["token"] for r in rows],
        "id": [r["token_id"] for r in rows],
        f"{report.reference} prob": [r["ref_prob"] for r in rows],
        f"{report.label} prob": [r["cand_prob"] for r in rows],
        f"{report.reference} rank": [r["ref_rank"] or "-" for r in rows],
        f"{report.label} rank": [r["cand_rank"] or "-" for r in rows],
    }
    fmt = [None, None, ".4f", ".4f", None, None]
    fig = go.Figure(go.Table(header={"values": list(cols), "align": "left"},
                             cells={"values": list(cols.values()), "format": fmt, "align": "left"}))
    after = repr(report.token_text[report.positions.index(pos)]) if batch == 0 else str(pos)
    fig.update_layout(title=f"Next token after position {pos} ({after}): top-{report.logits['k']} of each",
                      height=80 + 30 * (len(rows) + 1), margin={"t": 50, "b": 10})
    return fig



def bisect_figure(bisection) -> "object":
    """The probes of a :func:`bisect` run, in the order they ran: each probe's worst error (log
    axis) against the threshold, red where it is over, labelled with the tensors it captured."""
    import plotly.graph_objects as go

    rows = bisection.table()
    x = [r["probe"] for r in rows]
    y = [r[bisection.metric] for r in rows]
    over = [r["over threshold"] for r in rows]
    labels = [r["worst tensor"] for r in rows]
    fig = go.Figure(go.Scatter(
        x=x, y=[_floored(v) for v in y], customdata=y, mode="lines+markers+text", text=labels,
        textposition=["top center" if i % 2 == 0 else "bottom center" for i in range(len(x))],
        marker={"size": 12, "color": ["#d62728" if o else "#2ca02c" for o in over]}, line={"color": "lightgray"},
        name="probe", hovertemplate="probe %{x}: %{text}<br>%{customdata:.3e}<extra></extra>"))
    if x and np.isfinite(bisection.threshold):
        fig.add_trace(go.Scatter(x=[x[0], x[-1]], y=[bisection.threshold] * 2, mode="lines", name="threshold",
                                 line={"dash": "dash", "color": "gray"}))
    found = bisection.first_divergence
    fig.update_layout(title=f"Bisection: {len(x)} probes; first divergence: {found.name if found else 'none'}",
                      xaxis_title="probe (in the order it ran)", yaxis_title=METRIC_LABELS.get(bisection.metric,
                                                                                              bisection.metric),
                      template="plotly_white", height=400, legend={"orientation": "h", "y": -0.25})
    fig.update_xaxes(tickmode="linear", dtick=1)
    fig.update_yaxes(type="log", exponentformat="power")
    return fig


def _floored(v: float) -> float | None:
    return None if not np.isfinite(v) else max(float(v), LOG_FLOOR)
