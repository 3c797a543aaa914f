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

import copy
import math
from dataclasses import dataclass
from typing import Callable

from .config import ROPE_TYPES, DecoderConfig
from .errors import is_whole

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
    from_hf: Callable[..., DecoderConfig]  # (config.json dict, transformers config, dtype) -> DecoderConfig
    model_type: str  # transformers' model_type for this architecture
    fields: tuple[str, ...]  # the transformers config fields from_hf maps (reads)
    ignored: tuple[str, ...] = ()  # fields of this class that do not change its forward pass (besides IRRELEVANT)
    ignore_hf: tuple[str, ...] = ()  # HF tensors with no nbtrt counterpart (buffers)

    def config_from_hf(self, hf: dict, dtype: str) -> DecoderConfig:
        """The nbtrt config for a HF config.json dict, or UnsupportedModelError naming the field
        nbtrt does not reproduce (see :func:`parse_hf_config`).

        >>> ARCHITECTURES["LlamaForCausalLM"].config_from_hf(json.load(open("config.json")), "float32")  # doctest: +SKIP
        """
        return self.from_hf(hf, parse_hf_config(self, hf), dtype)

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


# ---------------------------------------------------------------------------- config.json -> DecoderConfig
# The rule: nbtrt computes exactly what transformers computes for a config.json, or refuses it
# naming the field. transformers' own config class reads the file (so its normalisation holds:
# which of rope_parameters / rope_scaling wins, per-layer sliding windows, defaults), then every
# field of that class is either mapped by nbtrt (each architecture's ``fields`` table), known not
# to change the forward pass (IRRELEVANT, plus the architecture's ``ignored``), or must keep the
# class's default value. Keys the class does not declare are not read by its model either
# (tests/test_validation.py checks that against the modeling source), except the ones in
# REFUSED_KEYS, which transformers' loading machinery acts on.
IRRELEVANT = (
    "architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type", "initializer_range",
    "attention_dropout", "tokenizer_class", "_attn_implementation", "_experts_implementation",
)
REFUSED_KEYS = ("quantization_config",)  # transformers would load these weights differently
LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                "rope_parameters", "tie_word_embeddings")
SLIDING_FIELDS = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")


def _hf_class(model_type: str):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def parse_hf_config(arch: "Architecture", hf: dict):
    """transformers' config object for a config.json dict, after checking that its model_type is
    the architecture's and that nbtrt reproduces every field that matters (else UnsupportedModelError)."""
    name = arch.name
    if hf.get("model_type") != arch.model_type:
        raise UnsupportedModelError(
            f"config.json says architectures={hf.get('architectures')!r} but model_type={hf.get('model_type')!r}; "
            f"{name} is model_type {arch.model_type!r}. transformers builds its model from model_type and nbtrt "
            "from architectures, so the two would differ: fix config.json")
    for key in REFUSED_KEYS:
        if hf.get(key):
            raise UnsupportedModelError(f"{name}: config.json has {key!r}; nbtrt converts unquantized HF weights only")
    from huggingface_hub.errors import StrictDataclassError

    cls = _hf_class(arch.model_type)
    try:
        config = cls.from_dict(copy.deepcopy(hf))  # it fills in nested dicts (rope_parameters) in place
    except (StrictDataclassError, ValueError, TypeError, KeyError) as e:
        raise UnsupportedModelError(f"{name}: transformers rejects this config.json: {e}") from None
    values, defaults = config.to_dict(), cls().to_dict()
    known = set(arch.fields) | set(IRRELEVANT) | set(arch.ignored)
    for key, value in values.items():
        if key in known or key not in defaults or value == defaults[key]:
            continue
        raise UnsupportedModelError(
            f"{name}: config.json sets {key}={value!r} (transformers' default: {defaults[key]!r}), which changes "
            f"what {name} computes and which nbtrt does not reproduce; nbtrt maps {sorted(arch.fields)}")
    return config


