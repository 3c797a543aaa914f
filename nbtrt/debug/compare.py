"""``compare``: run a reference and a candidate on the same tokens, tensor by tensor.

The reference runs first and keeps only the chosen subset of tensors (on the CPU). The
candidate then runs, and each of its tensors is measured against the stored reference the
moment it is produced and dropped, so full activations of both models never coexist.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import metrics as M
from .capture import KIND_LABELS, Probe, Source, SourceLike, TokenIds, as_source, probes
from .figures import bisect_figure, error_vs_layer, heatmap, histogram, topk_table


@dataclass
class TensorDiff:
    """Errors of one aligned tensor: whole-tensor metrics, per-token metrics ([B, T] arrays),
    mean/sum/shape of both sides, and a histogram of the difference."""

    name: str
    kind: str
    layer: int | None
    shape: tuple
    metrics: dict[str, float]
    tokens: dict[str, np.ndarray]
    ref: dict
    cand: dict
    hist: tuple[np.ndarray, np.ndarray]

    def error(self, metric: str = "rel_l2") -> float:
        return self.metrics[metric]


def measure(probe: Probe, ref: torch.Tensor, cand: torch.Tensor) -> TensorDiff:
    """All metrics of one tensor pair (see :mod:`nbtrt.debug.metrics`)."""
    if ref.shape != cand.shape:
        raise ValueError(f"{probe.name}: reference shape {tuple(ref.shape)} but candidate shape {tuple(cand.shape)}; "
                         "the two models do not have the same configuration")
    return TensorDiff(probe.name, probe.kind, probe.layer, tuple(ref.shape), **M.all_metrics(ref, cand))


@dataclass(frozen=True)
class Divergence:
    """The first tensor, in execution order, whose error exceeds the threshold."""

    name: str
    kind: str
    layer: int | None
    metric: str
    value: float
    threshold: float

    def __str__(self) -> str:
        where = f"layer {self.layer} " if self.layer is not None else ""
        return (f"{self.name} ({where}{KIND_LABELS[self.kind]}): {self.metric} = {self.value:.3g} "
                f"> threshold {self.threshold:.3g}")


def exceeds(value: float, threshold: float) -> bool:
    return not value <= threshold  # NaN counts as diverged


@dataclass
class Report:
    """What :func:`compare` found. Displays itself as a table in a notebook.

    >>> report = compare("smollm2-135m-instruct", "work/ckpt", "Hello")  # doctest: +SKIP
    >>> report.first_divergence is None, report.logits["argmax_agreement"]  # doctest: +SKIP
    (True, 1.0)
    """

    reference: str
    candidate: str
    input_ids: list[list[int]]
    positions: list[int]
    token_text: list[str]  # batch row 0, at ``positions``
    tensors: list[TensorDiff]
    logits: dict
    topk: list[list[list[dict]]]  # [batch][position] -> rows (see metrics.topk_side_by_side)
    threshold: float
    metric: str = "rel_l2"
    precision: str | None = None  # the tolerance row the threshold came from, if any
    num_layers: int = 0
    label: str = field(default="")

    def __post_init__(self):
        self.label = self.label or self.candidate

    # -------------------------------------------------------------- lookups
    def __getitem__(self, name: str) -> TensorDiff:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"{name!r} was not captured; captured: {[t.name for t in self.tensors][:6]} ...")

    def of_kind(self, kind: str) -> list[TensorDiff]:
        return [t for t in self.tensors if t.kind == kind]

    def divergence(self, threshold: float | None = None, metric: str | None = None) -> Divergence | None:
        """First tensor over ``threshold`` (default: the report's) in execution order, or None."""
        threshold = self.threshold if threshold is None else threshold
        metric = metric or self.metric
        for t in self.tensors:
            if exceeds(t.error(metric), threshold):
                return Divergence(t.name, t.kind, t.layer, metric, t.error(metric), threshold)
        return None

    @property
    def first_divergence(self) -> Divergence | None:
        return self.divergence()

    # -------------------------------------------------------------- views
    def table(self, kind: str | None = None) -> list[dict]:
        """One row per tensor: errors and the mean/sum/shape of both sides."""
        rows = []
        for t in self.tensors:
            if kind and t.kind != kind:
                continue
            m = t.metrics
            rows.append({"tensor": t.name, "kind": t.kind, "layer": t.layer, "shape": t.shape,
                         "max_abs": m["max_abs"], "mean_abs": m["mean_abs"], "rel_l2": m["rel_l2"],
                         "cosine": m["cosine"], "ref_mean": t.ref["mean"], "cand_mean": t.cand["mean"],
                         "ref_sum": t.ref["sum"], "cand_sum": t.cand["sum"],
                         "diverged": exceeds(t.error(self.metric), self.threshold)})
        return rows

    def summary(self) -> str:
        """One line: the first divergence (or none), then next-token agreement."""
        d = self.first_divergence
        tol = f", the {self.precision} tolerance" if self.precision else ""
        verdict = f"first divergence at {d}" if d else f"no divergence ({self.metric} <= {self.threshold:.3g}{tol})"
        lg = self.logits
        parts = [f"top-1 agreement {lg['argmax_agreement']:.2%} of {lg['argmax_match'].size} positions",
                 f"top-{lg['k']} overlap {lg['topk_overlap']:.2%}", f"KL {lg['kl']:.3g}"]
        if self._has("lm_head"):
            parts.append(f"max |dlogit| {self['lm_head'].metrics['max_abs']:.3g}")
        return f"{self.label} vs {self.reference}: {verdict}; " + ", ".join(parts)

    def _has(self, name: str) -> bool:
        return any(t.name == name for t in self.tensors)

    def figure(self, kind: str | None = None, **kw):
        """Error vs layer (log axis), the threshold, and the first divergence marked."""
        return error_vs_layer(self, kind=kind, **kw)

    def heatmap(self, kind: str = "block", metric: str = "rel_l2", batch: int = 0):
        return heatmap(self, kind=kind, metric=metric, batch=batch)

    def histogram(self, name: str):
        return histogram(self, name)

    def topk_table(self, position: int = -1, batch: int = 0):
        return topk_table(self, position=position, batch=batch)

    def _repr_html_(self) -> str:
        head = f"<p><b>{html.escape(self.summary())}</b></p>"
        cols = ["tensor", "shape", "max_abs", "mean_abs", "rel_l2", "cosine", "ref_mean", "cand_mean"]
        body = []
        for row in self.table():
            style = ' style="background:#fdd"' if row["diverged"] else ""
            cells = "".join(f"<td>{_fmt(row[c])}</td>" for c in cols)
            body.append(f"<tr{style}>{cells}</tr>")
        hdr = "".join(f"<th>{c}</th>" for c in cols)
        return (f"{head}<details><summary>{len(body)} tensors</summary><table><tr>{hdr}</tr>"
                f"{''.join(body)}</table></details>")

    def __repr__(self) -> str:
        return f"<Report {self.summary()}>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return html.escape(str(v))


# ------------------------------------------------------------------------------ inputs
def _input_ids(text, input_ids, sources: list[Source]) -> tuple[torch.Tensor, object]:
    tok = _tokenizer(sources, required=text is not None)
    if (text is None) == (input_ids is None):
        raise ValueError("pass either text or input_ids (a list of token ids, or a list of equal-length lists)")
    if text is not None:
        if not isinstance(text, str) or not text:
            raise ValueError("text must be a non-empty string; for a batch pass input_ids")
        ids = tok(text, add_special_tokens=True)["input_ids"]
        return torch.tensor([ids]), tok
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"input_ids must be [T] or [B, T] token ids (equal lengths, no padding), got shape {tuple(ids.shape)}")
    vocab = sources[0].config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"input_ids hold ids outside the vocabulary [0, {vocab})")
    return ids.long(), tok


