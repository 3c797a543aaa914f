"""What to capture (probes aligned through the conversion mapping) and from what (sources).

A *probe* is one tensor that both models produce, named by its nbtrt name (``"embed"``,
``"layers.3.attn"``, ``"layers.3"``, ``"lm_head"``). Its HF counterpart comes from the
architecture's activation table in :mod:`nbtrt.mapping`; the q/k/v probes (the fused QKV
projection split into its parts) come from the same module's weight table, so names are
aligned in one place only.

A *source* runs token ids through a model and hands each probed tensor to a callback as it
is produced, already sliced to the chosen positions and moved to the CPU in float32. Sources
exist for HF models, the nbtrt decoder, and engines (through ``Engine.capture``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Union

import torch
from torch import nn

from ..config import DecoderConfig
from ..mapping import QKV_PARTS, Architecture, architecture_for

if TYPE_CHECKING:
    from ..engine import Engine

# Tensor kinds in execution order within the model; q/k/v are opt-in (finer, more to capture).
KINDS = ("embed", "attn_norm", "q", "k", "v", "attn", "mlp", "block", "final_norm", "logits")
DEFAULT_KINDS = ("embed", "attn_norm", "attn", "mlp", "block", "final_norm", "logits")
KIND_LABELS = {
    "embed": "token embeddings", "attn_norm": "input norm out", "q": "q projection (pre-rope)",
    "k": "k projection (pre-rope)", "v": "v projection", "attn": "attention out", "mlp": "MLP out",
    "block": "residual stream after the block", "final_norm": "final norm out", "logits": "logits",
}
LOGITS = "lm_head"


@dataclass(frozen=True)
class Probe:
    """One aligned tensor: nbtrt name, kind, layer, and the module producing it on each side.

    ``part`` = (start, stop) on the last dimension when the tensor is a slice of a module's
    output (a q/k/v part of a fused projection); ``hf_part`` likewise on the HF side.
    """

    name: str
    kind: str
    layer: int | None
    module: str
    hf_module: str
    part: tuple[int, int] | None = None
    hf_part: tuple[int, int] | None = None

    @property
    def order(self) -> tuple:
        if self.layer is None:
            return (-1 if self.kind == "embed" else 10 ** 9, KINDS.index(self.kind))
        return (self.layer, KINDS.index(self.kind))


def _kind(nbtrt_pattern: str) -> str:
    if nbtrt_pattern == LOGITS:
        return "logits"
    if nbtrt_pattern == "layers.{layer}":
        return "block"
    return nbtrt_pattern.removeprefix("layers.{layer}.")


def _qkv_probes(arch: Architecture, cfg: DecoderConfig) -> list[tuple[str, str, str, tuple, tuple | None]]:
    """(kind, nbtrt module, hf module, part, hf_part) patterns for q/k/v, read off the weight table.

    Rows with transform q/k/v mean HF computes the part in its own module (q_proj, ...);
    otherwise HF has a fused module too (GPT-2 c_attn) and both sides are sliced."""
    bounds = {"q": (0, cfg.q_size), "k": (cfg.q_size, cfg.q_size + cfg.kv_size),
              "v": (cfg.q_size + cfg.kv_size, cfg.qkv_size)}
    rows = [r for r in arch.rows if r.nbtrt == "layers.{layer}.attn.qkv.weight"]
    out = []
    for part in QKV_PARTS:
        own = [r for r in rows if r.transform == part]
        hf = (own or rows)[0].hf.removesuffix(".weight")
        out.append((part, "layers.{layer}.attn.qkv", hf, bounds[part], None if own else bounds[part]))
    return out


def probes(arch: Architecture, cfg: DecoderConfig, *, layers: Iterable[int] | None = None,
           kinds: Iterable[str] | None = None, names: Iterable[str] | None = None) -> list[Probe]:
    """The aligned tensors to capture, in execution order, restricted to a subset.

    >>> from nbtrt.mapping import ARCHITECTURES  # doctest: +SKIP
    >>> [p.name for p in probes(arch, cfg, layers=[0], kinds=["attn", "block"])]  # doctest: +SKIP
    ['layers.0.attn', 'layers.0']
    """
    if names is not None:  # explicit names override kinds and layers
        wanted = list(names)
        every = probes(arch, cfg, kinds=KINDS)
        unknown = [n for n in wanted if n not in {p.name for p in every}]
        if unknown:
            raise KeyError(f"unknown tensor names {unknown[:3]}; names look like 'embed', 'layers.0.attn_norm', "
                           f"'layers.0.attn', 'layers.0.mlp', 'layers.0', 'final_norm', 'lm_head'")
        return [p for p in every if p.name in wanted]
    kinds = tuple(kinds) if kinds is not None else DEFAULT_KINDS
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown tensor kinds {bad}; choose from {KINDS}")
    L = cfg.num_layers
    if layers is not None and any(not -L <= int(i) < L for i in layers):
        raise ValueError(f"layers {list(layers)} out of range: the model has {L} layers (0..{L - 1}, or negative from the end)")
    layer_set = range(L) if layers is None else sorted({int(i) % L for i in layers})
    patterns = [(_kind(n), n, h, None, None) for n, h in arch.activations] + _qkv_probes(arch, cfg)
    out = []
    for kind, mod, hf, part, hf_part in patterns:
        if kind not in kinds:
            continue
        name = f"layers.{{layer}}.attn.{kind}" if kind in QKV_PARTS else mod
        if "{layer}" not in mod:
            out.append(Probe(name, kind, None, mod, hf, part, hf_part))
        else:
            out += [Probe(name.format(layer=i), kind, i, mod.format(layer=i), hf.format(layer=i), part, hf_part)
                    for i in layer_set]
    return sorted(out, key=lambda p: p.order)


# ------------------------------------------------------------------------------ sources
OnTensor = Callable[[Probe, torch.Tensor], None]


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the last wanted tensor is captured."""


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _select(t: torch.Tensor, part, positions) -> torch.Tensor:
    t = t.detach()
    if part is not None:
        t = t[..., part[0]:part[1]]
    if positions is not None:
        t = t[:, positions]
    return t.float().cpu()


