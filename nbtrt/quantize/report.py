"""Quality of quantized checkpoints against the unquantized one, on held-out text.

For each candidate: perplexity on the held-out part of the calibration source (text the
calibration never saw), the KL divergence of its next-token distribution from the
reference's, top-1 agreement, and the checkpoint size; per-layer error of the residual
stream through :func:`nbtrt.debug.compare`; optionally per-layer sensitivity (one block
quantized at a time) with the blocks worth keeping in high precision.

All models run in float32 on the CPU: a format's effect is the rounding of what it stores.

>>> r = report("work/ckpt", {"int8_wo": "work/q8", "int4_awq": "work/q4"}, num_tokens=4096)  # doctest: +SKIP
>>> r                      # a table in a notebook                                         # doctest: +SKIP
>>> r.figure(); r.layer_figure()                                                           # doctest: +SKIP
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import debug
from .._io import write_json
from ..checkpoint import WEIGHTS
from ..config import load_checkpoint_config
from ..model import load_decoder
from ..plots import COLORS, SYMBOLS, Table, error_lines
from .calib import tokenizer_for, windows

DEFAULT_EVAL_TOKENS = 4096  # 8 windows of 512 held-out tokens
LAYER_ERROR_TOKENS = 128  # tokens of the first window used for the per-layer comparison
SENSITIVITY_TOKENS = 256
KEEP_FACTOR, KEEP_FRACTION = 2.0, 0.1  # recommend blocks >= 2x the median KL, at most 10 % of them


def label_of(ckpt: str | Path) -> str:
    cfg, _ = load_checkpoint_config(ckpt)
    q = cfg.quantization
    if not q:
        return cfg.dtype
    kv = f"+kv_{q.kv_cache}" if q.kv_cache else ""
    return f"{q.format or cfg.dtype}{kv}"


def size_mb(ckpt: str | Path) -> float:
    """Bytes of the checkpoint's weights file, in MB (10^6)."""
    return (Path(ckpt) / WEIGHTS).stat().st_size / 1e6


