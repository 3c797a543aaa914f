"""Error metrics between a reference tensor and a candidate tensor, per tensor and per token.

All reductions run in float64 so the metric itself adds no error worth mentioning, in numpy,
chunk by chunk (single-threaded: small reductions pay more for thread hand-offs than they win).
``ref`` is the reference (HF), ``cand`` the candidate; relative errors divide by the reference.

>>> import torch
>>> a = torch.ones(1, 3, 4); b = a + 1e-3
>>> round(tensor_metrics(a, b)["max_abs"], 6)
0.001
"""
from __future__ import annotations

import math

import numpy as np
import torch

# The relative L2 error per tensor that a precision is expected to stay under when it is
# implemented correctly: the default first-divergence threshold. A bug (wrong rope, swapped
# weights) moves a tensor by 1e-2 .. 1, far above the float32 row; lower precisions drift
# more, so their rows sit just above what a correct build of that precision shows.
PRECISION_TOLERANCE: dict[str, float] = {
    "float32": 1e-4,
    "float16": 2e-2,
    "bfloat16": 1e-1,
    "int8": 2e-1,
    "int4": 5e-1,
}
PRECISION_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                     "w8": "int8", "w4": "int4"}
METRICS = ("rel_l2", "max_abs", "mean_abs", "one_minus_cosine")  # error metrics a threshold can use
HIST_BINS = 64


def precision_name(name: str) -> str:
    """Canonical precision name: ``"fp16"`` -> ``"float16"``; unknown names raise with the list."""
    key = PRECISION_ALIASES.get(name.lower(), name.lower())
    if key not in PRECISION_TOLERANCE:
        raise ValueError(f"unknown precision {name!r}; known: {sorted(PRECISION_TOLERANCE)} "
                         f"(aliases {sorted(PRECISION_ALIASES)}), or pass a number as threshold")
    return key


def coarsest(*precisions: str) -> str:
    """The precision with the largest expected error among ``precisions``."""
    return max((precision_name(p) for p in precisions), key=PRECISION_TOLERANCE.__getitem__)


CHUNK_ELEMENTS = 1 << 21  # float64 elements per chunk: a 150k-vocabulary logits tensor never gets a full copy


def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        t = t.float() if t.dtype in (torch.bfloat16, torch.float16) else t
        return t.numpy()
    return np.asarray(t)


def _rows(a: np.ndarray) -> np.ndarray:
    """[B, T, ...] -> [B*T, rest]: one row per token."""
    return a.reshape(a.shape[0] * a.shape[1], -1) if a.ndim >= 2 else a.reshape(1, -1)