def _deliver_logits(logits: torch.Tensor, wanted: list[Probe], on_tensor, positions) -> torch.Tensor:
    """Logits come from the forward's return value, after every hooked tensor."""
    logits = _select(logits, None, positions)
    for p in wanted:
        if p.kind == "logits":
            on_tensor(p, logits)
    return logits


class Source:
    """Something that runs token ids and reports probed tensors as they are produced."""

    label: str = ""
    config: DecoderConfig
    arch: Architecture
    precision: str = "float32"
    can_stop_early: bool = False
    tokenizer_dir: Path | None = None

    def run(self, input_ids: torch.Tensor, wanted: list[Probe], on_tensor: OnTensor,
            positions: list[int] | None = None, stop_early: bool = False) -> torch.Tensor | None:
        """Run ``input_ids`` [B, T]; call ``on_tensor(probe, tensor)`` for each wanted probe
        (the logits probe included, after the forward). Returns logits [B, T', V] (float32, CPU,
        at ``positions``), or None when ``stop_early`` ended the pass after the last wanted tensor."""
        raise NotImplementedError


class ModuleSource(Source):
    """A torch model (HF or the nbtrt decoder): forward hooks on the probed modules."""

    can_stop_early = True

    def __init__(self, model: nn.Module, cfg: DecoderConfig, arch: Architecture, *, hf: bool, label: str,
                 tokenizer_dir: Path | None = None):
        self.model, self.config, self.arch, self.hf, self.label = model, cfg, arch, hf, label
        self.tokenizer_dir = tokenizer_dir
        self.precision = _precision(next(model.parameters()).dtype, cfg)
        self.device = next(model.parameters()).device

    def _module(self, probe: Probe) -> tuple[str, tuple | None]:
        return (probe.hf_module, probe.hf_part) if self.hf else (probe.module, probe.part)

    @torch.inference_mode()
    def run(self, input_ids, wanted, on_tensor, positions=None, stop_early=False):
        modules = dict(self.model.named_modules())
        hooked = [p for p in wanted if p.kind != "logits"]
        by_module: dict[str, list[Probe]] = {}
        for p in hooked:
            by_module.setdefault(self._module(p)[0], []).append(p)
        missing = [m for m in by_module if m not in modules]
        if missing:
            raise KeyError(f"{self.label}: the model has no module {missing[:3]}; "
                           f"its architecture table ({self.arch.name}) does not match the loaded model")
        last = hooked[-1] if stop_early and hooked and all(p.kind != "logits" for p in wanted) else None

        def hook(name):
            def fn(_m, _i, out):
                t = _first(out)
                for p in by_module[name]:
                    on_tensor(p, _select(t, self._module(p)[1], positions))
                if last is not None and name == self._module(last)[0]:
                    raise _Stop
            return fn

        handles = [modules[m].register_forward_hook(hook(m)) for m in by_module]
        try:
            ids = input_ids.to(self.device)
            logits = self.model(input_ids=ids, use_cache=False).logits if self.hf else self.model(ids)
        except _Stop:
            return None
        finally:
            for h in handles:
                h.remove()
        return _deliver_logits(logits, wanted, on_tensor, positions)


class EngineSource(Source):
    """An :class:`nbtrt.engine.Engine`: tensors come from ``engine.capture`` (extra outputs)."""

    def __init__(self, engine, label: str):
        self.engine, self.config, self.label = engine, engine.config, label
        self.arch = _arch_of(engine.config)
        self.precision = _precision(None, engine.config)
        self.tokenizer_dir = engine.engine_dir

    def run(self, input_ids, wanted, on_tensor, positions=None, stop_early=False):
        modules = sorted({p.module for p in wanted if p.kind != "logits"})
        logits, captured = self.engine.capture(input_ids.tolist(), modules)
        for p in wanted:
            if p.kind != "logits":
                on_tensor(p, _select(captured[p.module], p.part, positions))
        captured.clear()
        return _deliver_logits(logits, wanted, on_tensor, positions)