def token_metrics(ref_logits: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Sums over the T-1 predicted positions of one window: NLL, KL(ref || cand), top-1 matches."""
    ref_lp = F.log_softmax(ref_logits[0, :-1].float(), -1)
    lp = F.log_softmax(logits[0, :-1].float(), -1)
    return {"nll": float(-lp.gather(-1, ids[0, 1:, None]).sum()),
            "kl": float((ref_lp.exp() * (ref_lp - lp)).sum()),
            "top1": float((ref_lp.argmax(-1) == lp.argmax(-1)).sum()),
            "tokens": ids.shape[1] - 1}


@dataclass
class Sensitivity:
    """KL of the logits when only block ``i`` is taken from the quantized checkpoint."""

    candidate: str
    kl: list[float]
    recommended: list[str]  # blocks to keep in high precision (pass as exclude=)
    rule: str = f"blocks with KL >= {KEEP_FACTOR}x the median, most sensitive first, at most {KEEP_FRACTION:.0%}"

    def figure(self):
        import plotly.graph_objects as go

        colors = ["#d62728" if f"layers.{i}" in self.recommended else "#1f77b4" for i in range(len(self.kl))]
        fig = go.Figure(go.Bar(x=list(range(len(self.kl))), y=self.kl, marker_color=colors,
                               hovertemplate="layer %{x}<br>KL %{y:.3e}<extra></extra>"))
        fig.update_layout(title=f"Sensitivity of {self.candidate}: one block quantized at a time (red: keep high precision)",
                          xaxis_title="layer", yaxis_title="KL(reference || one block quantized)",
                          template="plotly_white", height=380)
        return fig


@dataclass
class QuantReport:
    """Rows (one per model), per-layer errors and sensitivities; shows itself as a table."""

    rows: list[dict]
    layer_error: dict[str, list[float]] = field(default_factory=dict)
    sensitivity: dict[str, Sensitivity] = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)

    def table(self):
        return Table(self.rows, title=f"held-out {self.evaluation.get('source')}: "
                                      f"{self.evaluation.get('tokens')} tokens")

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()

    def figure(self):
        """Perplexity vs size: the trade-off table of every deployment write-up, as a chart."""
        import plotly.graph_objects as go

        # one trace per format, named in the legend: point labels collide where formats have the same size
        fig = go.Figure([go.Scatter(
            x=[r["size_mb"]], y=[r["perplexity"]], mode="markers", name=r["name"], text=[r["name"]],
            marker={"size": 12, "color": COLORS[i % len(COLORS)], "symbol": SYMBOLS[i % len(SYMBOLS)]},
            hovertemplate="%{text}<br>%{x:.1f} MB<br>perplexity %{y:.3f}<extra></extra>")
            for i, r in enumerate(self.rows)])
        fig.update_layout(title="Perplexity vs checkpoint size (held-out text)", xaxis_title="checkpoint size (MB)",
                          yaxis_title="perplexity (lower is better)", template="plotly_white", height=420)
        return fig

    def layer_figure(self):
        """Relative L2 error of the residual stream after each block, one line per format."""
        return error_lines({n: (list(range(len(e))), e) for n, e in self.layer_error.items()},
                           y_title="relative L2 error of the residual stream", title="Error vs layer, per format")

    def to_json(self, path: str | Path | None = None) -> dict:
        data = {"evaluation": self.evaluation, "rows": self.rows, "layer_error": self.layer_error,
                "sensitivity": {k: asdict(v) for k, v in self.sensitivity.items()}}
        if path is not None:
            write_json(path, data)
        return data


def _layer_errors(ref_model, model, ids: torch.Tensor) -> list[float]:
    r = debug.compare(ref_model, model, input_ids=ids, kinds=["block"], threshold=1.0)
    return [t.error("rel_l2") for t in r.of_kind("block")]


def report(reference: str | Path, candidates: dict[str, str | Path] | list[str | Path], *, source: str = "kjv",
           num_tokens: int = DEFAULT_EVAL_TOKENS, seq_len: int = 512, layer_error: bool = True,
           sensitivity: bool = False, seed: int = 0) -> QuantReport:
    """Evaluate candidate checkpoints against the reference checkpoint on held-out text.

    ``candidates``: {label: checkpoint dir} (or a list; labels then come from each
    quantization block). ``num_tokens`` held-out tokens in windows of ``seq_len``.

    >>> r = report("work/ckpt", ["work/ckpt-int8", "work/ckpt-awq"], sensitivity=True)  # doctest: +SKIP
    >>> r.sensitivity["int4_awq"].recommended                                           # doctest: +SKIP
    ['layers.0']
    """
    if not isinstance(candidates, dict):
        candidates = {label_of(c): c for c in candidates}
    n = max(1, num_tokens // seq_len)
    batches = windows(tokenizer_for(reference), source, "eval", n, seq_len, seed)
    ref_model = load_decoder(reference, dtype="float32")
    models = {name: load_decoder(path, dtype="float32") for name, path in candidates.items()}
    sums = {name: {"nll": 0.0, "kl": 0.0, "top1": 0.0, "tokens": 0} for name in ["reference", *models]}
    with torch.inference_mode():
        for w in tqdm(range(n), desc="evaluating", unit="window"):
            ids = batches[w: w + 1]
            ref_logits = ref_model(ids)
            for name, model in [("reference", ref_model), *models.items()]:
                logits = ref_logits if model is ref_model else model(ids)
                for k, v in token_metrics(ref_logits, logits, ids).items():
                    sums[name][k] += v
    paths = {"reference": reference, **candidates}
    rows = []
    for name, s in sums.items():
        rows.append({"name": label_of(reference) if name == "reference" else name, "format": label_of(paths[name]),
                     "size_mb": round(size_mb(paths[name]), 2), "perplexity": math.exp(s["nll"] / s["tokens"]),
                     "kl": s["kl"] / s["tokens"], "top1_agreement": s["top1"] / s["tokens"]})
    out = QuantReport(rows, evaluation={"source": source, "split": "eval", "tokens": n * seq_len, "windows": n,
                                        "seq_len": seq_len, "seed": seed, "reference": str(reference)})
    short = batches[:1, :LAYER_ERROR_TOKENS]
    for name, model in models.items():
        if layer_error:
            out.layer_error[name] = _layer_errors(ref_model, model, short)
        if sensitivity:
            out.sensitivity[name] = _sensitivity(ref_model, model, batches[:1, :SENSITIVITY_TOKENS], name)
    return out


def _sensitivity(ref_model, model, ids: torch.Tensor, name: str) -> Sensitivity:
    kls = []
    with torch.inference_mode():
        ref_logits = ref_model(ids)
        for i in tqdm(range(len(ref_model.layers)), desc=f"sensitivity ({name})", unit="layer"):
            original = ref_model.layers[i]
            ref_model.layers[i] = model.layers[i]  # the whole block: SmoothQuant also changed its norms
            try:
                m = token_metrics(ref_logits, ref_model(ids), ids)
            finally:
                ref_model.layers[i] = original
            kls.append(m["kl"] / m["tokens"])
    return Sensitivity(name, kls, recommend(kls))


def recommend(kls: list[float]) -> list[str]:
    """Blocks to keep in high precision: KL >= KEEP_FACTOR x the median, worst first, at most KEEP_FRACTION."""
    median = statistics.median(kls)
    worst = sorted(range(len(kls)), key=lambda i: -kls[i])
    chosen = [i for i in worst if kls[i] >= KEEP_FACTOR * median and kls[i] > 0]
    return [f"layers.{i}" for i in chosen[: max(1, int(KEEP_FRACTION * len(kls)))]]


def sensitivity(reference: str | Path, candidate: str | Path, *, source: str = "kjv",
                num_tokens: int = SENSITIVITY_TOKENS, seed: int = 0) -> Sensitivity:
    """Per-layer sensitivity of one quantized checkpoint: take one block at a time from it
    into the reference and measure the KL of the logits; recommend blocks to keep.

    >>> s = sensitivity("work/ckpt", "work/ckpt-int4"); s.recommended, s.figure()  # doctest: +SKIP
    """
    ids = windows(tokenizer_for(reference), source, "eval", 1, num_tokens, seed)
    return _sensitivity(load_decoder(reference, dtype="float32"), load_decoder(candidate, dtype="float32"), ids,
                        label_of(candidate))