def _count(config, key: str, arch: str, minimum: int = 1) -> int:
    value = getattr(config, key, None)
    if not is_whole(value, minimum):
        raise UnsupportedModelError(f"{arch}: config.json {key}={value!r} must be an integer >= {minimum}")
    return value


def _positive(value, key: str, arch: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UnsupportedModelError(f"{arch}: config.json {key}={value!r} must be a finite number > 0")
    return float(value)


def _need(hf: dict, key: str, arch: str):
    """No silent defaults for the model's shape: a key config.json lacks is an error, not HF's default."""
    if key not in hf or hf[key] is None:
        raise UnsupportedModelError(f"{arch} config.json is missing {key!r}")
    return hf[key]


def _rope(hf: dict, config, arch: str) -> tuple[float, dict | None]:
    """rope_theta and scaling as transformers reads them (``config.rope_parameters``: a legacy
    ``rope_scaling`` wins over ``rope_parameters``, as it does there). No silent default for theta."""
    given = [hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}, hf]
    if not any(isinstance(d, dict) and d.get("rope_theta") is not None for d in given):
        raise UnsupportedModelError(
            f"{arch} config.json has no rope_theta (neither 'rope_theta' nor 'rope_parameters.rope_theta'); "
            "nbtrt will not guess the RoPE base")
    params = dict(config.rope_parameters or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(f"{arch}: rope_type {rope_type!r} is not supported ({sorted(ROPE_TYPES)})")
    missing = [k for k in ROPE_TYPES[rope_type] if k not in params]
    if missing:
        raise UnsupportedModelError(f"{arch}: rope_type {rope_type!r} needs {missing}, missing from config.json")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(f"{arch}: rope_parameters.partial_rotary_factor="
                                    f"{params['partial_rotary_factor']!r} is not supported (nbtrt rotates the whole head)")
    theta = _positive(params.get("rope_theta"), "rope_theta", arch)
    for k in ROPE_TYPES[rope_type]:
        _positive(params[k], f"rope_parameters.{k}", arch)
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **{k: params[k] for k in ROPE_TYPES[rope_type]}}


def _activation(name: str) -> str:
    table = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu": "gelu"}
    if name not in table:
        raise UnsupportedModelError(f"activation {name!r} is not supported ({sorted(table)})")
    return table[name]


def _layer_window(config, arch: str) -> int | None:
    """The one sliding window every layer uses, as transformers' Qwen2/Qwen3 decide it per layer."""
    windows = {config.sliding_window if t == "sliding_attention" else None for t in (config.layer_types or [])}
    if len(windows) > 1:
        raise UnsupportedModelError(
            f"{arch}: layer_types mixes sliding-window and full-attention layers (use_sliding_window="
            f"{config.use_sliding_window}, max_window_layers={config.max_window_layers}); nbtrt applies one "
            "attention kind to every layer")
    return windows.pop() if windows else None


def _llama_like(hf: dict, config, dtype: str, arch: str, window: int | None, **flags) -> DecoderConfig:
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "rms_norm_eps"):
        _need(hf, key, arch)
    theta, scaling = _rope(hf, config, arch)
    if window is not None:
        window = _count(config, "sliding_window", arch)
    return DecoderConfig(
        architecture=arch,
        vocab_size=_count(config, "vocab_size", arch),
        hidden_size=_count(config, "hidden_size", arch),
        intermediate_size=_count(config, "intermediate_size", arch),
        num_layers=_count(config, "num_hidden_layers", arch),
        num_heads=_count(config, "num_attention_heads", arch),
        num_kv_heads=_count(config, "num_key_value_heads", arch),
        # as transformers' attention: `getattr(config, "head_dim", None) or hidden_size // num_attention_heads`
        head_dim=_count(config, "head_dim", arch) if getattr(config, "head_dim", None) else 0,
        norm="rms",
        norm_eps=_positive(config.rms_norm_eps, "rms_norm_eps", arch),
        activation=_activation(config.hidden_act),
        max_position_embeddings=_count(config, "max_position_embeddings", arch),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=window,
        tie_embeddings=bool(config.tie_word_embeddings),
        dtype=dtype,
        **flags,
    )


