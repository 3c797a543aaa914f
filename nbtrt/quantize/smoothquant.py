"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.

A few input channels of a linear carry activations 10-100x larger than the rest; per-token
INT8 then spends its whole range on them and rounds every other channel to a handful of
levels. For a linear ``y = x W^T`` any per-input-channel ``s`` gives ``y = (x / s)(W * s)^T``;
choosing ``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)`` flattens the activation channels at the
cost of rougher weight columns, which per-channel weight quantization absorbs well.

``x / s`` costs nothing at run time when folded into whatever produced ``x``:

=============  =================================  =========================================
linear         its input comes from               where ``1 / s`` is folded
=============  =================================  =========================================
attn.qkv       attn_norm                          attn_norm weight (and bias)
mlp.gate, up   mlp_norm (one input, one ``s``)    mlp_norm weight (and bias)
attn.o         softmax(qk) v                      the v rows of attn.qkv; heads that share a
                                                  kv head (GQA) share one ``s``
mlp.down       act(gate) * up                     the rows of mlp.up (gated MLPs only: a plain
                                                  MLP's activation is not linear, so its down
                                                  projection is left unsmoothed)
=============  =================================  =========================================

All of this is exact in real arithmetic: the fp32 model computes the same function before
quantization (tested to 1e-4 on the logits).
"""
from __future__ import annotations

import torch
from torch import nn

from .calib import InputStats

MIN = 1e-5


def scales(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-channel smoothing scales; channels that never fire (or have zero weights) keep s = 1."""
    s = act_max.clamp(min=MIN).pow(alpha) / w_max.clamp(min=MIN).pow(1 - alpha)
    return torch.where((act_max > 0) & (w_max > 0), s, torch.ones_like(s)).float()


def _fold_into_norm(norm: nn.Module, s: torch.Tensor) -> None:
    norm.weight.div_(s)
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s)


def _fold_into_rows(linear: nn.Linear, rows: slice, s: torch.Tensor) -> None:
    linear.weight[rows].div_(s[:, None])
    if linear.bias is not None:
        linear.bias[rows].div_(s)


def _submodule(block: nn.Module, name: str) -> nn.Module | None:
    try:
        return block.get_submodule(name)
    except AttributeError:  # e.g. no mlp.gate in a plain (non-gated) MLP
        return None


def _norm_groups(block: nn.Module, prefix: str) -> list[tuple[nn.Module, dict[str, nn.Linear]]]:
    """Each norm with the linears that read its output, by full name: they share one ``s``."""
    return [(norm, {f"{prefix}.{n}": m for n in names if (m := _submodule(block, n)) is not None})
            for norm, names in ((block.attn_norm, ["attn.qkv"]), (block.mlp_norm, ["mlp.gate", "mlp.up"]))]


def _o_scales(cfg, attn: nn.Module, act_max: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``s`` over attn.o's inputs and over the v rows it folds into; the query heads that share
    a kv head (GQA) read the same v rows, so they share one ``s``."""
    kv, hd, group = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    act = act_max.view(kv, group, hd).amax(1)
    w = attn.o.weight.abs().amax(0).view(kv, group, hd).amax(1)
    s_v = scales(act, w, alpha).flatten()
    return s_v.view(kv, 1, hd).expand(kv, group, hd).flatten(), s_v


def _down_scales(mlp: nn.Module, act_max: torch.Tensor, alpha: float) -> torch.Tensor:
    return scales(act_max, mlp.down.weight.abs().amax(0), alpha)


def _group_scales(linears: dict[str, nn.Linear], inputs: dict[str, InputStats], alpha: float) -> torch.Tensor:
    w = torch.stack([m.weight.abs().amax(0) for m in linears.values()]).amax(0)
    return scales(inputs[next(iter(linears))].chan_max, w, alpha)


@torch.no_grad()
def smooth(model: nn.Module, inputs: dict[str, InputStats], alpha: float, targets: set[str]) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant scales into an fp32 decoder in place, for the linears in ``targets``.

    Returns ``{linear name: s}``: after smoothing that linear's input is ``x / s``, so its
    per-channel max becomes ``inputs[name].chan_max / s``.

    >>> s = smooth(model, calibration.inputs, alpha=0.5, targets={"layers.0.attn.qkv"})  # doctest: +SKIP
    """
    cfg = model.cfg
    applied: dict[str, torch.Tensor] = {}
    for i, block in enumerate(model.layers):
        p, attn, mlp = f"layers.{i}", block.attn, block.mlp
        # o and down first: they rescale rows of qkv / up, whose column maxima the norm folds below read
        if f"{p}.attn.o" in targets:
            s, s_v = _o_scales(cfg, attn, inputs[f"{p}.attn.o"].chan_max, alpha)
            attn.o.weight.mul_(s)
            _fold_into_rows(attn.qkv, slice(cfg.q_size + cfg.kv_size, None), s_v)
            applied[f"{p}.attn.o"] = s
        if cfg.gated_mlp and f"{p}.mlp.down" in targets:
            s = _down_scales(mlp, inputs[f"{p}.mlp.down"].chan_max, alpha)
            mlp.down.weight.mul_(s)
            _fold_into_rows(mlp.up, slice(None), s)
            applied[f"{p}.mlp.down"] = s
        for norm, linears in _norm_groups(block, p):
            if not targets & set(linears):
                continue
            s = _group_scales(linears, inputs, alpha)
            _fold_into_norm(norm, s)
            for name, m in linears.items():
                m.weight.mul_(s)
                applied[name] = s
    return applied


@torch.no_grad()
def preview(model: nn.Module, inputs: dict[str, InputStats], name: str, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s`` for one linear at ``alpha``, what ``smooth`` would fold for it alone;
    the model is only read, never copied (a copy of a 0.5B model in fp32 is 2 GB).

    >>> s = preview(model, cal.inputs, "layers.3.mlp.gate", 0.5); plots.activation_channels(cal, "layers.3.mlp.gate", s)  # doctest: +SKIP
    """
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit() or int(parts[1]) >= len(model.layers):
        raise ValueError(f"{name!r} is not a decoder linear like 'layers.3.mlp.gate'")
    block, local, prefix = model.layers[int(parts[1])], ".".join(parts[2:]), ".".join(parts[:2])
    if local == "attn.o":
        return _o_scales(model.cfg, block.attn, inputs[name].chan_max, alpha)[0]
    if local == "mlp.down" and model.cfg.gated_mlp:
        return _down_scales(block.mlp, inputs[name].chan_max, alpha)
    for _, linears in _norm_groups(block, prefix):
        if name in linears:
            return _group_scales(linears, inputs, alpha)
    raise ValueError(f"SmoothQuant does not smooth {name!r} (a plain MLP's down projection reads a "
                     "non-linear activation); pick attn.qkv, attn.o, mlp.gate, mlp.up or a gated mlp.down")
