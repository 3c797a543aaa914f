"""``BuildOptions``: the engine build options of ``trtllm-build`` as widgets; ``.kwargs`` feeds
:func:`nbtrt.build` directly. :func:`memory_figure` draws what the limits cost (:func:`nbtrt.memory.memory_plan`).

    opts = BuildOptions(backend="onnxruntime", max_batch_size=4)
    opts.max_seq_len.value = 2048
    memory_figure(memory_plan(cfg, **opts.limits))
    memory_view(cfg, opts)          # the same figure and table, redrawn whenever the limits change
    nbtrt.build(ckpt, "work/engine", **opts.kwargs)

The memory plan is what the limits commit a GPU to before any request arrives: the weights in
each precision, plus a KV cache sized for ``max_batch_size`` sequences of ``max_seq_len`` tokens
(TensorRT-LLM preallocates it the same way).
"""
from __future__ import annotations

import ipywidgets as w

from ..engine import BACKENDS, _ensure_backends, default_backend
from ..memory import memory_plan
from ..plots import COLORS, Table

DTYPES = ("checkpoint", "float32", "float16", "bfloat16")


def memory_figure(rows: list[dict], title: str = "Memory plan: weights + KV cache"):
    """Stacked bars of :func:`memory_plan` rows."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (key, label) in enumerate((("weights_gib", "weights"), ("kv_cache_gib", "KV cache"))):
        fig.add_trace(go.Bar(x=[r["precision"] for r in rows], y=[r[key] for r in rows], name=label,
                             marker_color=COLORS[i], hovertemplate="%{x}<br>%{y:.3f} GiB<extra>" + label + "</extra>"))
    fig.update_layout(barmode="stack", title=title, yaxis_title="GiB", xaxis_tickangle=-20, height=420)
    return fig


class BuildOptions(w.VBox):
    """Build options as widgets; ``kwargs`` -> ``nbtrt.build(ckpt, out, **kwargs)``.

    The TensorRT-only options (builder optimization level, workspace, timing cache) show only
    when the TensorRT backend is chosen, the ONNX graph flavour only for ONNX Runtime; a backend
    that cannot run here says why.
    """

    def __init__(self, *, backend: str | None = None, max_batch_size: int = 4,
                 max_input_len: int = 512, max_seq_len: int = 1024, dtype: str | None = None,
                 builder_opt_level: int = 3, workspace_gib: float = 4.0, timing_cache: str = "",
                 graph: str = "auto"):
        _ensure_backends()
        style = {"description_width": "150px"}
        self.backend = w.Dropdown(options=sorted(BACKENDS), value=backend or default_backend(), description="backend",
                                  style=style)
        self.dtype = w.Dropdown(options=DTYPES, value=dtype or "checkpoint", description="precision", style=style)
        self.max_batch_size = w.BoundedIntText(value=max_batch_size, min=1, max=1024, description="max_batch_size",
                                               style=style)
        self.max_input_len = w.BoundedIntText(value=max_input_len, min=1, max=1 << 20, description="max_input_len",
                                              style=style)
        self.max_seq_len = w.BoundedIntText(value=max_seq_len, min=1, max=1 << 20, description="max_seq_len",
                                            style=style)
        self.builder_opt_level = w.IntSlider(value=builder_opt_level, min=0, max=5, description="builder opt level",
                                             style=style)
        self.workspace_gib = w.BoundedFloatText(value=workspace_gib, min=0.25, max=1024, step=0.25,
                                                description="workspace (GiB)", style=style)
        self.timing_cache = w.Text(value=timing_cache, placeholder="default: $NBTRT_CACHE/tensorrt/timing.cache",
                                   description="timing cache", style=style)
        self.graph = w.Dropdown(options=[("auto (ort-cpu on a CPU)", "auto"), ("standard (the TensorRT contract)",
                                                                          "standard"), ("ort-cpu", "ort-cpu")],
                                value=graph, description="ONNX graph", style=style)
        self.status = w.HTML()
        super().__init__([self.backend, self.status, self.dtype, self.graph, self.max_batch_size, self.max_input_len,
                          self.max_seq_len, self.builder_opt_level, self.workspace_gib, self.timing_cache])
        self.backend.observe(lambda _: self._refresh(backend_changed=True), names="value")
        for control in (self.max_batch_size, self.max_input_len, self.max_seq_len):
            control.observe(lambda _: self._refresh(), names="value")
        self._backend_problem: str | None = None
        self._refresh(backend_changed=True)

    def _refresh(self, backend_changed: bool = False) -> None:
        trt = self.backend.value == "tensorrt"
        for control in (self.builder_opt_level, self.workspace_gib, self.timing_cache):
            control.layout.display = None if trt else "none"
        self.graph.layout.display = None if self.backend.value == "onnxruntime" else "none"
        if backend_changed:  # available() tries imports: once per backend choice, not per keystroke
            reason = BACKENDS[self.backend.value].available()
            self._backend_problem = f"{self.backend.value} cannot build here: {reason}" if reason else None
        problems = [self._backend_problem] if self._backend_problem else []
        if self.max_input_len.value > self.max_seq_len.value:
            problems.append("max_input_len must not exceed max_seq_len")
        self.status.value = "".join(f"<p style='color:#d62728'>{p}</p>" for p in problems)

    @property
    def limits(self) -> dict:
        """The three engine limits: ``memory_plan(cfg, **opts.limits)``."""
        return {"max_batch_size": self.max_batch_size.value, "max_input_len": self.max_input_len.value,
                "max_seq_len": self.max_seq_len.value}

    @property
    def kwargs(self) -> dict:
        """Everything :func:`nbtrt.build` takes besides the checkpoint and output paths."""
        out = {"backend": self.backend.value, **self.limits}
        if self.dtype.value != "checkpoint":
            out["dtype"] = self.dtype.value
        if self.backend.value == "onnxruntime" and self.graph.value != "auto":
            out["graph"] = self.graph.value
        if self.backend.value == "tensorrt":
            out.update(builder_opt_level=self.builder_opt_level.value, workspace_gib=self.workspace_gib.value,
                       timing_cache=self.timing_cache.value or None)
        return out


def memory_view(cfg, opts: BuildOptions) -> w.Output:
    """The memory plan of ``opts``' limits (figure and table) in an output area that is redrawn
    whenever one of the limits changes: the figure follows the widget, no cell to re-run.

    >>> memory_view(cfg, BuildOptions(max_batch_size=4))  # doctest: +SKIP
    """
    from IPython.display import display

    out = w.Output()

    def draw(_=None) -> None:
        rows = memory_plan(cfg, **opts.limits)
        with out:
            out.clear_output(wait=True)
            display(memory_figure(rows, title=f"Memory plan: weights + KV cache for max_batch_size="
                                              f"{opts.max_batch_size.value}, max_seq_len={opts.max_seq_len.value}"),
                    Table(rows))

    for control in (opts.max_batch_size, opts.max_input_len, opts.max_seq_len):
        control.observe(draw, names="value")
    out.redraw = draw  # for code (and tests) that change the options and want the view now
    draw()
    return out
