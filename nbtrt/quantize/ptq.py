"""The post-training quantization algorithm behind :func:`nbtrt.quantize`: load the float checkpoint,
calibrate, smooth (SmoothQuant) or search scales (AWQ), quantize the chosen linears into
:mod:`nbtrt.layouts`' layout, write the quantized checkpoint.

>>> quantize("work/ckpt", "work/ckpt-int4", "int4_awq", num_samples=64)  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._io import atomic_dir, check_output
from ..checkpoint import check_finite, checkpoint_hash, load_checkpoint, save_checkpoint
from ..layouts import (ACTIVATION_SCHEMES, EPS, FORMATS, FP8_MAX, INT8_MAX, KV_FORMATS, LAYOUT_VERSION,
                      QuantizationError, check_quantized_tensors, linear_names, quantize_weight)
from ..model import TORCH_DTYPES, decoder_from_tensors
from . import awq, gptq, smoothquant
from .calib import DEFAULT_NUM_SAMPLES, DEFAULT_SAMPLE_TOKENS, DEFAULT_SEQ_LEN, Calibration, calibrate

DEFAULT_GROUP_SIZE = 128
DEFAULT_ALPHA = 0.5
INPUT_RANGE = {"int8": INT8_MAX, "fp8": FP8_MAX}


def _check_options(fmt, kv_cache, group_size, alpha, activation_scheme) -> None:
    if fmt is not None and fmt not in FORMATS:
        raise QuantizationError(f"unknown format {fmt!r}; choose one of {sorted(FORMATS)} (or None with kv_cache=...)")
    if kv_cache is not None and kv_cache not in KV_FORMATS:
        raise QuantizationError(f"unknown kv_cache {kv_cache!r}; choose one of {sorted(KV_FORMATS)} or None")
    if fmt is None and kv_cache is None:
        raise QuantizationError("nothing to do: give a format, a kv_cache format, or both")
    if not (isinstance(group_size, int) and group_size >= 2 and group_size % 2 == 0):
        raise QuantizationError(f"group_size must be an even integer >= 2 (e.g. 64, 128), got {group_size!r}")
    if not 0.0 <= alpha <= 1.0:
        raise QuantizationError(f"SmoothQuant alpha must lie in [0, 1], got {alpha}")
    if activation_scheme not in ACTIVATION_SCHEMES:
        raise QuantizationError(f"activation_scheme must be one of {ACTIVATION_SCHEMES}, got {activation_scheme!r}")


def _select(model, cfg, fmt, exclude, lm_head) -> list[str]:
    """The linears to quantize: all but lm_head (unless asked) and the excluded prefixes."""
    if fmt is None:
        return []
    names = linear_names(model)
    matches = lambda n, e: n == e or n.startswith(e + ".")  # noqa: E731
    unknown = [e for e in exclude if not any(matches(n, e) for n in names)]
    if unknown:
        raise QuantizationError(f"exclude entries {unknown} match no linear; linears are named like "
                                f"{names[0]!r}, and 'layers.3' excludes all of block 3")
    if lm_head and cfg.tie_embeddings:
        raise QuantizationError("lm_head shares its weight with the token embeddings in this checkpoint "
                                "(tie_embeddings); it cannot be quantized on its own — leave lm_head=False")
    chosen = [n for n in names if (lm_head or n != "lm_head") and not any(matches(n, e) for e in exclude)]
    if fmt and FORMATS[fmt].weight == "int4":
        odd = [n for n in chosen if model.get_submodule(n).in_features % 2]
        if odd:
            raise QuantizationError(
                f"{fmt} cannot take this architecture: {odd[0]} has {model.get_submodule(odd[0]).in_features} "
                "input features, and int4 packs two weights per byte along them; use int8_wo or fp8, "
                f"or exclude {odd[:3]}")
    return chosen


def quantize(ckpt: str | Path, out: str | Path, fmt: str | None, calib: str | list[str] | Calibration = "kjv", *,
             kv_cache: str | None = None, group_size: int = DEFAULT_GROUP_SIZE, alpha: float = DEFAULT_ALPHA,
             activation_scheme: str = "per_token", exclude: tuple[str, ...] | list[str] = (), lm_head: bool = False,
             num_samples: int = DEFAULT_NUM_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
             sample_tokens: int = DEFAULT_SAMPLE_TOKENS, awq_grid: int = awq.DEFAULT_GRID, seed: int = 0,
             overwrite: bool = False, act_order: bool = False) -> Path:
    """Quantize an nbtrt checkpoint into a new one (written atomically); returns ``out``.

    fmt: ``int8_wo`` | ``int4_wo`` | ``int4_awq`` | ``int4_gptq`` | ``int8_gptq`` | ``int8_sq`` | ``fp8`` | None
        (KV cache only). GPTQ (``act_order``: columns by decreasing activation) writes int4_wo / int8_wo tensors.
    calib: a text source (``"kjv"``, ``"stdlib"``), a list of texts, or a :class:`Calibration`
        from :func:`calibrate` on this checkpoint (reuse one pass for several formats).
        Formats without calibration (int8_wo, int4_wo, no kv_cache) never read it.
    kv_cache: ``"int8"`` | ``"fp8"`` | None — per-layer K and V scales, combinable with any fmt.
    group_size: INT4 group along the input dimension. alpha: SmoothQuant migration strength.
    activation_scheme: int8_sq activations ``"per_token"`` (dynamic) or ``"per_tensor"`` (static, calibrated).
    exclude: linears (or prefixes: ``"layers.0"``) kept in high precision; lm_head and the
        embeddings always are, unless ``lm_head=True``.

    >>> q = quantize("work/ckpt", "work/ckpt-sq", "int8_sq", alpha=0.8, kv_cache="int8")  # doctest: +SKIP
    """
    _check_options(fmt, kv_cache, group_size, alpha, activation_scheme)
    out = Path(out)
    check_output(out, (ckpt,), overwrite=overwrite)  # before the (long) work, not after it
    cfg, tensors = load_checkpoint(ckpt, verify_hash=True)
    check_finite(tensors, str(ckpt), QuantizationError)
    if cfg.quantization:
        raise QuantizationError(f"{ckpt} is already quantized ({cfg.quantization.format or 'kv cache'}); "
                                "quantize the original, unquantized checkpoint instead")
    model = decoder_from_tensors(cfg, tensors, dtype="float32")
    layers = _select(model, cfg, fmt, tuple(exclude), lm_head)
    if fmt in gptq.LAYOUTS:  # GPTQ runs its own block-by-block pass (quantize/gptq.py)
        return gptq.quantize_checkpoint(ckpt, out, fmt, cfg, tensors, model, layers, calib, kv_cache=kv_cache,
                                        group_size=group_size, act_order=act_order, num_samples=num_samples,
                                        seq_len=seq_len, seed=seed, overwrite=overwrite)

    cal = None
    if kv_cache or (fmt and FORMATS[fmt].needs_calibration):
        cal = _calibration(model, ckpt, calib, num_samples, seq_len, sample_tokens, seed)
    smoothed = smoothquant.smooth(model, cal.inputs, alpha, set(layers)) if fmt == "int8_sq" else {}
    static_input = fmt == "fp8" or (fmt == "int8_sq" and activation_scheme == "per_tensor")

    new: dict[str, torch.Tensor] = {}
    awq_alphas: dict[str, float] = {}
    with torch.no_grad():
        for name in tqdm(layers, desc=f"quantizing ({fmt})", unit="linear"):
            w = model.get_submodule(name).weight.detach()
            if not torch.isfinite(w).all():
                raise QuantizationError(f"{name}.weight holds NaN/Inf values in {ckpt}: the checkpoint is broken "
                                        "there (re-convert it); nothing was written")
            if fmt == "int4_awq":
                stats = cal.inputs[name]
                if not stats.samples:
                    raise QuantizationError("int4_awq searches its scales on kept activation rows; "
                                            "calibrate with sample_tokens > 0")
                found = awq.search(w, stats.sample_rows, stats.chan_mean, group_size, awq_grid)
                w, awq_alphas[name] = w * found.scale, found.alpha
                new[f"{name}.pre_quant_scale"] = 1.0 / found.scale
            for suffix, t in quantize_weight(w, fmt, group_size).items():
                new[f"{name}.{suffix}"] = t
            if static_input:
                x_max = cal.inputs[name].chan_max / smoothed.get(name, 1.0)
                new[f"{name}.input_scale"] = (x_max.max() / INPUT_RANGE[FORMATS[fmt].activation]).clamp(min=EPS)
    for name, chan_amax in (cal.kv_amax.items() if kv_cache else ()):
        s_v = smoothed.get(name.replace(".v_quant", ".o")) if name.endswith(".v_quant") else None
        if s_v is not None:  # smoothing divided V's channels by s_v (folded into qkv's V rows)
            chan_amax = chan_amax / s_v.view(cfg.num_kv_heads, -1, cfg.head_dim)[:, 0]
        new[f"{name}.scale"] = torch.tensor(max(float(chan_amax.max()) / KV_FORMATS[kv_cache], EPS))

    state = model.state_dict()
    dtype = TORCH_DTYPES[cfg.dtype]
    kept = {n: state[n].to(dtype) for n in tensors if n.removesuffix(".weight") not in layers}
    qblock = {
        "layout_version": LAYOUT_VERSION, "format": fmt, "kv_cache": kv_cache,
        "group_size": group_size if fmt and FORMATS[fmt].weight == "int4" else None,
        "alpha": alpha if fmt == "int8_sq" else None,
        "activation_scheme": activation_scheme if fmt == "int8_sq" else ("per_tensor" if fmt == "fp8" else None),
        "layers": layers,
        "kept_high_precision": ["embed"] + [n for n in linear_names(model) if n not in layers],
        "calibration": cal.summary() if cal else None,
    }
    if fmt == "int4_awq":
        qblock["awq"] = {"grid": awq_grid, "alphas": awq_alphas}
    qcfg = replace(cfg, quantization=qblock)
    all_tensors = {**kept, **new}
    check_quantized_tensors(qcfg, all_tensors, f"{ckpt} quantized")
    options = {"format": fmt, "kv_cache": kv_cache, "group_size": group_size, "alpha": alpha,
               "activation_scheme": activation_scheme, "exclude": list(exclude), "lm_head": lm_head}
    with atomic_dir(out, overwrite=overwrite, inputs=(ckpt,)) as tmp:
        save_checkpoint(tmp, qcfg, all_tensors, stage="quantize", source=ckpt, options=options,
                        tokenizer_dir=Path(ckpt))
    return out


def _calibration(model, ckpt, calib, num_samples, seq_len, sample_tokens, seed) -> Calibration:
    if isinstance(calib, Calibration):
        if calib.checkpoint_sha256 != checkpoint_hash(ckpt):
            raise QuantizationError(f"this Calibration was measured on another checkpoint than {ckpt}; "
                                    "run calibrate() on this one")
        return calib
    return calibrate(ckpt, calib, num_samples=num_samples, seq_len=seq_len, sample_tokens=sample_tokens, seed=seed,
                     model=model)
