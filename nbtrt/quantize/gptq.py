"""GPTQ (Frantar et al., 2022): rounding that corrects itself with second-order information.

Round-to-nearest rounds every weight on its own. GPTQ rounds one input column of a linear at
a time and moves the rounding error onto the columns not yet rounded, weighted by the inverse
Hessian of the layer's output error on calibration inputs X::

    H = 2 X Xᵀ (+ damp · mean(diag H) · I)      the Hessian of ||X Wᵀ - X Qᵀ||² in each row of W
    for column j (in order):  q_j = quant(w_j);  e = (w_j - q_j) / [H⁻¹]_jj;  w_k -= e · [H⁻¹]_jk  (k > j)

using the upper Cholesky factor of H⁻¹ for [H⁻¹] (numerically stable, the paper's step 3) and
applying the updates lazily: inside a block of 128 columns eagerly, to the rest of the matrix
once per block (step 2). With ``act_order`` the columns are processed in order of decreasing
diag(H) (the most activated inputs first); the INT4 group scales are then fixed up front on
the original column order ("static groups"), so the codes go back to their original columns
and the stored tensors are exactly :func:`~nbtrt.layouts.quantize_int4`'s layout.
Without act-order a group's scale is taken when its first column is reached, from the weights
as the error updates left them (as the paper's reference code does).

The model is quantized block by block: the inputs of block i come from blocks 0..i-1 already
quantized (the paper's sequential scheme), so later layers correct for earlier layers' error.
The output is an ordinary ``int4_wo`` / ``int8_wo`` checkpoint (with a ``gptq`` record in its
quantization block): every runtime that runs those formats runs GPTQ's output unchanged.

>>> nbtrt.quantize("work/ckpt", "work/ckpt-gptq", "int4_gptq", num_samples=128)       # doctest: +SKIP
>>> nbtrt.quantize("work/ckpt", "work/ckpt-gptq-ao", "int4_gptq", act_order=True)    # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .._io import atomic_dir
from ..checkpoint import save_checkpoint
from ..model import TORCH_DTYPES, ConcatKVCache
from .calib import Calibration, get_source, tokenizer_for, windows
from ..layouts import (EPS, INT4_MAX, INT8_MAX, LAYOUT_VERSION, QuantizationError, check_quantized_tensors,
                      linear_names, pack_int4)

# requested format -> the checkpoint layout it writes
LAYOUTS = {"int4_gptq": "int4_wo", "int8_gptq": "int8_wo"}
DEFAULT_DAMP = 0.01  # fraction of mean(diag H) added to the diagonal (the paper's 1 %)
DEFAULT_BLOCK = 128  # columns per lazy batch update


class _Stop(Exception):
    """Raised by the capture hook once block 0's inputs are in hand: the rest of the forward is not needed."""


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, in float64; more damping if H is not positive definite."""
    h = h.double()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    mean_diag = float(h.diagonal().mean()) or 1.0
    for extra in (1.0, 10.0, 100.0):
        chol, info = torch.linalg.cholesky_ex(h + damp * extra * mean_diag * eye)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    raise QuantizationError("GPTQ: the calibration Hessian is not positive definite even with 100x damping; "
                            "calibrate on more (or more varied) text")


@torch.no_grad()
def gptq_codes(w: torch.Tensor, h: torch.Tensor, kind: str, group_size: int = 128, act_order: bool = False,
               damp: float = DEFAULT_DAMP, block_size: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ for one linear: ``w`` [out, in], ``h`` [in, in] = Σ x xᵀ over calibration inputs.

    Returns integer codes [out, in] (float, in the original column order) and scales:
    ``kind="int8"`` [out] (per output channel), ``kind="int4"`` [out, ceil(in/g)] (groups of
    ``group_size`` input channels) — the scales :func:`quantize_int8` / :func:`quantize_int4` use.

    >>> q, s = gptq_codes(layer.weight, xtx, "int4", group_size=128)   # doctest: +SKIP
    """
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    out, n = w.shape
    dead = h.diagonal() == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    lo, hi = (-INT8_MAX, INT8_MAX) if kind == "int8" else (-INT4_MAX - 1, INT4_MAX)
    levels = INT8_MAX if kind == "int8" else INT4_MAX
    n_groups = -(-n // group_size)
    if kind == "int8":
        scale = (w.abs().amax(dim=1) / levels).clamp(min=EPS)
    else:  # static groups (act-order): fixed on the original columns now; otherwise filled in as groups start
        padded = torch.nn.functional.pad(w, (0, n_groups * group_size - n)).view(out, n_groups, group_size)
        scale = (padded.abs().amax(dim=2) / levels).clamp(min=EPS)
    static = kind == "int8" or act_order
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, damp).float()
    if not static:
        block_size = max(group_size, block_size // group_size * group_size)  # a group never straddles two blocks
    codes = torch.zeros_like(w)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(out, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if not static and col % group_size == 0:  # a new group starts: its scale from the updated weights
                scale[:, col // group_size] = (w1[:, i: i + group_size].abs().amax(dim=1) / levels).clamp(min=EPS)
            s = scale if kind == "int8" else scale[:, col // group_size]
            q = torch.round(w1[:, i] / s).clamp(lo, hi)
            codes[:, i1 + i] = q
            e = (w1[:, i] - q * s) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # the lazy batch update of all later columns
    codes = codes[:, torch.argsort(perm)]
    return codes, scale


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes and scales (either kind) back to an fp32 [out, in] weight."""
    if scale.dim() == 1:
        return codes * scale[:, None]
    return codes * scale.repeat_interleave(group_size, dim=1)[:, : codes.shape[1]]


def stored_tensors(codes: torch.Tensor, scale: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """The tensors an int8_wo / int4_wo linear stores (suffixes ``weight``, ``weight_scale``)."""
    q = codes.to(torch.int8)
    return {"weight": q if kind == "int8" else pack_int4(q), "weight_scale": scale.float()}


class _Hessian:
    """Accumulates Σ x xᵀ of one linear's inputs through a forward pre-hook."""

    def __init__(self, module: nn.Module):
        self.h = torch.zeros(module.in_features, module.in_features)
        self.tokens = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, _module, args):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        self.h.addmm_(x.T, x)
        self.tokens += x.shape[0]


def _block_inputs(model: nn.Module, batches: torch.Tensor) -> tuple[list[torch.Tensor], tuple]:
    """Hidden states entering block 0 for every window, and the block's other arguments (rope, mask, positions)."""
    seen: dict = {}

    def grab(_m, args):
        seen["x"], seen["rest"] = args[0].detach(), args[1:]
        raise _Stop

    handle = model.layers[0].register_forward_pre_hook(grab)
    xs = []
    try:
        for w in range(batches.shape[0]):
            try:
                model(batches[w: w + 1])
            except _Stop:
                xs.append(seen["x"])
    finally:
        handle.remove()
    rope, mask, _kv, cache_position = seen["rest"]
    return xs, (rope, mask, cache_position)


@torch.no_grad()
def quantize_model(model: nn.Module, layers: list[str], batches: torch.Tensor, kind: str, group_size: int = 128,
                   act_order: bool = False, damp: float = DEFAULT_DAMP) -> dict[str, dict[str, torch.Tensor]]:
    """GPTQ every linear named in ``layers``, block by block, on calibration windows ``batches`` [N, T].

    ``model`` (an fp32 :class:`~nbtrt.model.Decoder`) is changed in place: each quantized linear's
    weight becomes its dequantized GPTQ weight, so later blocks see the quantized earlier ones.
    Returns name -> the tensors to store (``weight``, ``weight_scale``).
    """
    chosen = set(layers)
    xs, (rope, mask, cache_position) = _block_inputs(model, batches)
    out: dict[str, dict[str, torch.Tensor]] = {}

    def fresh_kv():
        return ConcatKVCache([(model._empty_kv(1, xs[0].device),) * 2] * len(model.layers))

    def run_linears(names: list[str], forward) -> None:
        stats = {n: _Hessian(model.get_submodule(n)) for n in names}
        try:
            for x in xs:
                forward(x)
        finally:
            for s in stats.values():
                s.handle.remove()
        for name, s in stats.items():
            linear = model.get_submodule(name)
            codes, scale = gptq_codes(linear.weight, 2 * s.h / max(s.tokens, 1), kind, group_size, act_order, damp)
            out[name] = stored_tensors(codes, scale, kind)
            linear.weight.data = dequantize_codes(codes, scale, group_size).to(linear.weight.dtype)

    for i, block in enumerate(tqdm(model.layers, desc=f"GPTQ ({kind})", unit="block")):
        names = [n for n in linear_names(block) if f"layers.{i}.{n}" in chosen]
        run_linears([f"layers.{i}.{n}" for n in names],
                    lambda x, b=block: b(x, rope, mask, fresh_kv(), cache_position))
        xs = [block(x, rope, mask, fresh_kv(), cache_position) for x in xs]
    if "lm_head" in chosen:
        run_linears(["lm_head"], lambda x: model.lm_head(model.final_norm(x)))
    return out


def _calibration_windows(ckpt, calib, num_samples, seq_len, seed) -> tuple[torch.Tensor, dict]:
    """The windows GPTQ's own block-by-block pass runs on (the same windows calibrate() would read)."""
    if isinstance(calib, Calibration):
        if calib.source == "custom":
            raise QuantizationError("GPTQ needs the calibration text itself, which a Calibration of custom texts "
                                    "does not keep; pass the list of texts as calib= instead")
        calib, num_samples, seq_len, seed = calib.source, calib.num_samples, calib.seq_len, calib.seed
    src = get_source(calib)
    batches = windows(tokenizer_for(ckpt), calib, "calib", num_samples, seq_len, seed)
    return batches, {"source": src.name, "description": src.description, "num_samples": num_samples,
                     "seq_len": seq_len, "tokens": num_samples * seq_len, "seed": seed}


def quantize_checkpoint(ckpt: str | Path, out: str | Path, fmt: str, cfg, tensors: dict[str, torch.Tensor],
                        model: nn.Module, layers: list[str], calib, *, kv_cache: str | None, group_size: int,
                        act_order: bool,
                        num_samples: int, seq_len: int, seed: int, overwrite: bool,
                        damp: float = DEFAULT_DAMP) -> Path:
    """Write ``fmt`` (``int4_gptq`` | ``int8_gptq``) of a loaded checkpoint; called by :func:`nbtrt.quantize`."""
    if kv_cache is not None:
        raise QuantizationError(f"{fmt} does not combine with kv_cache={kv_cache!r} yet; quantize the KV cache "
                                "with int4_awq / int8_wo, or leave kv_cache=None")
    layout = LAYOUTS[fmt]
    kind = layout[:4]
    batches, cal_summary = _calibration_windows(ckpt, calib, num_samples, seq_len, seed)
    new = {f"{name}.{suffix}": t
           for name, ts in quantize_model(model, layers, batches, kind, group_size, act_order, damp).items()
           for suffix, t in ts.items()}
    dtype = TORCH_DTYPES[cfg.dtype]
    kept = {n: t.to(dtype) for n, t in tensors.items() if n.removesuffix(".weight") not in layers}
    qblock = {
        "layout_version": LAYOUT_VERSION, "format": layout, "kv_cache": None,
        "group_size": group_size if kind == "int4" else None, "alpha": None, "activation_scheme": None,
        "layers": layers, "kept_high_precision": ["embed"] + [n for n in linear_names(model) if n not in layers],
        "calibration": cal_summary,
        "gptq": {"requested_format": fmt, "act_order": act_order, "static_groups": act_order, "damp": damp,
                 "block_size": DEFAULT_BLOCK, "sequential": "block by block"},
    }
    qcfg = replace(cfg, quantization=qblock)
    all_tensors = {**kept, **new}
    check_quantized_tensors(qcfg, all_tensors, f"{ckpt} quantized ({fmt})")
    options = {"format": fmt, "group_size": group_size, "act_order": act_order, "damp": damp}
    with atomic_dir(out, overwrite=overwrite, inputs=(ckpt,)) as tmp:
        save_checkpoint(tmp, qcfg, all_tensors, stage="quantize", source=ckpt, options=options,
                        tokenizer_dir=Path(ckpt))
    return Path(out)
