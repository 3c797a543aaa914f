"""DiffExplorer: browse comparison reports — comparison, view, tensor kind, layer, token, threshold.

The figure is redrawn into an ``Output`` widget on every change (plotly's FigureWidget needs
the anywidget front end, which neither nbclient nor nbval provide), so it works the same in
JupyterLab, headless execution and tests; ``explorer.figure`` is the figure now shown.

>>> from nbtrt.widgets import DiffExplorer
>>> DiffExplorer({"fp32": report32, "bf16": report16})  # doctest: +SKIP
"""
from __future__ import annotations

import html

import ipywidgets as w
from IPython.display import display

from ..debug.capture import KIND_LABELS, KINDS
from ..debug.figures import _reports, error_vs_layer, heatmap, histogram, topk_table
from ..debug.metrics import METRICS
from ..plots import LOG_FLOOR

VIEWS = ("error vs layer", "layer × token", "histogram", "top-k tokens")
ALL = "all tensors"


class DiffExplorer(w.VBox):
    """Interactive view of one or more :class:`nbtrt.debug.Report` objects."""

    def __init__(self, reports, view: str = VIEWS[0], kind: str = ALL):
        self.reports = _reports(reports)
        if not self.reports:
            raise ValueError("DiffExplorer needs at least one report from nbtrt.debug.compare()")
        first = next(iter(self.reports.values()))
        kinds = [k for k in KINDS if any(t.kind == k for r in self.reports.values() for t in r.tensors)]
        self.comparison = w.Dropdown(options=list(self.reports), description="comparison")
        self.view = w.ToggleButtons(options=VIEWS, value=view, description="view")
        self.kind = w.Dropdown(options=[ALL, *kinds], value=kind, description="tensor")
        self.layer = w.IntSlider(min=0, max=max(first.num_layers - 1, 0), description="layer")
        self.token = w.IntSlider(min=0, max=len(first.positions) - 1, value=len(first.positions) - 1,
                                 description="token")
        self.metric = w.Dropdown(options=list(METRICS), value=first.metric, description="metric")
        self.threshold = w.FloatLogSlider(value=first.threshold, base=10, min=-12, max=1, step=0.25,
                                          description="threshold", readout_format=".1e")
        self.status = w.HTML()
        self.out = w.Output()
        self.figure = None
        controls = [self.comparison, self.view, w.HBox([self.kind, self.metric]),
                    w.HBox([self.layer, self.token]), self.threshold]
        super().__init__([*controls, self.status, self.out])
        for c in (self.comparison, self.view, self.kind, self.layer, self.token, self.metric, self.threshold):
            c.observe(lambda _change: self.refresh(), names="value")
        self.refresh()

    @property
    def report(self):
        return self.reports[self.comparison.value]

    def _tensor_name(self) -> str:
        kind = "block" if self.kind.value == ALL else self.kind.value
        for t in self.report.tensors:
            if t.kind == kind and (t.layer is None or t.layer == self.layer.value):
                return t.name
        return self.report.tensors[-1].name

    def build(self):
        """The figure for the current selection."""
        r, view, metric = self.report, self.view.value, self.metric.value
        kind = None if self.kind.value == ALL else self.kind.value
        if view == "error vs layer":
            fig = error_vs_layer(self.reports, kind=kind, metric=metric, threshold=self.threshold.value)
            t = r[self._tensor_name()]
            if kind is None or t.kind == kind:  # ring the selected tensor
                fig.add_scatter(x=[t.name if kind is None else (t.layer if t.layer is not None else t.name)],
                                y=[max(t.error(metric), LOG_FLOOR)], mode="markers", showlegend=False,
                                marker={"symbol": "circle-open", "size": 18, "color": "black"}, hoverinfo="skip")
            return fig
        if view == "layer × token":
            fig = heatmap(r, kind=kind or "block", metric=metric)
            fig.add_scatter(x=[r.positions[self.token.value]], y=[self.layer.value], mode="markers", showlegend=False,
                            marker={"symbol": "square-open", "size": 14, "color": "red"}, hoverinfo="skip")
            return fig
        if view == "histogram":
            return histogram(r, self._tensor_name())
        return topk_table(r, position=r.positions[self.token.value])

    def refresh(self) -> None:
        r = self.report
        self.layer.max = max(r.num_layers - 1, 0)
        self.token.max = len(r.positions) - 1
        kind = None if self.kind.value == ALL else self.kind.value
        self.layer.disabled = kind is not None and all(t.layer is None for t in r.of_kind(kind))
        tok = r.token_text[self.token.value] if self.token.value < len(r.token_text) else ""
        self.token.description = f"token {r.positions[self.token.value]}"
        d = r.divergence(self.threshold.value, self.metric.value)
        where = (f"first divergence: <b>{html.escape(str(d))}</b>" if d else
                 f"no tensor over {self.threshold.value:.1e} ({self.metric.value})")
        self.status.value = (f"{html.escape(r.label)}: {where}<br>token {r.positions[self.token.value]} = "
                             f"{html.escape(repr(tok))}; {KIND_LABELS.get(kind or 'block')}")
        self.figure = self.build()
        with self.out:
            self.out.clear_output(wait=True)
            display(self.figure)
