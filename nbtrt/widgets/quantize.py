"""``QuantizeOptions``: pick a format, SmoothQuant alpha, INT4 group size, KV-cache format and
calibration size; ``.kwargs`` feeds :func:`nbtrt.quantize.quantize` directly.

Only the controls that matter for the chosen format are shown (alpha for int8_sq, group size
for the INT4 formats). Driven from code the same way a person drives it::

    opts = QuantizeOptions(fmt="int4_awq", num_samples=16)
    opts.format.value = "int8_sq"; opts.alpha.value = 0.8
    nbtrt.quantize(ckpt, out, **opts.kwargs)                     # calibrates as chosen
    nbtrt.quantize(ckpt, out, calib=cal, **opts.format_kwargs)   # reuses a calibration
"""
from __future__ import annotations

import ipywidgets as w

from ..quantize import DEFAULT_ALPHA, DEFAULT_GROUP_SIZE, FORMATS, KV_FORMATS
from ..quantize.calib import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, SOURCES
from ..layouts import ACTIVATION_SCHEMES

NONE = "none (KV cache only)"
KV_NONE = "none"
GROUP_SIZES = (32, 64, 128, 256)
SEQ_LENS = (128, 256, 512, 1024)


class QuantizeOptions(w.VBox):
    """Quantization choices as widgets; ``kwargs`` -> ``quantize(ckpt, out, **kwargs)``."""

    def __init__(self, fmt: str | None = "int4_awq", *, kv_cache: str | None = None, alpha: float = DEFAULT_ALPHA,
                 group_size: int = DEFAULT_GROUP_SIZE, num_samples: int = DEFAULT_NUM_SAMPLES,
                 seq_len: int = DEFAULT_SEQ_LEN, calib: str = "kjv"):
        style = {"description_width": "150px"}
        self.format = w.Dropdown(options=[*FORMATS, NONE], value=fmt or NONE, description="format", style=style)
        # a string, not None, for "no KV-cache quantization": a Dropdown shows value None as a blank
        self.kv_cache = w.Dropdown(options=[KV_NONE, *KV_FORMATS], value=kv_cache or KV_NONE,
                                   description="KV cache", style=style)
        self.alpha = w.FloatSlider(value=alpha, min=0.0, max=1.0, step=0.05, description="SmoothQuant alpha",
                                   style=style)
        self.activation_scheme = w.ToggleButtons(options=ACTIVATION_SCHEMES, value="per_token",
                                                 description="activations", style=style)
        self.group_size = w.Dropdown(options=GROUP_SIZES, value=group_size, description="INT4 group size",
                                     style=style)
        self.calib = w.Dropdown(options=sorted(SOURCES), value=calib, description="calibration text", style=style)
        self.num_samples = w.BoundedIntText(value=num_samples, min=1, max=4096, description="samples", style=style)
        self.seq_len = w.Dropdown(options=sorted({*SEQ_LENS, seq_len}), value=seq_len, description="tokens / sample",
                                  style=style)
        self.help = w.HTML()
        super().__init__([self.format, self.help, self.kv_cache, self.alpha, self.activation_scheme, self.group_size,
                          self.calib, self.num_samples, self.seq_len])
        self.format.observe(lambda _: self._refresh(), names="value")
        self._refresh()

    def _refresh(self) -> None:
        fmt = self.fmt
        show = lambda widget, on: setattr(widget.layout, "display", None if on else "none")  # noqa: E731
        show(self.alpha, fmt == "int8_sq")
        show(self.activation_scheme, fmt == "int8_sq")
        show(self.group_size, fmt is not None and FORMATS[fmt].weight == "int4")
        self.help.value = f"<i>{FORMATS[fmt].description if fmt else 'weights unchanged; K and V scales only'}</i>"

    @property
    def fmt(self) -> str | None:
        return None if self.format.value == NONE else self.format.value

    @property
    def format_kwargs(self) -> dict:
        """The format choices alone: ``quantize(ckpt, out, calib=calibration, **opts.format_kwargs)``."""
        return {"fmt": self.fmt, "kv_cache": None if self.kv_cache.value == KV_NONE else self.kv_cache.value, "alpha": self.alpha.value,
                "activation_scheme": self.activation_scheme.value, "group_size": self.group_size.value}

    @property
    def kwargs(self) -> dict:
        """Everything, calibration included: ``quantize(ckpt, out, **opts.kwargs)``."""
        return {**self.format_kwargs, "calib": self.calib.value, "num_samples": self.num_samples.value,
                "seq_len": self.seq_len.value}
