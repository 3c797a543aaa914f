"""The tensor layout of nbtrt checkpoints: the float decoder's tensors (:func:`expected_shapes`, read off
the config) and each quantized format's (``layout_version`` 1), with the reference modules that run
them. quantize writes this layout; checkpoint, export and every runtime read it from here.

A quantized checkpoint is an ordinary nbtrt checkpoint (config.json + rank0.safetensors)
whose ``decoder.quantization`` block is not empty. Every tensor not named below keeps its
name, shape and the checkpoint's dtype (embeddings, norms, biases, lm_head unless asked).

Quantized linears
-----------------
``quantization["layers"]`` lists the quantized linears by module name (``layers.3.attn.qkv``,
``layers.3.mlp.down``, ...). For each such ``P`` with an ``nn.Linear`` weight W of shape
``[out, in]`` the checkpoint holds, instead of ``P.weight``:

=========  ==============================  =========================  ==========================  ====================
format     ``P.weight``                    ``P.weight_scale`` (fp32)  also (fp32)                 activations x
=========  ==============================  =========================  ==========================  ====================
int8_wo    int8 ``[out, in]``              ``[out]``                  —                           unchanged (W8A16)
int4_wo    uint8 ``[out, in/2]`` (packed)  ``[out, ceil(in/g)]``      —                           unchanged (W4A16)
int4_awq   uint8 ``[out, in/2]`` (packed)  ``[out, ceil(in/g)]``      ``P.pre_quant_scale [in]``  ``x * pre_quant_scale``
int8_sq    int8 ``[out, in]``              ``[out]``                  ``P.input_scale []`` [1]_   int8, see below
fp8        float8_e4m3fn ``[out, in]``     ``[]``                     ``P.input_scale []``        fp8 e4m3, per tensor
=========  ==============================  =========================  ==========================  ====================

.. [1] only with ``activation_scheme == "per_tensor"``; ``"per_token"`` computes scales at run time.

Dequantization (what ONNX ``DequantizeLinear`` computes; all scales are symmetric, no zero points):

* int8, per output channel: ``W[o, i] = weight[o, i] * weight_scale[o]``.
* int4, group-wise along ``in`` with group size ``g = quantization["group_size"]``:
  ``W[o, i] = q[o, i] * weight_scale[o, i // g]``. The last group of a row may be shorter
  (``in`` need not be a multiple of ``g``), exactly ONNX's blocked quantization with
  ``axis=1, block_size=g``. ``q`` is int4 in [-8, 7] (RTN/AWQ produce [-7, 7]), packed two per
  byte along ``in``: ``weight[o, j] = (q[o, 2j] & 0xF) | (q[o, 2j+1] & 0xF) << 4`` — the low
  nibble holds the even element, two's complement: the byte order of an ONNX ``INT4``
  initializer, so the bytes can be handed over unchanged. ``in`` must be even.
* fp8: ``W = weight.float() * weight_scale`` (one scale per tensor, ``amax / 448``).

The quantized layer computes, for input x (``...``, in):

* int4_awq first multiplies ``x`` by ``pre_quant_scale`` (AWQ's 1/s; TensorRT-LLM's
  ``prequant_scaling_factor``); the stored weight is ``quant(W * s)``.
* int8_sq, ``per_token``: ``s_x = amax(|x|, over in) / 127`` per token, ``xq = clamp(round(x / s_x), -127, 127)``;
  ``per_tensor``: the same with the calibrated ``input_scale``. Then ``y = (xq @ weight.T) * s_x * weight_scale``.
  SmoothQuant's smoothing is already folded into the preceding norm / linear: there is no smoother tensor.
* fp8: ``xq = fp8(clamp(x / input_scale, -448, 448))``, ``y = (xq @ weight.T) * input_scale * weight_scale``.

The reference modules below compute exactly that in floating point ("fake quantization":
quantize, dequantize, matmul), which is what an integer kernel computes up to accumulation order.

KV cache
--------
With ``quantization["kv_cache"]`` = ``"int8"`` or ``"fp8"``, every layer has two fp32 scalars
``layers.{i}.attn.k_quant.scale`` and ``layers.{i}.attn.v_quant.scale`` (calibrated
``amax / 127`` or ``amax / 448``). Keys are quantized after RoPE (and q/k norm), exactly what the
cache stores: ``k_cache = quant(k / k_scale)``, read back as ``k_cache * k_scale``.

The ``quantization`` block
--------------------------
``{"layout_version": 1, "format": "int4_awq" | ... | None, "kv_cache": None | "int8" | "fp8",
"group_size", "alpha", "activation_scheme", "layers": [...], "kept_high_precision": [...],
"calibration": {...}}`` — see :func:`nbtrt.quantize.quantize`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig

LAYOUT_VERSION = 1
INT8_MAX, INT4_MAX, FP8_MAX = 127.0, 7.0, 448.0  # symmetric ranges; 448 = largest float8_e4m3fn
FP8 = torch.float8_e4m3fn
EPS = 1e-12  # floor for scales of all-zero rows / groups, so dequantization stays finite


class QuantizationError(ValueError):
    """A quantization request cannot be honoured; the message says which input and what to do."""


@dataclass(frozen=True)
class Format:
    name: str
    weight: str  # "int8" | "int4" | "fp8"
    activation: str | None  # None (weight-only) | "int8" | "fp8"
    needs_calibration: bool
    description: str


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("int8_wo", "int8", None, False, "INT8 weights per output channel, 16/32-bit activations (W8A16)"),
    Format("int4_wo", "int4", None, False, "INT4 weights per group of input channels, round-to-nearest (W4A16)"),
    Format("int4_awq", "int4", None, True, "INT4 group-wise with activation-aware per-channel scales (AWQ)"),
    Format("int8_sq", "int8", "int8", True, "SmoothQuant W8A8: smoothed INT8 weights and INT8 activations"),
    Format("fp8", "fp8", "fp8", True, "FP8 E4M3 weights and activations, per-tensor scales"),
    # GPTQ (quantize/gptq.py) writes the int4_wo / int8_wo layout; these names exist to request it
    Format("int4_gptq", "int4", None, True, "INT4 group-wise, GPTQ error-compensated rounding (stored as int4_wo)"),
    Format("int8_gptq", "int8", None, True, "INT8 per channel, GPTQ error-compensated rounding (stored as int8_wo)"),
)}
KV_FORMATS = {"int8": INT8_MAX, "fp8": FP8_MAX}
ACTIVATION_SCHEMES = ("per_token", "per_tensor")


# ------------------------------------------------------------------------------ float tensors
def _norm_shapes(cfg: DecoderConfig, name: str, dim: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (dim,), **({f"{name}.bias": (dim,)} if cfg.norm == "layer" else {})}


def _linear_shapes(name: str, out: int, n: int, bias: bool) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (out, n), **({f"{name}.bias": (out,)} if bias else {})}


def expected_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of an unquantized checkpoint, in :class:`nbtrt.model.Decoder`'s state_dict
    order and names (tests/test_quantize.py checks the two agree), computed from the config alone.

    >>> cfg = DecoderConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32,
    ...                     intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2, rope_theta=1e4)
    >>> expected_shapes(cfg)["layers.0.attn.qkv.weight"]
    (64, 32)
    """
    H, I = cfg.hidden_size, cfg.intermediate_size
    shapes = {"embed.tok.weight": (cfg.vocab_size, H)}
    if cfg.position == "learned":
        shapes["embed.pos.weight"] = (cfg.max_position_embeddings, H)
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        shapes.update(_norm_shapes(cfg, f"{p}.attn_norm", H))
        shapes.update(_linear_shapes(f"{p}.attn.qkv", cfg.qkv_size, H, cfg.qkv_bias))
        shapes.update(_linear_shapes(f"{p}.attn.o", H, cfg.q_size, cfg.o_bias))
        if cfg.qk_norm:
            shapes.update({f"{p}.attn.q_norm.weight": (cfg.head_dim,), f"{p}.attn.k_norm.weight": (cfg.head_dim,)})
        shapes.update(_norm_shapes(cfg, f"{p}.mlp_norm", H))
        if cfg.gated_mlp:
            shapes.update(_linear_shapes(f"{p}.mlp.gate", I, H, cfg.mlp_bias))
        shapes.update(_linear_shapes(f"{p}.mlp.up", I, H, cfg.mlp_bias))
        shapes.update(_linear_shapes(f"{p}.mlp.down", H, I, cfg.mlp_bias))
    shapes.update(_norm_shapes(cfg, "final_norm", H))
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, H)
    return shapes


