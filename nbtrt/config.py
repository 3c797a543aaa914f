"""The unified decoder configuration stored in every checkpoint's config.json."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from ._io import ArtifactError, read_json

DTYPES = ("float32", "float16", "bfloat16")
ROPE_TYPES = {
    # rope_type -> parameters the type needs besides rope_theta (never defaulted silently)
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


COUNTS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
          "max_position_embeddings", "sliding_window")
REALS = ("norm_eps", "rope_theta", "attn_scale")


def check_dtype(dtype: str | None) -> None:
    """A ValueError naming the choices unless ``dtype`` is a precision nbtrt knows (None: keep the
    checkpoint's). Every stage that takes a dtype checks it here, up front."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")


@dataclass(frozen=True)
class QuantConfig(Mapping):
    """The ``quantization`` block of a quantized checkpoint's config (the layout: :mod:`nbtrt.layouts`).
    Read its fields as attributes; it is also a read-only mapping of the keys its JSON held, so
    ``to_dict()`` writes back exactly what was read (config.json and engine.json stay byte-for-byte
    the same) and an unquantized config's empty block is falsy.

    >>> q = QuantConfig.from_dict({"layout_version": 1, "format": "int8_wo", "layers": ["lm_head"]})
    >>> q.format, q.group_size, bool(QuantConfig()), q.to_dict() == {"layout_version": 1, "format": "int8_wo", "layers": ["lm_head"]}
    ('int8_wo', None, False, True)
    """

    layout_version: int | None = None
    format: str | None = None  # a weight format of nbtrt.layouts.FORMATS, or None (KV cache only)
    kv_cache: str | None = None  # None | "int8" | "fp8"
    group_size: int | None = None  # int4 formats
    alpha: float | None = None  # int8_sq (SmoothQuant)
    activation_scheme: str | None = None  # "per_token" | "per_tensor" (int8_sq, fp8)
    layers: list = field(default_factory=list)  # the quantized linears, by module name
    kept_high_precision: list = field(default_factory=list)
    calibration: dict | None = None
    awq: dict | None = None  # int4_awq: the search grid and the chosen alphas
    gptq: dict | None = None  # int4_gptq / int8_gptq (stored as int4_wo / int8_wo): the run's settings
    json_keys: tuple[str, ...] = field(default=(), repr=False, compare=False)  # the keys its JSON held, in order

    @classmethod
    def from_dict(cls, data: dict[str, Any] | "QuantConfig" | None) -> "QuantConfig":
        if isinstance(data, QuantConfig):
            return data
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)} - {"json_keys"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ArtifactError(f"unknown quantization keys {unknown}; was this written by a newer nbtrt?")
        return cls(**data, json_keys=tuple(data))

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.json_keys}

    def __getitem__(self, key: str) -> Any:
        if key not in self.json_keys:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.json_keys)

    def __len__(self) -> int:
        return len(self.json_keys)


@dataclass
class DecoderConfig:
    """Everything the one nbtrt decoder needs; architectures differ only in these flags.

    >>> cfg = DecoderConfig(architecture="LlamaForCausalLM", vocab_size=128, hidden_size=64,
    ...                     intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
    ...                     rope_theta=10000.0)
    >>> cfg.head_dim, cfg.qkv_size
    (16, 128)
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0 -> hidden_size // num_heads
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    activation: str = "silu"  # "silu" | "gelu_tanh" | "gelu"
    gated_mlp: bool = True  # SwiGLU-style gate * up, else plain up -> act -> down
    position: str = "rope"  # "rope" | "learned"
    max_position_embeddings: int = 2048
    rope_theta: float | None = None
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": ..., ...}
    attn_scale: float | None = None  # None -> 1/sqrt(head_dim)
    sliding_window: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    dtype: str = "float32"
    quantization: QuantConfig = field(default_factory=QuantConfig)  # empty (falsy): unquantized

    def __post_init__(self) -> None:
        self._check_numbers()
        self.quantization = QuantConfig.from_dict(self.quantization)  # a dict is accepted too
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        check_dtype(self.dtype)
        if self.position == "rope":
            if self.rope_theta is None:
                raise ValueError("rope position embedding needs rope_theta")
            rope_type = (self.rope_scaling or {}).get("rope_type", "default")
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"rope_type {rope_type!r} is not supported (supported: {sorted(ROPE_TYPES)})")
            missing = [k for k in ROPE_TYPES[rope_type] if k not in (self.rope_scaling or {})]
            if missing:
                raise ValueError(f"rope_type {rope_type!r} needs {missing} in rope_scaling")

    def _check_numbers(self) -> None:
        """Every numeric field has the right type and range, named when not: a string or NaN here
        would otherwise pass conversion and build, then fail deep inside the model."""
        for name in COUNTS:
            value = getattr(self, name)
            optional = name in ("head_dim", "sliding_window")
            if optional and not value:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"decoder config {name}={value!r} must be an integer >= 1")
        for name in REALS:
            value = getattr(self, name)
            if value is None and name != "norm_eps":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"decoder config {name}={value!r} must be a finite number > 0")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "quantization": self.quantization.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DecoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ArtifactError(f"unknown decoder config keys {unknown}; was this written by a newer nbtrt?")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ArtifactError(f"the decoder config lacks {missing}; re-run the stage that wrote it")
        try:
            return cls(**data)
        except ValueError as e:
            raise ArtifactError(f"the decoder config is invalid: {e}; re-run the stage that wrote it") from None


def load_checkpoint_config(ckpt_dir: str | Path) -> tuple[DecoderConfig, dict]:
    """Read an nbtrt checkpoint's config.json -> (decoder config, provenance block)."""
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise ArtifactError(f"{ckpt_dir} is not an nbtrt checkpoint: config.json is missing")
    data = read_json(path)
    if "decoder" not in data:
        raise ArtifactError(
            f"{path} has no 'decoder' block: this looks like a HuggingFace directory; "
            "run nbtrt.convert() on it first"
        )
    return DecoderConfig.from_dict(data["decoder"]), data.get("nbtrt", {})
