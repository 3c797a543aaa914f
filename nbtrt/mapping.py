"""HF -> nbtrt name mappings, as data, and the registry of supported architectures.

Each architecture is a table of rows ``(hf name, nbtrt name, transform, when)`` with a
``{layer}`` slot, plus a table of activation names the debugger aligns, plus one
function that translates the HF config.json into a :class:`DecoderConfig`.

Transforms:
    ""    copy as is
    "T"   transpose (GPT-2 stores Linear weights as Conv1D, [in, out])
    "q" / "k" / "v"  one part of the fused QKV tensor, concatenated in that order on dim 0
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import ROPE_TYPES, DecoderConfig

QKV_PARTS = ("q", "k", "v")


@dataclass(frozen=True)
class Row:
    hf: str
    nbtrt: str
    transform: str = ""
    when: str = ""  # a DecoderConfig flag that must be true ("!flag": must be false)

    def applies(self, cfg: DecoderConfig) -> bool:
        if not self.when:
            return True
        negate = self.when.startswith("!")
        value = bool(getattr(cfg, self.when.lstrip("!")))
        return value != negate


@dataclass(frozen=True)
class Architecture:
    name: str  # HF `architectures` string
    rows: tuple[Row, ...]
    activations: tuple[tuple[str, str], ...]  # (nbtrt module, HF module), {layer} slot
    config_from_hf: Callable[[dict, str], DecoderConfig]
    ignore_hf: tuple[str, ...] = ()  # HF tensors with no nbtrt counterpart (buffers)

    def expand(self, cfg: DecoderConfig) -> list[Row]:
        """Rows for a concrete config, one per tensor, layer slots filled, in model order."""
        out = []
        for row in self.rows:
            if not row.applies(cfg):
                continue
            if "{layer}" in row.hf:
                out += [Row(row.hf.format(layer=i), row.nbtrt.format(layer=i), row.transform)
                        for i in range(cfg.num_layers)]
            else:
                out.append(row)
        # keep layer-major order (all of layer 0, then layer 1) so tables read top to bottom
        def order(r: Row) -> tuple:
            parts = r.nbtrt.split(".")
            return (0, int(parts[1])) if parts[0] == "layers" else ((-1, 0) if "embed" in r.nbtrt else (1, 0))
        return sorted(out, key=order)

    def activation_pairs(self, cfg: DecoderConfig) -> list[tuple[str, str]]:
        """(nbtrt module, HF module) in execution order, layer slots filled."""
        pairs = []
        per_layer = [a for a in self.activations if "{layer}" in a[0]]
        head = [a for a in self.activations if "{layer}" not in a[0] and a[0] == "embed"]
        tail = [a for a in self.activations if "{layer}" not in a[0] and a[0] != "embed"]
        pairs += head
        for i in range(cfg.num_layers):
            pairs += [(n.format(layer=i), h.format(layer=i)) for n, h in per_layer]
        return pairs + tail


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    ARCHITECTURES[arch.name] = arch
    return arch


class UnsupportedModelError(ValueError):
    """The HF model cannot be converted (unknown architecture, remote code, missing config)."""


def architecture_for(hf_config: dict) -> Architecture:
    """Pick the registered architecture for a HF config.json dict, refusing remote code."""
    if hf_config.get("auto_map"):
        raise UnsupportedModelError(
            "this model needs trust_remote_code (config.json has 'auto_map'); nbtrt never executes "
            f"downloaded code. Supported architectures: {sorted(ARCHITECTURES)}"
        )
    names = hf_config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise UnsupportedModelError(
        f"architecture {names or hf_config.get('model_type')!r} is not supported; "
        f"supported: {sorted(ARCHITECTURES)}"
    )


# ---------------------------------------------------------------------------- config helpers
def _need(hf: dict, key: str, arch: str):
    if key not in hf or hf[key] is None:
        raise UnsupportedModelError(f"{arch} config.json is missing {key!r}")
    return hf[key]


def _rope_from_hf(hf: dict, arch: str) -> tuple[float, dict | None]:
    """rope_theta and scaling from either transformers 5 `rope_parameters` or 4.x keys.

    No silent defaults: a missing theta or scaling parameter is an error.
    """
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = params.pop("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise UnsupportedModelError(
            f"{arch} config.json has no rope_theta (neither 'rope_theta' nor 'rope_parameters.rope_theta'); "
            "nbtrt will not guess the RoPE base"
        )
    scaling = {**legacy, **params}
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(f"{arch}: rope_type {rope_type!r} is not supported ({sorted(ROPE_TYPES)})")
    missing = [k for k in ROPE_TYPES[rope_type] if k not in scaling]
    if missing:
        raise UnsupportedModelError(f"{arch}: rope_type {rope_type!r} needs {missing}, missing from config.json")
    if rope_type == "default":
        return float(theta), None
    return float(theta), {"rope_type": rope_type, **{k: scaling[k] for k in ROPE_TYPES[rope_type]}}


def _activation(name: str) -> str:
    table = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu": "gelu"}
    if name not in table:
        raise UnsupportedModelError(f"activation {name!r} is not supported ({sorted(table)})")
    return table[name]


def _llama_like(hf: dict, dtype: str, arch: str, **flags) -> DecoderConfig:
    theta, scaling = _rope_from_hf(hf, arch)
    heads = _need(hf, "num_attention_heads", arch)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    return DecoderConfig(
        architecture=arch,
        vocab_size=_need(hf, "vocab_size", arch),
        hidden_size=_need(hf, "hidden_size", arch),
        intermediate_size=_need(hf, "intermediate_size", arch),
        num_layers=_need(hf, "num_hidden_layers", arch),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or 0,
        norm="rms",
        norm_eps=_need(hf, "rms_norm_eps", arch),
        activation=_activation(hf.get("hidden_act", "silu")),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=window,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype,
        **flags,
    )


def _llama(hf: dict, dtype: str) -> DecoderConfig:
    bias = bool(hf.get("attention_bias", False))
    return _llama_like(hf, dtype, hf["architectures"][0], qkv_bias=bias, o_bias=bias,
                       mlp_bias=bool(hf.get("mlp_bias", False)))


def _qwen2(hf: dict, dtype: str) -> DecoderConfig:
    return _llama_like(hf, dtype, "Qwen2ForCausalLM", qkv_bias=True)


def _qwen3(hf: dict, dtype: str) -> DecoderConfig:
    return _llama_like(hf, dtype, "Qwen3ForCausalLM", qkv_bias=bool(hf.get("attention_bias", False)),
                       o_bias=bool(hf.get("attention_bias", False)), qk_norm=True)


def _gpt2(hf: dict, dtype: str) -> DecoderConfig:
    arch = "GPT2LMHeadModel"
    for flag in ("scale_attn_by_inverse_layer_idx",):
        if hf.get(flag):
            raise UnsupportedModelError(f"GPT-2 with {flag}=True is not supported")
    hidden = _need(hf, "n_embd", arch)
    heads = _need(hf, "n_head", arch)
    return DecoderConfig(
        architecture=arch,
        vocab_size=_need(hf, "vocab_size", arch),
        hidden_size=hidden,
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        num_layers=_need(hf, "n_layer", arch),
        num_heads=heads,
        num_kv_heads=heads,
        norm="layer",
        norm_eps=_need(hf, "layer_norm_epsilon", arch),
        activation=_activation(hf.get("activation_function", "gelu_new")),
        gated_mlp=False,
        position="learned",
        max_position_embeddings=_need(hf, "n_positions", arch),
        attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
        qkv_bias=True, o_bias=True, mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        dtype=dtype,
    )


# ---------------------------------------------------------------------------- tables
L = "model.layers.{layer}"
LLAMA_ROWS = (
    Row("model.embed_tokens.weight", "embed.tok.weight"),
    Row(f"{L}.input_layernorm.weight", "layers.{layer}.attn_norm.weight"),
    Row(f"{L}.self_attn.q_proj.weight", "layers.{layer}.attn.qkv.weight", "q"),
    Row(f"{L}.self_attn.k_proj.weight", "layers.{layer}.attn.qkv.weight", "k"),
    Row(f"{L}.self_attn.v_proj.weight", "layers.{layer}.attn.qkv.weight", "v"),
    Row(f"{L}.self_attn.q_proj.bias", "layers.{layer}.attn.qkv.bias", "q", when="qkv_bias"),
    Row(f"{L}.self_attn.k_proj.bias", "layers.{layer}.attn.qkv.bias", "k", when="qkv_bias"),
    Row(f"{L}.self_attn.v_proj.bias", "layers.{layer}.attn.qkv.bias", "v", when="qkv_bias"),
    Row(f"{L}.self_attn.q_norm.weight", "layers.{layer}.attn.q_norm.weight", when="qk_norm"),
    Row(f"{L}.self_attn.k_norm.weight", "layers.{layer}.attn.k_norm.weight", when="qk_norm"),
    Row(f"{L}.self_attn.o_proj.weight", "layers.{layer}.attn.o.weight"),
    Row(f"{L}.self_attn.o_proj.bias", "layers.{layer}.attn.o.bias", when="o_bias"),
    Row(f"{L}.post_attention_layernorm.weight", "layers.{layer}.mlp_norm.weight"),
    Row(f"{L}.mlp.gate_proj.weight", "layers.{layer}.mlp.gate.weight"),
    Row(f"{L}.mlp.up_proj.weight", "layers.{layer}.mlp.up.weight"),
    Row(f"{L}.mlp.down_proj.weight", "layers.{layer}.mlp.down.weight"),
    Row(f"{L}.mlp.gate_proj.bias", "layers.{layer}.mlp.gate.bias", when="mlp_bias"),
    Row(f"{L}.mlp.up_proj.bias", "layers.{layer}.mlp.up.bias", when="mlp_bias"),
    Row(f"{L}.mlp.down_proj.bias", "layers.{layer}.mlp.down.bias", when="mlp_bias"),
    Row("model.norm.weight", "final_norm.weight"),
    Row("lm_head.weight", "lm_head.weight", when="!tie_embeddings"),
)
LLAMA_ACTIVATIONS = (
    ("embed", "model.embed_tokens"),
    ("layers.{layer}.attn_norm", f"{L}.input_layernorm"),
    ("layers.{layer}.attn", f"{L}.self_attn"),
    ("layers.{layer}.mlp", f"{L}.mlp"),
    ("layers.{layer}", L),
    ("final_norm", "model.norm"),
    ("lm_head", "lm_head"),
)

H = "transformer.h.{layer}"
GPT2_ROWS = (
    Row("transformer.wte.weight", "embed.tok.weight"),
    Row("transformer.wpe.weight", "embed.pos.weight"),
    Row(f"{H}.ln_1.weight", "layers.{layer}.attn_norm.weight"),
    Row(f"{H}.ln_1.bias", "layers.{layer}.attn_norm.bias"),
    Row(f"{H}.attn.c_attn.weight", "layers.{layer}.attn.qkv.weight", "T"),
    Row(f"{H}.attn.c_attn.bias", "layers.{layer}.attn.qkv.bias"),
    Row(f"{H}.attn.c_proj.weight", "layers.{layer}.attn.o.weight", "T"),
    Row(f"{H}.attn.c_proj.bias", "layers.{layer}.attn.o.bias"),
    Row(f"{H}.ln_2.weight", "layers.{layer}.mlp_norm.weight"),
    Row(f"{H}.ln_2.bias", "layers.{layer}.mlp_norm.bias"),
    Row(f"{H}.mlp.c_fc.weight", "layers.{layer}.mlp.up.weight", "T"),
    Row(f"{H}.mlp.c_fc.bias", "layers.{layer}.mlp.up.bias"),
    Row(f"{H}.mlp.c_proj.weight", "layers.{layer}.mlp.down.weight", "T"),
    Row(f"{H}.mlp.c_proj.bias", "layers.{layer}.mlp.down.bias"),
    Row("transformer.ln_f.weight", "final_norm.weight"),
    Row("transformer.ln_f.bias", "final_norm.bias"),
    Row("lm_head.weight", "lm_head.weight", when="!tie_embeddings"),
)
GPT2_ACTIVATIONS = (
    ("embed", "transformer.drop"),  # token + position embeddings (dropout is identity in eval)
    ("layers.{layer}.attn_norm", f"{H}.ln_1"),
    ("layers.{layer}.attn", f"{H}.attn"),
    ("layers.{layer}.mlp", f"{H}.mlp"),
    ("layers.{layer}", H),
    ("final_norm", "transformer.ln_f"),
    ("lm_head", "lm_head"),
)

for _name in ("LlamaForCausalLM", "MistralForCausalLM"):
    register(Architecture(_name, LLAMA_ROWS, LLAMA_ACTIVATIONS, _llama))
register(Architecture("Qwen2ForCausalLM", LLAMA_ROWS, LLAMA_ACTIVATIONS, _qwen2))
register(Architecture("Qwen3ForCausalLM", LLAMA_ROWS, LLAMA_ACTIVATIONS, _qwen3))
register(Architecture("GPT2LMHeadModel", GPT2_ROWS, GPT2_ACTIVATIONS, _gpt2,
                      ignore_hf=(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",)))