def _tokenizer(sources: list[Source], required: bool):
    for s in sources:
        d = s.tokenizer_dir
        if d is not None and ((d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()):
            from .._io import load_tokenizer

            return load_tokenizer(d)
    if required:
        raise ValueError(f"neither {sources[0].label} nor {sources[1].label} has tokenizer files; pass input_ids=")
    return None


def _check_compatible(ref: Source, cand: Source) -> None:
    keys = ("num_layers", "hidden_size", "vocab_size", "num_heads", "num_kv_heads", "head_dim")
    bad = [(k, getattr(ref.config, k), getattr(cand.config, k)) for k in keys
           if getattr(ref.config, k) != getattr(cand.config, k)]
    if bad:
        raise ValueError(f"{ref.label} and {cand.label} are different models: "
                         + ", ".join(f"{k} {a} vs {b}" for k, a, b in bad))


def _positions(positions: Iterable[int] | None, T: int) -> list[int] | None:
    if positions is None:
        return None
    out = []
    for p in positions:
        if not -T <= int(p) < T:
            raise ValueError(f"position {p} is outside the {T}-token input")
        out.append(int(p) % T)
    return out


def resolve_threshold(threshold: float | str | None, metric: str, ref: Source, cand: Source) -> tuple[float, str | None]:
    """(threshold value, precision row used). None -> the coarser precision of the two models."""
    if metric not in M.METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {M.METRICS}")
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        return float(threshold), None
    precision = M.precision_name(threshold) if threshold else M.coarsest(ref.precision, cand.precision)
    if metric != "rel_l2":
        raise ValueError(f"precision tolerances are relative L2 errors; with metric={metric!r} pass a number as threshold")
    return M.PRECISION_TOLERANCE[precision], precision


def _token_text(tok, ids: list[int]) -> list[str]:
    if tok is None:
        return [str(i) for i in ids]
    return [tok.decode([i]) for i in ids]


# ------------------------------------------------------------------------------ compare
def compare(reference: SourceLike, candidate: SourceLike, text: str | None = None, *, input_ids: TokenIds | None = None,
            layers: Iterable[int] | None = None, kinds: Iterable[str] | None = None,
            names: Iterable[str] | None = None, positions: Iterable[int] | None = None,
            threshold: float | str | None = None, metric: str = "rel_l2", k: int = 5,
            label: str | None = None) -> Report:
    """Compare a candidate against a reference, tensor by tensor, on the same tokens.

    reference / candidate: a HF directory, zoo name or HF model; an nbtrt checkpoint directory or
    Decoder; an Engine or engine directory. ``layers`` / ``kinds`` / ``names`` / ``positions``
    choose the subset captured (kinds: see ``capture.KINDS``). ``threshold``: a number (on
    ``metric``), a precision name ("fp32", "fp16", "bf16", "int8", "int4"), or None for the
    tolerance of the coarser precision of the two models.

    >>> r = compare("smollm2-135m-instruct", "work/ckpt", "def f(x):")  # doctest: +SKIP
    >>> r = compare(hf_model, decoder, input_ids=[[1, 2, 3]], layers=[0, -1])  # doctest: +SKIP
    >>> r.first_divergence, r.figure()  # doctest: +SKIP
    """
    ref = as_source(reference)
    cand = as_source(candidate, label=label)
    _check_compatible(ref, cand)
    ids, tok = _input_ids(text, input_ids, [ref, cand])
    pos = _positions(positions, ids.shape[1])
    thr, precision = resolve_threshold(threshold, metric, ref, cand)
    wanted = probes(ref.arch, ref.config, layers=layers, kinds=kinds, names=names)

    stored: dict[str, torch.Tensor] = {}
    diffs: dict[str, TensorDiff] = {}
    with tqdm(total=2 * len(wanted), desc=f"compare: {ref.label}", unit="tensor", leave=False) as bar:
        def on_reference(p: Probe, t: torch.Tensor) -> None:
            stored[p.name] = t
            bar.update()

        def on_candidate(p: Probe, t: torch.Tensor) -> None:
            diffs[p.name] = measure(p, stored.pop(p.name), t)
            bar.update()

        ref_logits = ref.run(ids, wanted, on_reference, pos)
        bar.set_description(f"compare: {cand.label}")
        cand_logits = cand.run(ids, wanted, on_candidate, pos)
        stored.clear()
        bar.set_description("compare: logits")
        lg = M.logits_metrics(ref_logits, cand_logits, k=k)
    topk = lg.pop("topk_rows")
    del ref_logits, cand_logits
    for row in (r for per_b in topk for per_t in per_b for r in per_t):
        row["token"] = _token_text(tok, [row["token_id"]])[0]
    shown = ids[0].tolist() if pos is None else [ids[0, p].item() for p in pos]
    return Report(reference=ref.label, candidate=cand.label, input_ids=ids.tolist(),
                  positions=pos if pos is not None else list(range(ids.shape[1])),
                  token_text=_token_text(tok, shown), tensors=[diffs[p.name] for p in wanted], logits=lg,
                  topk=topk, threshold=thr, metric=metric, precision=precision, num_layers=ref.config.num_layers,
                  label=label or cand.label)


# ------------------------------------------------------------------------------ bisect
@dataclass
class Bisection:
    """Result of :func:`bisect`: the first divergence and each probe of the candidate."""

    first_divergence: Divergence | None
    steps: list[dict]  # {"tensors": [...], "errors": {...}, "blocks_run": n}
    blocks_run: dict[str, int]  # blocks executed per model ("reference", "candidate")
    num_layers: int
    threshold: float = float("nan")
    metric: str = "rel_l2"

    def table(self) -> list[dict]:
        """One row per candidate run: what it captured, its worst error, and whether that is over the threshold."""
        rows = []
        for i, step in enumerate(self.steps, 1):
            worst = max(step["errors"].items(), key=lambda kv: kv[1] if kv[1] == kv[1] else float("inf"))
            rows.append({"probe": i, "tensors": ", ".join(step["tensors"]), "worst tensor": worst[0],
                         self.metric: worst[1], "over threshold": exceeds(worst[1], self.threshold)})
        return rows

    def figure(self):
        """The probes in the order they ran: worst error per probe against the threshold (log axis)."""
        return bisect_figure(self)

    def _repr_html_(self) -> str:
        runs = ", ".join(f"{k} {v}" for k, v in self.blocks_run.items())
        head = (f"<p><b>First divergence: {html.escape(str(self.first_divergence or 'none'))}</b><br>"
                f"{len(self.steps)} candidate runs; blocks executed: {html.escape(runs)} "
                f"(a full pass is {self.num_layers}); threshold {self.threshold:.3g} ({html.escape(self.metric)})</p>")
        cols = ["probe", "tensors", "worst tensor", self.metric, "over threshold"]
        hdr = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in cols)
        over = " style='background:#fdd'"
        body = "".join(f"<tr{over if r['over threshold'] else ''}>"
                       + "".join(f"<td style='text-align:left'>{_fmt(r[c])}</td>" for c in cols) + "</tr>"
                       for r in self.table())
        return f"{head}<table><tr>{hdr}</tr>{body}</table>"

    def __repr__(self) -> str:
        runs = ", ".join(f"{k} {v}" for k, v in self.blocks_run.items())
        return (f"<Bisection {self.first_divergence or 'no divergence'}; {len(self.steps)} candidate runs, "
                f"blocks executed: {runs} (a full pass is {self.num_layers})>")