# ------------------------------------------------------------------------------ primitives
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], fp32 scale [out]), symmetric per output channel."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=EPS)
    return torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, ceil(in/g), g], zero-padding the last (shorter) group."""
    out, n = w.shape
    pad = -n % group_size
    return F.pad(w, (0, pad)).view(out, -1, group_size)


def _int4_codes(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes as floats [out, groups, g] and scales [out, groups]."""
    g = _groups(w.float(), group_size)
    scale = (g.abs().amax(dim=2) / INT4_MAX).clamp(min=EPS)
    return torch.round(g / scale[..., None]).clamp(-INT4_MAX - 1, INT4_MAX), scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (packed uint8 [out, in/2], fp32 scale [out, ceil(in/g)]), round-to-nearest."""
    out, n = w.shape
    if n % 2:
        raise QuantizationError(f"int4 packs two weights per byte along the input dimension, which has odd size {n}")
    q, scale = _int4_codes(w, group_size)
    return pack_int4(q.view(out, -1)[:, :n].to(torch.int8)), scale


def fake_quant_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``dequantize_int4(*quantize_int4(w))`` without packing: what searches evaluate many times."""
    q, scale = _int4_codes(w, group_size)
    return (q * scale[..., None]).view(w.shape[0], -1)[:, : w.shape[1]]


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    q = unpack_int4(packed).float()
    return q * scale.repeat_interleave(group_size, dim=1)[:, : q.shape[1]]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [out, in] -> uint8 [out, in/2]; low nibble = even element (ONNX INT4 order)."""
    u = q.to(torch.uint8) & 0xF
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> int8 [out, in] in [-8, 7]."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.shape[0], -1).to(torch.int8)
    return torch.where(nibbles > 7, nibbles - 16, nibbles)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (float8_e4m3fn [out, in], fp32 scalar scale = amax / 448)."""
    w = w.float()
    scale = (w.abs().amax() / FP8_MAX).clamp(min=EPS)
    return to_fp8(w / scale), scale


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    # saturate first: the cast itself would turn out-of-range values into NaN
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def fake_quant(x: torch.Tensor, kind: str, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize activations: ``kind`` "int8" or "fp8"; ``scale`` None = per-token dynamic (int8)."""
    xf = x.float()
    if scale is None:
        scale = (xf.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=EPS)
    if kind == "int8":
        q = torch.round(xf / scale).clamp(-INT8_MAX, INT8_MAX)
    else:
        q = to_fp8(xf / scale).float()
    return (q * scale).to(x.dtype)


def quantize_weight(w: torch.Tensor, fmt: str, group_size: int) -> dict[str, torch.Tensor]:
    """A float weight -> the tensors that replace it (suffixes ``weight``, ``weight_scale``)."""
    kind = FORMATS[fmt].weight
    q, s = {"int8": quantize_int8, "fp8": quantize_fp8}[kind](w) if kind != "int4" else quantize_int4(w, group_size)
    return {"weight": q, "weight_scale": s}


def dequantize_weight(t: dict[str, torch.Tensor], fmt: str, group_size: int) -> torch.Tensor:
    """Inverse of :func:`quantize_weight` (fp32), before any AWQ pre_quant_scale."""
    kind = FORMATS[fmt].weight
    if kind == "int8":
        return dequantize_int8(t["weight"], t["weight_scale"])
    if kind == "int4":
        return dequantize_int4(t["weight"], t["weight_scale"], group_size)
    return t["weight"].float() * t["weight_scale"]


def weight_specs(fmt: str, out: int, n: int, group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Suffix -> (shape, dtype) of the tensors a quantized [out, n] linear stores (bias excluded)."""
    kind = FORMATS[fmt].weight
    if kind == "int4":
        spec = {"weight": ((out, n // 2), torch.uint8), "weight_scale": ((out, -(-n // group_size)), torch.float32)}
    elif kind == "int8":
        spec = {"weight": ((out, n), torch.int8), "weight_scale": ((out,), torch.float32)}
    else:
        spec = {"weight": ((out, n), FP8), "weight_scale": ((), torch.float32)}
    if fmt == "int4_awq":
        spec["pre_quant_scale"] = ((n,), torch.float32)
    return spec


# ------------------------------------------------------------------------------ reference modules
class _KeepQuantized(nn.Module):
    """``model.to(dtype)`` must move quantized tensors and fp32 scales but never cast them."""

    KEEP: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {n: self._buffers[n] for n in self.KEEP if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for n, t in kept.items():
            self._buffers[n] = t.to(self._buffers[n].device)
        return self


class QuantLinear(_KeepQuantized):
    """Drop-in for ``nn.Linear`` holding a quantized weight (layout in the module docstring).

    The weight is dequantized on every call: a reference, not a fast kernel.
    """

    KEEP = ("weight", "weight_scale", "pre_quant_scale", "input_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str, group_size: int = 0,
                 activation_scheme: str = "per_token", device=None):
        super().__init__()
        self.in_features, self.out_features, self.fmt, self.group_size = in_features, out_features, fmt, group_size
        self.act = FORMATS[fmt].activation
        self.static = self.act == "fp8" or activation_scheme == "per_tensor"
        for name, (shape, dtype) in weight_specs(fmt, out_features, in_features, group_size).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        if self.act and self.static:
            self.register_buffer("input_scale", torch.empty((), device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_weight(self._buffers, self.fmt, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == "int4_awq":
            x = x * self.pre_quant_scale.to(x.dtype)
        if self.act:
            x = fake_quant(x, self.act, self.input_scale if self.static else None)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}, group={self.group_size}"


class KVQuant(_KeepQuantized):
    """Fake-quantizes keys or values on their way into the cache (replaces ``attn.k_quant`` / ``v_quant``)."""

    KEEP = ("scale",)

    def __init__(self, kind: str, device=None):
        super().__init__()
        self.kind = kind
        self.register_buffer("scale", torch.empty((), device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self.kind, self.scale)


# ------------------------------------------------------------------------------ model surgery
def linear_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` / :class:`QuantLinear` in model order (lm_head last)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]


def prepare_model(model: nn.Module, cfg: DecoderConfig) -> nn.Module:
    """Swap ``nn.Linear`` children named in ``cfg.quantization.layers`` for empty :class:`QuantLinear`
    (and the KV hook points for :class:`KVQuant`), on the model's device, ready for ``load_state_dict``.

    >>> with torch.device("meta"): model = Decoder(cfg)        # doctest: +SKIP
    >>> prepare_model(model, cfg); model.load_state_dict(tensors, assign=True)  # doctest: +SKIP
    """
    q = cfg.quantization
    if q.layout_version != LAYOUT_VERSION:
        raise QuantizationError(f"checkpoint quantization layout_version {q.layout_version!r} is not "
                                f"{LAYOUT_VERSION}; re-quantize it with this nbtrt")
    for name in q.layers:
        old = model.get_submodule(name)
        model.set_submodule(name, QuantLinear(old.in_features, old.out_features, old.bias is not None, q.format,
                                             q.group_size or 0, q.activation_scheme or "per_token",
                                             device=old.weight.device))
    if q.kv_cache:
        for layer in model.layers:
            device = layer.attn_norm.weight.device
            layer.attn.k_quant = KVQuant(q.kv_cache, device=device)
            layer.attn.v_quant = KVQuant(q.kv_cache, device=device)
    return model


def expected_tensors(cfg: DecoderConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Name -> (shape, dtype or None for "the checkpoint's float dtype") of every tensor a quantized
    checkpoint must hold: the layout above, read off the config."""
    q = cfg.quantization
    spec: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {n: (s, None) for n, s in expected_shapes(cfg).items()}
    for name in q.layers:
        out, n = spec.pop(f"{name}.weight")[0]
        for suffix, s in weight_specs(q.format, out, n, q.group_size or 0).items():
            spec[f"{name}.{suffix}"] = s
        if FORMATS[q.format].activation == "fp8" or q.activation_scheme == "per_tensor":
            spec[f"{name}.input_scale"] = ((), torch.float32)
    if q.kv_cache:
        for i in range(cfg.num_layers):
            for kv in "kv":
                spec[f"layers.{i}.attn.{kv}_quant.scale"] = ((), torch.float32)
    return spec


def check_quantized_tensors(cfg: DecoderConfig, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor the quantization block implies is present with its shape and dtype, nothing else."""
    q = cfg.quantization
    if q.format is not None and q.format not in FORMATS:
        raise QuantizationError(f"{where}: unknown quantization format {q.format!r} ({sorted(FORMATS)})")
    spec = expected_tensors(cfg)
    missing, extra = sorted(set(spec) - set(tensors)), sorted(set(tensors) - set(spec))
    if missing or extra:
        raise QuantizationError(f"{where}: quantized checkpoint does not match its quantization block "
                                f"(missing {missing[:4]}, unexpected {extra[:4]}); re-run nbtrt.quantize")
    for name, (shape, dtype) in spec.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape) or (dtype is not None and t.dtype != dtype):
            raise QuantizationError(f"{where}: {name} is {t.dtype} {tuple(t.shape)}, the layout says "
                                    f"{dtype or 'float'} {tuple(shape)}; re-run nbtrt.quantize")