def _chunks(*arrays: np.ndarray):
    """Yield float64 row-chunks of equally shaped arrays."""
    rows = [_rows(a) for a in arrays]
    n, d = rows[0].shape
    step = max(1, CHUNK_ELEMENTS // max(d, 1))
    for s in range(0, n, step):
        yield [r[s:s + step].astype(np.float64) for r in rows]


def _pair(ref, cand) -> tuple[np.ndarray, np.ndarray]:
    r, c = _np(ref), _np(cand)
    if r.shape != c.shape:
        raise ValueError(f"cannot compare tensors of shapes {tuple(r.shape)} and {tuple(c.shape)}")
    return r, c


def _row_stats(r: np.ndarray, c: np.ndarray) -> dict[str, np.ndarray]:
    """One pass over both arrays: float64 per-token (row) sums from which every metric follows."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("r", "c", "ad", "mx", "rr", "cc", "rc", "dd")}
    for rc_, cc_ in _chunks(r, c):
        d = cc_ - rc_
        ad = np.abs(d)
        for key, v in (("r", rc_.sum(-1)), ("c", cc_.sum(-1)), ("ad", ad.sum(-1)),
                       ("mx", ad.max(-1, initial=0.0)), ("rr", np.einsum("ij,ij->i", rc_, rc_)),
                       ("cc", np.einsum("ij,ij->i", cc_, cc_)), ("rc", np.einsum("ij,ij->i", rc_, cc_)),
                       ("dd", np.einsum("ij,ij->i", d, d))):
            parts[key].append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def _cosine(rc, rr, cc):
    """cosine from sums; two all-zero vectors count as aligned, one zero vector as orthogonal."""
    rc, rr, cc = np.asarray(rc, float), np.asarray(rr, float), np.asarray(cc, float)
    den = np.sqrt(rr * cc)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, rc / np.where(den > 0, den, 1.0), np.where((rr == 0) & (cc == 0), 1.0, 0.0))


def _one_minus_cosine(dd, rr, cc):
    """1 - cos = (|d|^2 - (|r| - |c|)^2) / (2 |r| |c|): accurate where 1 - cosine would round to 0."""
    dd, rr, cc = np.asarray(dd, float), np.asarray(rr, float), np.asarray(cc, float)
    den = 2 * np.sqrt(rr * cc)
    num = np.maximum(dd - (np.sqrt(rr) - np.sqrt(cc)) ** 2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0 - _cosine(0.0, rr, cc))


def _relative(dd, rr):
    dd, rr = np.asarray(dd, float), np.asarray(rr, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(rr > 0, np.sqrt(dd / np.where(rr > 0, rr, 1.0)), np.where(dd > 0, math.inf, 0.0))


def _whole(st: dict[str, np.ndarray], numel: int) -> dict[str, float]:
    tot = {k: v.sum() for k, v in st.items() if k != "mx"}
    cosine = float(_cosine(tot["rc"], tot["rr"], tot["cc"]))
    return {
        "max_abs": float(st["mx"].max(initial=0.0)),
        "mean_abs": float(tot["ad"]) / max(numel, 1),
        "rel_l2": float(_relative(tot["dd"], tot["rr"])),
        "cosine": cosine,
        "one_minus_cosine": float(_one_minus_cosine(tot["dd"], tot["rr"], tot["cc"])),
    }


def _per_token(st: dict[str, np.ndarray], shape: tuple) -> dict[str, np.ndarray]:
    width = max(math.prod(shape[2:]), 1)
    return {k: np.asarray(v).reshape(shape[:2]) for k, v in (
        ("max_abs", st["mx"]), ("mean_abs", st["ad"] / width), ("rel_l2", _relative(st["dd"], st["rr"])),
        ("cosine", _cosine(st["rc"], st["rr"], st["cc"])),
        ("one_minus_cosine", _one_minus_cosine(st["dd"], st["rr"], st["cc"])))}


def summary(t) -> dict:
    """mean / sum / shape: what TensorRT-LLM's debug guide prints for each layer."""
    a = _np(t)
    total = float(sum(c.sum() for (c,) in _chunks(a)))
    return {"mean": total / max(a.size, 1), "sum": total, "shape": tuple(a.shape)}


def tensor_metrics(ref, cand) -> dict[str, float]:
    """Whole-tensor errors of ``cand`` against ``ref``.

    max_abs, mean_abs: of the difference; rel_l2 = ||cand - ref|| / ||ref||; cosine of the
    flattened tensors; one_minus_cosine = 1 - cosine (an error, 0 when aligned).
    """
    r, c = _pair(ref, cand)
    return _whole(_row_stats(r, c), r.size)


def token_metrics(ref, cand) -> dict[str, np.ndarray]:
    """Per-token errors for [B, T, ...] tensors: every dimension after the token axis is reduced.

    Returns arrays of shape [B, T] for max_abs, mean_abs, rel_l2 and cosine.
    """
    r, c = _pair(ref, cand)
    if r.ndim < 2:
        raise ValueError(f"per-token metrics need [B, T, ...] tensors, got shape {tuple(r.shape)}")
    return _per_token(_row_stats(r, c), r.shape)


def diff_histogram(ref, cand, bins: int = HIST_BINS, span: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(bin edges, counts) of ``cand - ref`` over [-span, span] (default: the max |difference|)."""
    r, c = _pair(ref, cand)
    if span is None:
        span = max((float(np.abs(b - a).max(initial=0.0)) for a, b in _chunks(r, c)), default=0.0)
    span = span or 1e-12  # an exact match still gets a readable axis: one narrow bin around zero
    edges = np.linspace(-span, span, bins + 1)
    counts = sum((np.histogram(b - a, bins=edges)[0] for a, b in _chunks(r, c)), np.zeros(bins, np.int64))
    return edges, counts


def all_metrics(ref, cand) -> dict:
    """Everything the debugger records for one tensor pair, in two passes over the data:
    ``metrics`` (whole tensor), ``tokens`` (per token), ``ref`` / ``cand`` (mean, sum, shape), ``hist``."""
    r, c = _pair(ref, cand)
    st = _row_stats(r, c)
    n, shape = r.size, tuple(r.shape)
    whole = _whole(st, n)
    return {
        "metrics": whole,
        "tokens": _per_token(st, shape) if r.ndim >= 2 else {},
        "ref": {"mean": float(st["r"].sum()) / max(n, 1), "sum": float(st["r"].sum()), "shape": shape},
        "cand": {"mean": float(st["c"].sum()) / max(n, 1), "sum": float(st["c"].sum()), "shape": shape},
        "hist": diff_histogram(r, c, span=whole["max_abs"]),
    }


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def _topk(p: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest along the last axis, largest first."""
    idx = np.argpartition(-p, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(p, idx, -1), axis=-1, kind="stable")
    return np.take_along_axis(idx, order, -1)


def logits_metrics(ref, cand, k: int = 5) -> dict:
    """Next-token agreement between two [B, T, V] logits tensors.

    Returns means (``argmax_agreement``, ``topk_overlap``, ``kl``), per-token [B, T] arrays
    (``argmax_match``, ``topk_overlap_tokens``, ``kl_tokens``) and ``topk_rows[b][t]``: the union
    of both top-k tokens with both probabilities (see :func:`topk_side_by_side`). KL is
    KL(ref || cand) in nats. Positions are processed a few at a time so a 150k vocabulary never
    needs a full float64 copy of the logits.
    """
    r, c = _pair(ref, cand)
    B, T, V = r.shape
    k = min(k, V)
    chunk = max(1, CHUNK_ELEMENTS // max(B * V, 1))
    match = np.zeros((B, T), dtype=bool)
    overlap = np.zeros((B, T))
    kl = np.zeros((B, T))
    rows: list[list[list[dict]]] = [[] for _ in range(B)]
    for s in range(0, T, chunk):
        lr, lc = _log_softmax(r[:, s:s + chunk].astype(np.float64)), _log_softmax(c[:, s:s + chunk].astype(np.float64))
        pr, pc = np.exp(lr), np.exp(lc)
        tr, tc = _topk(pr, k), _topk(pc, k)
        match[:, s:s + chunk] = r[:, s:s + chunk].argmax(-1) == c[:, s:s + chunk].argmax(-1)
        overlap[:, s:s + chunk] = (tr[..., :, None] == tc[..., None, :]).any(-1).sum(-1) / k
        kl[:, s:s + chunk] = np.maximum((pr * (lr - lc)).sum(-1), 0.0)
        for b in range(B):
            for t in range(tr.shape[1]):
                rows[b].append(_topk_rows(tr[b, t].tolist(), tc[b, t].tolist(), pr[b, t], pc[b, t]))
    return {
        "argmax_agreement": float(match.mean()),
        "topk_overlap": float(overlap.mean()),
        "kl": float(kl.mean()),
        "k": k,
        "argmax_match": match,
        "topk_overlap_tokens": overlap,
        "kl_tokens": kl,
        "topk_rows": rows,
    }


def _topk_rows(top_r: list[int], top_c: list[int], pr: np.ndarray, pc: np.ndarray) -> list[dict]:
    rank_r = {t: i + 1 for i, t in enumerate(top_r)}
    rank_c = {t: i + 1 for i, t in enumerate(top_c)}
    out = [{"token_id": t, "ref_prob": float(pr[t]), "cand_prob": float(pc[t]),
            "ref_rank": rank_r.get(t), "cand_rank": rank_c.get(t)} for t in dict.fromkeys(top_r + top_c)]
    return sorted(out, key=lambda row: -row["ref_prob"])


def topk_side_by_side(ref, cand, k: int = 5) -> list[dict]:
    """For one position's [V] logits: the union of both top-k tokens, with both probabilities
    and ranks, ordered by reference probability."""
    r, c = _pair(ref, cand)
    return logits_metrics(r[None, None], c[None, None], k)["topk_rows"][0][0]