def bisect(reference: SourceLike, candidate: SourceLike, text: str | None = None, *, input_ids: TokenIds | None = None,
           threshold: float | str | None = None, metric: str = "rel_l2", kinds: Iterable[str] | None = None) -> Bisection:
    """Find the first divergence by bisecting over layers: each candidate run captures only the
    tensors of one probe (what matters where marking outputs breaks engine fusions) and, for
    torch models, stops right after them. The reference's block outputs are cached, so it runs
    about once. Assumes an error, once over the threshold, stays over it in later layers — true
    of the bugs in :mod:`nbtrt.debug.lab`.

    >>> bisect("smollm2-135m-instruct", bugged_decoder, "Hello").first_divergence  # doctest: +SKIP
    """
    ref = as_source(reference)
    cand = as_source(candidate)
    _check_compatible(ref, cand)
    ids, _ = _input_ids(text, input_ids, [ref, cand])
    thr, _ = resolve_threshold(threshold, metric, ref, cand)
    L = ref.config.num_layers
    kinds = tuple(kinds) if kinds is not None else None
    if kinds is not None and "block" not in kinds:
        kinds += ("block",)  # bisection steps over the residual stream after each block
    every = probes(ref.arch, ref.config, kinds=kinds)
    cache: dict[str, torch.Tensor] = {}
    blocks = {"reference": 0, "candidate": 0}
    steps: list[dict] = []

    def depth(wanted: list[Probe], source: Source) -> int:
        last = wanted[-1]
        if not source.can_stop_early or (last.layer is None and last.kind != "embed"):
            return L
        return 0 if last.layer is None else last.layer + 1

    def reference_tensors(wanted: list[Probe]) -> None:
        need = [p for p in wanted if p.name not in cache]
        if not need:
            return
        # keep every block output of the reference (one [B, T, hidden] tensor per layer): each
        # later probe of the residual stream then reuses this run instead of rerunning it
        extra = [p for p in every if p.kind == "block" and p.name not in cache]
        todo = sorted({p.name: p for p in need + extra}.values(), key=lambda p: p.order)
        ref.run(ids, todo, lambda p, t: cache.__setitem__(p.name, t), stop_early=True)
        blocks["reference"] += depth(todo, ref)

    def probe(wanted: list[Probe]) -> Divergence | None:
        reference_tensors(wanted)
        errors: dict[str, float] = {}
        cand.run(ids, wanted, lambda p, t: errors.__setitem__(p.name, M.tensor_metrics(cache[p.name], t)[metric]),
                 stop_early=True)
        blocks["candidate"] += depth(wanted, cand)
        steps.append({"tensors": [p.name for p in wanted], "errors": errors})
        bar.update()
        for p in wanted:
            if exceeds(errors[p.name], thr):
                return Divergence(p.name, p.kind, p.layer, metric, errors[p.name], thr)
        return None

    bar = tqdm(total=2 + max(L, 1).bit_length(), desc="bisect", unit="probe", leave=False)
    embed = [p for p in every if p.kind == "embed"]
    found = probe(embed) if embed else None
    if found is None:
        lo, hi = 0, L  # invariant: blocks < lo are within threshold; block hi is over it (hi == L: none seen)
        while lo < hi:
            mid = (lo + hi) // 2
            if probe([p for p in every if p.layer == mid and p.kind == "block"]):
                hi = mid
            else:
                lo = mid + 1
        tail = [p for p in every if p.layer == lo] if lo < L else \
            [p for p in every if p.layer is None and p.kind != "embed"]
        found = probe(tail) if tail else None
    bar.close()
    return Bisection(found, steps, blocks, L, thr, metric)
