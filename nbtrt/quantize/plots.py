"""Plotly figures for quantization: outlier channels before/after SmoothQuant, weight and error
histograms. (Perplexity vs size and error vs layer are :class:`QuantReport` methods.)

Histograms are computed here and drawn as bars, so a notebook stores 100 numbers per trace,
not a million weights.

>>> plots.activation_channels(cal, "layers.3.mlp.gate", s)                    # doctest: +SKIP
>>> plots.weight_histogram("work/ckpt", "work/ckpt-int4", "layers.3.mlp.down")  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import load_checkpoint
from ..config import QuantConfig
from ..plots import COLORS
from .calib import Calibration
from ..layouts import QuantizationError, dequantize_weight

BINS = 100


def activation_channels(cal: Calibration, name: str, smoothing: torch.Tensor | None = None):
    """Max |x| per input channel of linear ``name`` over the calibration tokens; with ``smoothing``
    (SmoothQuant's s for that linear) also after smoothing, ``max |x| / s``: the outliers flattened.

    Drawn as a sorted magnitude profile on a log axis (largest channel first, hover names the
    channel): a few outliers thousands of times the median would otherwise flatten every other
    bar, and the smoothed profile, near the median, to nothing.
    """
    import plotly.graph_objects as go

    before = cal.inputs[name].chan_max.float()
    profiles = {"before smoothing": before}
    if smoothing is not None:
        profiles["after smoothing (max |x / s|)"] = before / smoothing
    fig = go.Figure()
    for (label, values), color in zip(profiles.items(), (COLORS[1], COLORS[0])):
        order = torch.argsort(values, descending=True)
        fig.add_trace(go.Scatter(x=list(range(1, len(order) + 1)), y=values[order].tolist(), customdata=order.tolist(),
                                 name=label, mode="lines", line={"color": color, "width": 2},
                                 hovertemplate="rank %{x}: channel %{customdata}<br>%{y:.3g}<extra></extra>"))
    ratio = lambda t: float(t.max() / t.median())  # noqa: E731
    note = f"max/median {ratio(before):.1f}" + (f" -> {ratio(before / smoothing):.1f}" if smoothing is not None else "")
    fig.update_layout(title=f"Input channels of {name}, largest first ({note})",
                      xaxis_title="input channels, sorted by max |activation| (rank)",
                      yaxis_title="max |x| over calibration tokens (log)", template="plotly_white", height=380,
                      legend={"orientation": "h", "y": -0.25})
    fig.update_yaxes(type="log", exponentformat="power")
    return fig


def _hist(t: torch.Tensor, bins: int = BINS) -> tuple[list[float], list[float]]:
    t = t.flatten().float()
    lo, hi = float(t.min()), float(t.max())
    counts = torch.histc(t, bins=bins, min=lo, max=hi if hi > lo else lo + 1e-12)
    width = (hi - lo) / bins
    return [lo + (i + 0.5) * width for i in range(bins)], counts.tolist()


def effective_weight(tensors: dict[str, torch.Tensor], cfg_q: QuantConfig, name: str) -> torch.Tensor:
    """What a quantized linear multiplies its (unscaled) input by, in fp32."""
    t = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
    w = dequantize_weight(t, cfg_q.format, cfg_q.group_size or 0)
    return w * t["pre_quant_scale"][None, :] if "pre_quant_scale" in t else w


def weight_histogram(reference: str | Path, quantized: str | Path, name: str):
    """Histogram of one linear's weights and of the quantization error (effective weight minus original)."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    _, ref = load_checkpoint(reference)
    cfg, q = load_checkpoint(quantized)
    block = cfg.quantization
    if name not in block.layers:
        raise QuantizationError(f"{name} is not quantized in {quantized}; quantized linears: {block.layers[:4]} ...")
    if block.format == "int8_sq":
        raise QuantizationError("int8_sq stores smoothed weights (W * s, with 1/s folded into the norm): they are not "
                                "comparable with the original weights one by one; pick another format")
    w = ref[f"{name}.weight"].float()
    err = effective_weight(q, block, name) - w
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"weights of {name}", f"error ({block.format})"))
    for col, (t, color) in enumerate(((w, COLORS[0]), (err, COLORS[1])), start=1):
        x, y = _hist(t)
        fig.add_trace(go.Bar(x=x, y=y, marker_color=color, showlegend=False,
                             hovertemplate="%{x:.3g}: %{y:.0f}<extra></extra>"), row=1, col=col)
    fig.update_xaxes(title_text="weight value", row=1, col=1)
    fig.update_xaxes(title_text="effective weight − original weight", row=1, col=2)
    fig.update_yaxes(type="log", title_text="count", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    rel = float(err.norm() / w.norm())
    fig.update_layout(title=f"{name}: relative weight error {rel:.3g}", template="plotly_white", height=360)
    return fig
