"""Plotly in notebooks: the one place the renderer is chosen, plus figure helpers every stage shares.

Why the renderer is chosen here: plotly >= 6 defaults, inside Jupyter, to the
``application/vnd.plotly.v1+json`` mimetype alone. JupyterLab draws that, but nbconvert's
HTML export has no renderer for it and shows nothing. :func:`setup_renderer` therefore
emits *both* the mimetype (JupyterLab, VS Code) and a ``text/html`` version of each figure
(nbclient-executed notebooks keep it; HTML export shows it):

- ``"plotly_mimetype+notebook"`` (default): plotly.js (~4.7 MB) is embedded once per
  notebook, with the first figure, so an exported HTML file draws its figures with no
  network at all (none of this project's machines reaches a CDN);
- ``"plotly_mimetype+notebook_connected"`` (``connected=True``): the HTML loads plotly.js
  from its CDN when viewed — smaller files, but the viewer needs internet.

>>> from nbtrt import plots
>>> plots.setup_renderer()
'plotly_mimetype+notebook'
"""
from __future__ import annotations

import html
import math
from typing import Sequence

RENDERER = "plotly_mimetype+notebook"
CONNECTED_RENDERER = "plotly_mimetype+notebook_connected"
LOG_FLOOR = 1e-12  # exact matches (error 0) are drawn here on log axes; hover shows the true value
THRESHOLD_DASHES = ("dash", "dot", "dashdot", "longdash")  # one style per tolerance line: two must not look alike
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "star", "cross", "triangle-down", "pentagon")
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def setup_renderer(connected: bool = False) -> str:
    """Make plotly figures render in JupyterLab, in executed notebooks and in exported HTML.

    Returns the renderer name now set as plotly's default.
    """
    import plotly.io as pio

    name = CONNECTED_RENDERER if connected else RENDERER
    pio.renderers.default = name
    return name


def _plotted(v: float) -> float | None:
    """A value as drawn on a log axis: non-finite -> gap, below the floor -> the floor."""
    if v is None or not math.isfinite(v):
        return None
    return max(v, LOG_FLOOR)


def _upper_half(value: float, values: Sequence[float], log_y: bool) -> bool:
    """Whether ``value`` lies in the upper half of the drawn range of ``values`` (log or linear)."""
    drawn = [_plotted(v) if log_y else v for v in values]
    drawn = [v for v in drawn if v is not None and math.isfinite(v)]
    here = _plotted(value) if log_y else value
    if not drawn or here is None:
        return True
    f = math.log10 if log_y else (lambda v: v)
    return f(here) >= (f(min(drawn)) + f(max(drawn))) / 2


def error_lines(series: dict[str, tuple[Sequence, Sequence[float]]], *,
                threshold: float | dict[str, float] | None = None,
                marks: dict[str, tuple] | None = None, x_title: str = "layer", y_title: str = "relative L2 error",
                title: str | None = None, log_y: bool = True):
    """Error-vs-layer line chart: one line per comparison, log y axis, optional threshold line(s).

    ``series``: label -> (x values, errors). ``threshold``: a value, or {line name: value}. ``marks``: label -> (x, error, text) to highlight,
    e.g. the first divergence. Each trace's ``customdata`` holds the exact errors (``y`` is
    floored at :data:`LOG_FLOOR` so that exact matches still show on a log axis).

    >>> fig = error_lines({"fp32": ([0, 1], [1e-7, 2e-7]), "int4": ([0, 1], [0.1, 0.2])}, threshold=1e-4)
    >>> [t.name for t in fig.data]
    ['fp32', 'int4', 'threshold']
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (label, (x, y)) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        fig.add_trace(go.Scatter(
            x=list(x), y=[_plotted(v) if log_y else v for v in y], customdata=[float(v) for v in y],
            name=label, mode="lines+markers", line={"color": color},
            hovertemplate="%{x}<br>%{customdata:.3e}<extra>" + html.escape(label) + "</extra>"))
        if marks and label in marks:
            mx, my, text = marks[label]
            # a mark in the upper half of the errors gets its label below it: above, the plot's top cuts it
            upper = _upper_half(my, [v for _, ys in series.values() for v in ys], log_y)
            fig.add_trace(go.Scatter(
                x=[mx], y=[_plotted(my) if log_y else my], customdata=[my], mode="markers+text", text=[text],
                textposition="bottom right" if upper else "top right", cliponaxis=False,
                name=f"{label}: first divergence", showlegend=False,
                marker={"symbol": "x", "size": 14, "color": color, "line": {"width": 2}},
                hovertemplate="first divergence %{x}<br>%{customdata:.3e}<extra></extra>"))
    lines = threshold if isinstance(threshold, dict) else ({"threshold": threshold} if threshold is not None else {})
    xs = list(dict.fromkeys(v for x, _ in series.values() for v in x))
    for i, (name, value) in enumerate(lines.items()):
        line = {"dash": THRESHOLD_DASHES[i % len(THRESHOLD_DASHES)], "color": "gray" if i % 2 == 0 else "black",
                "width": 1.5 + (i % 2)}
        fig.add_trace(go.Scatter(x=[xs[0], xs[-1]] if xs else [], y=[value, value], mode="lines", name=name,
                                 customdata=[value, value], line=line,
                                 hovertemplate=html.escape(name) + " %{customdata:.3e}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, template="plotly_white",
                      height=420, legend={"orientation": "h", "y": -0.25})
    if log_y:
        fig.update_yaxes(type="log", exponentformat="power")
    return fig


class Table:
    """A list of dict rows shown as an HTML table in notebooks (no pandas needed).

    >>> Table([{"a": 1, "b": 2.5}]).rows
    [{'a': 1, 'b': 2.5}]
    """

    def __init__(self, rows: list[dict], max_rows: int | None = 40, title: str | None = None):
        self.rows, self.max_rows, self.title = rows, max_rows, title

    def _repr_html_(self) -> str:
        cols = list(dict.fromkeys(k for r in self.rows for k in r))
        shown = self.rows if self.max_rows is None else self.rows[: self.max_rows]
        head = "".join(f"<th style='text-align:left'>{html.escape(str(c))}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{_cell(r.get(c))}</td>" for c in cols) + "</tr>"
                       for r in shown)
        more = f"<p>... {len(self.rows) - len(shown)} more rows</p>" if len(shown) < len(self.rows) else ""
        title = f"<p><b>{html.escape(self.title)}</b></p>" if self.title else ""
        return f"{title}<table><tr>{head}</tr>{body}</table>{more}"

    def __repr__(self) -> str:
        return f"<Table {len(self.rows)} rows>"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape("" if v is None else str(v))