def _llama(hf: dict, config, dtype: str) -> DecoderConfig:
    # transformers' Llama has no sliding window: a `sliding_window` key in its config.json is ignored there
    bias = bool(config.attention_bias)
    return _llama_like(hf, config, dtype, "LlamaForCausalLM", None, qkv_bias=bias, o_bias=bias,
                       mlp_bias=bool(config.mlp_bias))


def _mistral(hf: dict, config, dtype: str) -> DecoderConfig:
    # every layer uses config.sliding_window (4096 when config.json omits it; null turns it off)
    return _llama_like(hf, config, dtype, "MistralForCausalLM", config.sliding_window)


def _qwen2(hf: dict, config, dtype: str) -> DecoderConfig:
    return _llama_like(hf, config, dtype, "Qwen2ForCausalLM", _layer_window(config, "Qwen2ForCausalLM"),
                       qkv_bias=True)


def _qwen3(hf: dict, config, dtype: str) -> DecoderConfig:
    bias = bool(config.attention_bias)
    return _llama_like(hf, config, dtype, "Qwen3ForCausalLM", _layer_window(config, "Qwen3ForCausalLM"),
                       qkv_bias=bias, o_bias=bias, qk_norm=True)


def _gpt2(hf: dict, config, dtype: str) -> DecoderConfig:
    arch = "GPT2LMHeadModel"
    for key in ("vocab_size", "n_embd", "n_head", "n_layer", "layer_norm_epsilon", "n_positions"):
        _need(hf, key, arch)
    hidden = _count(config, "n_embd", arch)
    return DecoderConfig(
        architecture=arch,
        vocab_size=_count(config, "vocab_size", arch),
        hidden_size=hidden,
        intermediate_size=config.n_inner or 4 * hidden,
        num_layers=_count(config, "n_layer", arch),
        num_heads=_count(config, "n_head", arch),
        num_kv_heads=_count(config, "n_head", arch),
        norm="layer",
        norm_eps=_positive(config.layer_norm_epsilon, "layer_norm_epsilon", arch),
        activation=_activation(config.activation_function),
        gated_mlp=False,
        position="learned",
        max_position_embeddings=_count(config, "n_positions", arch),
        attn_scale=None if config.scale_attn_weights else 1.0,
        qkv_bias=True, o_bias=True, mlp_bias=True,
        tie_embeddings=bool(config.tie_word_embeddings),
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

register(Architecture("LlamaForCausalLM", LLAMA_ROWS, LLAMA_ACTIVATIONS, _llama, "llama",
                      LLAMA_FIELDS + ("attention_bias", "mlp_bias"), ignored=("pretraining_tp",)))
register(Architecture("MistralForCausalLM", LLAMA_ROWS, LLAMA_ACTIVATIONS, _mistral, "mistral",
                      LLAMA_FIELDS + ("sliding_window",)))
register(Architecture("Qwen2ForCausalLM", LLAMA_ROWS, LLAMA_ACTIVATIONS, _qwen2, "qwen2", LLAMA_FIELDS + SLIDING_FIELDS))
register(Architecture("Qwen3ForCausalLM", LLAMA_ROWS, LLAMA_ACTIVATIONS, _qwen3, "qwen3",
                      LLAMA_FIELDS + SLIDING_FIELDS + ("attention_bias",)))
register(Architecture("GPT2LMHeadModel", GPT2_ROWS, GPT2_ACTIVATIONS, _gpt2, "gpt2",
                      ("vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "activation_function",
                       "layer_norm_epsilon", "scale_attn_weights", "tie_word_embeddings"),
                      ignored=("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_type", "summary_use_proj",
                               "summary_activation", "summary_proj_to_labels", "summary_first_dropout"),
                      ignore_hf=(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",)))
