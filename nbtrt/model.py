"""The one nbtrt decoder: reference for conversion, module for calibration, graph for export.

Module names are the checkpoint's tensor names and the debugger's capture names:

    embed                      token (+ learned position) embeddings
    layers.{i}.attn_norm       input norm output
    layers.{i}.attn            attention output (after the o projection)
    layers.{i}.mlp             MLP output
    layers.{i}                 residual stream after the block
    final_norm, lm_head        final norm output, logits

Every linear is a plain ``nn.Linear`` so quantization can swap them in place.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_checkpoint
from .config import DecoderConfig
from .layouts import prepare_model

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------ KV caches
class StaticKVCache(nn.Module):
    """Preallocated [batch, kv_heads, max_seq_len, head_dim] buffers, written at ``cache_position``.

    Every KV cache answers ``attend(layer, q, k, v, mask, scale, cache_position)``: store the new
    keys and values, return the attention output [B, H, T, D]. That is what a runtime replaces.

    The attention mask passed to the decoder covers all ``max_seq_len`` slots.
    """

    def __init__(self, cfg: DecoderConfig, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch_size, cfg.num_kv_heads, max_seq_len, cfg.head_dim)
        dtype = dtype or TORCH_DTYPES[cfg.dtype]
        for i in range(cfg.num_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor):
        k_all, v_all = getattr(self, f"k{layer}"), getattr(self, f"v{layer}")
        k_all.index_copy_(2, cache_position, k.to(k_all.dtype))
        v_all.index_copy_(2, cache_position, v.to(v_all.dtype))
        return k_all, v_all

    def attend(self, layer: int, q, k, v, mask, scale: float, cache_position):
        return dense_attention(q, *self.update(layer, k, v, cache_position), mask, scale)

    def reset(self) -> None:
        for buf in self.buffers():
            buf.zero_()


class ConcatKVCache:
    """Past tensors in, present tensors out (the ONNX / HF contract: past_key_values -> present)."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(past)  # type: ignore[list-item]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor):
        past_k, past_v = self.past[layer]
        self.present[layer] = (torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2))
        return self.present[layer]

    def attend(self, layer: int, q, k, v, mask, scale: float, cache_position):
        return dense_attention(q, *self.update(layer, k, v, cache_position), mask, scale)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """Attention of ``q`` [B, H, T, D] over a contiguous cache ``k``/``v`` [B, KV, S, D]; ``mask``
    [B, 1, T, S] bool (True: seen), or None for plain causal attention (no padding, no past)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # explicit GQA expansion: exports to plain ONNX ops
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)


# ------------------------------------------------------------------------------ layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 like the HF reference, then scale in the input dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: DecoderConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, cfg.norm_eps) if cfg.norm == "rms" else nn.LayerNorm(dim, eps=cfg.norm_eps)


class Rope(nn.Module):
    """Rotary embedding tables computed from explicit position ids (rope_type default/linear/llama3)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        dim = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        scaling = cfg.rope_scaling or {}
        kind = scaling.get("rope_type", "default")
        if kind == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # position math stays fp32 whatever dtype the model is cast to (as in HF)
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, T, dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, index: int):
        super().__init__()
        self.cfg, self.index = cfg, index
        self.qkv = nn.Linear(cfg.hidden_size, cfg.qkv_size, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
        # hook points for KV-cache quantization (nbtrt.quantize swaps in fake-quantizers)
        self.k_quant, self.v_quant = nn.Identity(), nn.Identity()

    def forward(self, x, rope, mask, kv, cache_position):
        cfg = self.cfg
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(B, T, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        # The KV cache object is the attention's swap point: it stores this step's keys and values
        # and attends over what it holds (a static cache, ONNX's past/present, a runtime's paged pool
        # with its own kernels). mask None means plain causal (no padding, no past).
        out = kv.attend(self.index, q, self.k_quant(k), self.v_quant(v), mask, self.scale, cache_position)
        return self.o(out.transpose(1, 2).reshape(B, T, cfg.q_size))


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gated = cfg.gated_mlp
        if cfg.gated_mlp:
            self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.activation = cfg.activation
        self.act = ACTIVATIONS[cfg.activation]
        # The MLP's swap point: a runtime may set a module computing act(gate(x)) * up(x) in one
        # kernel (the torch runtime's INT4 / INT8 gated inputs); None runs the linears above.
        self.fused_gate_up: nn.Module | None = None

    def forward(self, x):
        if self.fused_gate_up is not None:
            return self.down(self.fused_gate_up(x))
        h = self.act(self.gate(x)) * self.up(x) if self.gated else self.act(self.up(x))
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, index: int):
        super().__init__()
        self.attn_norm = make_norm(cfg, cfg.hidden_size)
        self.attn = Attention(cfg, index)
        self.mlp_norm = make_norm(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, kv, cache_position):
        x = x + self.attn(self.attn_norm(x), rope, mask, kv, cache_position)
        return x + self.mlp(self.mlp_norm(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.position == "learned":
            self.pos = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids, position_ids):
        x = self.tok(input_ids)
        return x + self.pos(position_ids) if hasattr(self, "pos") else x


class Decoder(nn.Module):
    """The nbtrt decoder.

    >>> cfg = DecoderConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32,
    ...                     intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, rope_theta=1e4)
    >>> model = Decoder(cfg)
    >>> cache = StaticKVCache(cfg, batch_size=1, max_seq_len=16)
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> model(ids, kv=cache).shape
    torch.Size([1, 3, 64])
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        self.rope = Rope(cfg) if cfg.position == "rope" else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = make_norm(cfg, cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tok.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        position_ids: torch.Tensor | None = None,  # [B, T]
        attention_mask: torch.Tensor | None = None,  # [B, S]: which key slots hold real tokens
        cache_position: torch.Tensor | None = None,  # [T]: slot of each new token
        kv: StaticKVCache | ConcatKVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        if cache_position is None:
            cache_position = torch.arange(T, device=input_ids.device)
        if position_ids is None:
            position_ids = cache_position[None].expand(B, T)
        if kv is None:
            kv = ConcatKVCache([(self._empty_kv(B, input_ids.device),) * 2] * self.cfg.num_layers)
        S = kv.max_seq_len if isinstance(kv, StaticKVCache) else T + kv.past[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.bool, device=input_ids.device)
        mask = self.build_mask(attention_mask, cache_position)
        x = self.embed(input_ids, position_ids)
        rope = self.rope(position_ids, x.dtype) if self.rope is not None else None
        for layer in self.layers:
            x = layer(x, rope, mask, kv, cache_position)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.final_norm(x))

    def build_mask(self, attention_mask: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, S] boolean: causal over slots, real keys only, always the token itself."""
        S = attention_mask.shape[1]
        key = torch.arange(S, device=attention_mask.device)[None, :]
        query = cache_position[:, None]
        allowed = key <= query
        if self.cfg.sliding_window:
            allowed = allowed & (query - key < self.cfg.sliding_window)
        # the diagonal keeps left-padding rows from being all -inf (NaN in softmax)
        return (attention_mask.bool()[:, None, None, :] & allowed) | (key == query)

    @property
    def float_dtype(self) -> torch.dtype:
        """The dtype activations run in: the embedding table's (lm_head may hold a quantized weight)."""
        return self.embed.tok.weight.dtype

    def _empty_kv(self, batch: int, device) -> torch.Tensor:
        cfg = self.cfg
        return torch.zeros(batch, cfg.num_kv_heads, 0, cfg.head_dim, dtype=self.float_dtype, device=device)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position of every slot of ``attention_mask`` [B, S]: the real tokens up to it, so left
    padding does not advance positions (what HF computes from the mask)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@contextlib.contextmanager
def capture_outputs(model: nn.Module, names: list[str],
                    transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the outputs of the named submodules while the block runs (forward hooks).

    Each output is passed through ``transform`` (default: detach, float32, to CPU) as it
    arrives, so captures never pin device memory.

    >>> with capture_outputs(model, ["embed", "layers.0.attn"]) as out:  # doctest: +SKIP
    ...     model(ids)
    """
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise KeyError(f"no module named {unknown[:3]}; capture names are module names such as "
                       f"'embed', 'layers.0.attn', 'layers.0', 'final_norm', 'lm_head'")
    transform = transform or (lambda t: t.detach().float().cpu())
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(
        lambda _m, _i, out, n=n: captured.__setitem__(n, transform(out))) for n in names]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def load_decoder(ckpt_dir: str | Path, device: str | torch.device = "cpu", dtype: str | None = None) -> Decoder:
    """Instantiate the decoder for an nbtrt checkpoint directory and load its weights.

    >>> model = load_decoder("work/ckpt")  # doctest: +SKIP
    """
    cfg, tensors = load_checkpoint(ckpt_dir)
    return decoder_from_tensors(cfg, tensors, device=device, dtype=dtype)


def decoder_from_tensors(cfg: DecoderConfig, tensors: dict[str, torch.Tensor],
                         device: str | torch.device = "cpu", dtype: str | None = None) -> Decoder:
    """A :class:`Decoder` holding ``tensors`` (checkpoint names), built without a first random init.

    >>> model = decoder_from_tensors(*load_checkpoint("work/ckpt"), dtype="float32")  # doctest: +SKIP
    """
    with torch.device("meta"):
        model = Decoder(cfg)
    if cfg.tie_embeddings:
        tensors = {**tensors, "lm_head.weight": tensors["embed.tok.weight"]}
    if cfg.quantization:  # quantized linears replace nn.Linear children before the weights load
        prepare_model(model, cfg)
    model.load_state_dict(tensors, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.tok.weight
    model.rope = Rope(cfg) if cfg.position == "rope" else None  # its table is derived, not stored
    target = TORCH_DTYPES[dtype or cfg.dtype]
    return model.to(device=device, dtype=target).eval()