class ReplaySource(Source):
    """Runs another source once per input and replays its tensors afterwards: the reference of
    many comparisons (the mismatch lab) then runs once. Holds what it captured in memory."""

    def __init__(self, inner: Source):
        self.inner = inner
        self.label, self.config, self.arch = inner.label, inner.config, inner.arch
        self.precision, self.tokenizer_dir = inner.precision, inner.tokenizer_dir
        self._key, self._store, self._logits = None, {}, None

    def run(self, input_ids, wanted, on_tensor, positions=None, stop_early=False):
        key = (tuple(map(tuple, input_ids.tolist())), tuple(positions) if positions is not None else None)
        if key != self._key:
            self._key, self._store, self._logits = key, {}, None
        if self._logits is None or any(p.name not in self._store for p in wanted):
            self._logits = self.inner.run(input_ids, wanted, lambda p, t: self._store.__setitem__(p.name, t), positions)
        for p in wanted:
            on_tensor(p, self._store[p.name])
        return self._logits


def _arch_of(cfg: DecoderConfig) -> Architecture:
    return architecture_for({"architectures": [cfg.architecture]})


# quantization format (or KV cache format) prefix -> the tolerance row it is judged by
QUANT_PRECISION = (("int4", "int4"), ("int8", "int8"), ("fp8", "int8"))


def _precision(dtype: torch.dtype | None, cfg: DecoderConfig) -> str:
    """The coarsest numeric format in use: a quantization format wins over the float dtype."""
    q = cfg.quantization
    formats = [str(q.format or ""), str(q.kv_cache or "")]
    for prefix, row in QUANT_PRECISION:
        if any(f.startswith(prefix) for f in formats):
            return row
    return str(dtype).removeprefix("torch.") if dtype is not None else cfg.dtype


#: What the debugger compares: a zoo name, a HF / checkpoint / engine directory, a HF model, an
#: nbtrt Decoder, an Engine, or a Source already made.
SourceLike = Union[str, Path, nn.Module, "Engine", "Source"]
#: Token ids: one prompt or a batch of equal-length prompts.
TokenIds = Union[list[int], list[list[int]], torch.Tensor]


def as_source(obj: SourceLike, *, label: str | None = None) -> Source:
    """Wrap a reference or candidate: an Engine, an nbtrt Decoder or checkpoint dir, an engine dir,
    a HF model object, a HF directory or a zoo name.

    >>> src = as_source("smollm2-135m-instruct")  # doctest: +SKIP
    """
    from ..engine import Engine, load
    from ..model import Decoder, load_decoder

    if isinstance(obj, Source):
        return obj
    if isinstance(obj, Engine):
        return EngineSource(obj, label or f"{obj.backend} engine")
    if isinstance(obj, Decoder):
        return ModuleSource(obj, obj.cfg, _arch_of(obj.cfg), hf=False, label=label or "nbtrt decoder")
    if isinstance(obj, nn.Module) and hasattr(obj, "config") and hasattr(obj.config, "to_dict"):
        hf_cfg = obj.config.to_dict()
        arch = architecture_for(hf_cfg)
        name = getattr(obj, "name_or_path", "") or getattr(obj.config, "_name_or_path", "")
        tok = Path(name) if name and Path(name).is_dir() else None
        return ModuleSource(obj.eval(), arch.config_from_hf(hf_cfg, "float32"), arch, hf=True,
                            label=label or "HF", tokenizer_dir=tok)
    if isinstance(obj, (str, Path)):
        from ..zoo import resolve

        path = Path(resolve(obj))
        if (path / "engine.json").is_file():
            return as_source(load(path), label=label or f"engine {path.name}")
        config = path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{path} has no config.json: expected a HF model directory, a zoo name, "
                                    "an nbtrt checkpoint or an engine directory")
        data = json.loads(config.read_text())
        if "decoder" in data:
            model = load_decoder(path)
            return ModuleSource(model, model.cfg, _arch_of(model.cfg), hf=False,
                                label=label or f"checkpoint {path.name}", tokenizer_dir=path)
        architecture_for(data)  # refuses remote code and unsupported architectures before loading
        from .._io import load_hf_model

        model = load_hf_model(path, dtype=torch.float32)
        return as_source(model, label=label or "HF")
    raise TypeError(f"cannot compare a {type(obj).__name__}: pass an Engine, an nbtrt Decoder, a HF model, "
                    "or the path of a HF directory / nbtrt checkpoint / engine directory (or a zoo name)")
