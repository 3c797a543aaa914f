"""The mismatch lab: real conversion bugs, injected one at a time into a converted model.

Each bug is data: what it is, the story of who hit it, which models it can hit (a predicate
on the decoder config), the first captured tensor it changes, and how to inject it — an
``edit`` of the config/weights (what a buggy converter writes) or a ``patch`` on one decoder
instance (what a buggy runtime does). The library classes are never modified.

>>> from nbtrt.debug import lab
>>> sorted(lab.BUGS)[:3]
['conv1d_not_transposed', 'gate_up_swapped', 'qkv_bias_dropped']
>>> report = lab.run("smollm2-135m-instruct", "work/ckpt", "rope_applied_twice", "Hello")  # doctest: +SKIP
>>> report.first_divergence.name  # doctest: +SKIP
'layers.0.attn'
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

from .._io import atomic_dir, check_output
from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import DecoderConfig, load_checkpoint_config
from ..mapping import architecture_for
from ..model import Decoder, decoder_from_tensors
from ..plots import Table
from .capture import ReplaySource, SourceLike, as_source
from .compare import compare

if TYPE_CHECKING:
    from .compare import Report

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Bug:
    name: str
    title: str
    story: str
    first: tuple[str, ...]  # tensors it changes first, finest first: the first one captured is the answer
    applies: Callable[[DecoderConfig], bool]
    edit: Callable[[DecoderConfig, Tensors], tuple[DecoderConfig, Tensors]] | None = None
    patch: Callable[[Decoder], None] | None = None
    fix: str = ""

    def first_tensor(self, captured: list[str] | None = None) -> str:
        """The first tensor the bug touches among ``captured`` (default: the default capture set)."""
        if captured is None:
            return self.first[-1]
        hit = [n for n in self.first if n in captured]
        return hit[0] if hit else self.first[-1]


# ------------------------------------------------------------------------------ injections
def _per_layer(cfg: DecoderConfig, pattern: str) -> list[str]:
    return [pattern.format(layer=i) for i in range(cfg.num_layers)]


def _rope_twice(model: Decoder) -> None:
    # rotating q and k a second time by the same angle = one rotation by twice the angle:
    # cos 2a = cos^2 a - sin^2 a, sin 2a = 2 sin a cos a
    model.rope.register_forward_hook(lambda _m, _i, out: (out[0] * out[0] - out[1] * out[1], 2 * out[0] * out[1]))


def _wrong_theta(cfg: DecoderConfig, t: Tensors):
    wrong = 10000.0 if cfg.rope_theta != 10000.0 else 1000000.0
    return dataclasses.replace(cfg, rope_theta=wrong), t


def _swap_gate_up(cfg: DecoderConfig, t: Tensors):
    t = dict(t)
    for i in range(cfg.num_layers):
        for p in ("weight", "bias") if cfg.mlp_bias else ("weight",):
            g, u = f"layers.{i}.mlp.gate.{p}", f"layers.{i}.mlp.up.{p}"
            t[g], t[u] = t[u], t[g]
    return cfg, t


def _drop_qkv_bias(cfg: DecoderConfig, t: Tensors):
    dropped = set(_per_layer(cfg, "layers.{layer}.attn.qkv.bias"))
    return dataclasses.replace(cfg, qkv_bias=False), {k: v for k, v in t.items() if k not in dropped}


def _transposed_rows(cfg: DecoderConfig) -> list[str]:
    """The nbtrt tensors the mapping table says are transposed from HF Conv1D ([in, out])."""
    arch = architecture_for({"architectures": [cfg.architecture]})
    return [r.nbtrt for r in arch.expand(cfg) if r.transform == "T"]


def _no_conv1d_transpose(cfg: DecoderConfig, t: Tensors):
    # The converter copied HF's [in, out] Conv1D buffer and reshaped it to [out, in] so shapes
    # check: no error, wrong numbers. (Our W is HF's transpose, so HF's buffer is W.t().)
    t = dict(t)
    for name in _transposed_rows(cfg):
        w = t[name]
        t[name] = w.t().contiguous().reshape(w.shape)
    return cfg, t


def _wrong_eps(cfg: DecoderConfig, t: Tensors):
    # the usual slip: 1e-5 (Llama 2, SmolLM) and 1e-6 (Qwen, Llama 1) mixed up
    return dataclasses.replace(cfg, norm_eps=1e-6 if cfg.norm_eps >= 5e-6 else 1e-5), t


def _stale_lm_head(cfg: DecoderConfig, t: Tensors):
    # untied: lm_head became its own tensor, copied from an earlier version of the embedding
    # (the base model before fine-tuning, here: the embedding plus a 5% drift)
    emb = t["embed.tok.weight"]
    g = torch.Generator().manual_seed(0)
    drift = torch.randn(emb.shape, generator=g, dtype=torch.float32).to(emb.dtype) * emb.float().std().to(emb.dtype)
    return dataclasses.replace(cfg, tie_embeddings=False), {**t, "lm_head.weight": emb + 0.05 * drift}


BUGS: dict[str, Bug] = {b.name: b for b in (
    Bug("rope_applied_twice", "RoPE applied twice",
        "Adding Qwen-7B to TensorRT-LLM: the model applied rotary embeddings and so did the attention "
        "plugin. Found by comparing each layer's mean/sum/shape with HF from the outside in.",
        ("layers.0.attn",), lambda c: c.position == "rope", patch=_rope_twice,
        fix="rotate q and k once: either in the model or in the attention kernel, not both"),
    Bug("rope_wrong_theta", "RoPE with the wrong theta",
        "rope_theta missing from the converter's config reader, defaulted to Llama-2's 10000 "
        "(Qwen2 uses 1e6, Llama 3 5e5): positions rotate at the wrong frequencies.",
        ("layers.0.attn",), lambda c: c.position == "rope", edit=_wrong_theta,
        fix="read rope_theta (rope_parameters) from config.json; never default it"),
    Bug("gate_up_swapped", "MLP gate and up projections swapped",
        "Llama's w1/w3 naming (gate = w1, up = w3) mapped the wrong way round: silu(up) * gate "
        "instead of silu(gate) * up. Shapes match, so nothing complains.",
        ("layers.0.mlp",), lambda c: c.gated_mlp, edit=_swap_gate_up,
        fix="map gate_proj -> gate and up_proj -> up (the mapping table rows)"),
    Bug("qkv_bias_dropped", "QKV bias dropped",
        "Qwen2 reuses the Llama layout but its q/k/v projections have biases; a Llama converter "
        "silently skips them.",
        ("layers.0.attn.q", "layers.0.attn"), lambda c: c.qkv_bias, edit=_drop_qkv_bias,
        fix="set qkv_bias from the architecture and fuse q/k/v biases like the weights"),
    Bug("conv1d_not_transposed", "GPT-2 Conv1D weights not transposed",
        "GPT-2 stores its linear layers as Conv1D, [in, out]; reshaping instead of transposing "
        "keeps every shape valid and scrambles every projection.",
        ("layers.0.attn.q", "layers.0.attn"), lambda c: bool(_transposed_rows(c)), edit=_no_conv1d_transpose,
        fix="transpose the Conv1D weights (the 'T' rows of the mapping table)"),
    Bug("rms_eps_wrong", "Wrong RMSNorm epsilon",
        "rms_norm_eps read from the wrong key and defaulted: 1e-5 and 1e-6 mixed up. Every norm "
        "output shifts a little; the very first tensor it touches is the first input norm.",
        ("layers.0.attn_norm",), lambda c: c.norm == "rms", edit=_wrong_eps,
        fix="read rms_norm_eps from config.json"),
    Bug("tied_embeddings_stale", "Tied embeddings untied with a stale copy",
        "lm_head is tied to the token embedding, but the converter wrote a separate lm_head taken "
        "from an older copy of the embedding. Only the logits move.",
        ("lm_head",), lambda c: c.tie_embeddings, edit=_stale_lm_head,
        fix="keep tie_word_embeddings: lm_head shares the embedding tensor"),
)}


# ------------------------------------------------------------------------------ API
def _cfg_tensors(model) -> tuple[DecoderConfig, Tensors]:
    if isinstance(model, Decoder):
        t = dict(model.state_dict())
        if model.cfg.tie_embeddings:
            t.pop("lm_head.weight")
        return model.cfg, t
    if isinstance(model, tuple):
        return model
    if isinstance(model, (str, Path)):
        return load_checkpoint(model)
    raise TypeError("pass an nbtrt checkpoint directory, a Decoder, or (config, tensors)")


def _bug(bug: str | Bug) -> Bug:
    if isinstance(bug, Bug):
        return bug
    if bug not in BUGS:
        raise KeyError(f"unknown bug {bug!r}; the lab has {sorted(BUGS)}")
    return BUGS[bug]


def _config_of(model) -> DecoderConfig:
    if isinstance(model, DecoderConfig):
        return model
    if isinstance(model, (str, Path)):
        return load_checkpoint_config(model)[0]
    return _cfg_tensors(model)[0]


def applicable(model) -> list[Bug]:
    """The bugs that can hit this model (checkpoint dir, Decoder, config or (config, tensors))."""
    cfg = _config_of(model)
    return [b for b in BUGS.values() if b.applies(cfg)]


def inject(model: str | Path | Decoder | tuple[DecoderConfig, dict[str, torch.Tensor]], bug: str | Bug) -> Decoder:
    """A new decoder for ``model`` (checkpoint dir, Decoder or (config, tensors)) with one bug in it.
    ``model`` itself is not changed."""
    bug = _bug(bug)
    cfg, tensors = _cfg_tensors(model)
    if not bug.applies(cfg):
        names = [b.name for b in applicable((cfg, tensors))]
        raise ValueError(f"bug {bug.name!r} cannot occur in a {cfg.architecture} with this config; "
                         f"bugs that apply: {names}")
    if bug.edit:
        cfg, tensors = bug.edit(cfg, tensors)
    decoder = decoder_from_tensors(cfg, tensors)
    if bug.patch:
        bug.patch(decoder)
    return decoder


def save(ckpt: str | Path, bug: str | Bug, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a copy of checkpoint ``ckpt`` with ``bug`` in it, as a buggy converter would have
    written it — to build an engine from and find the bug through the engine. Only bugs that live
    in the weights or config can be written; runtime bugs (a ``patch``) cannot.

    >>> bad = lab.save("work/ckpt", "gate_up_swapped", "work/ckpt-bad")  # doctest: +SKIP
    """
    bug = _bug(bug)
    if bug.edit is None:
        raise ValueError(f"bug {bug.name!r} is in the runtime, not in the checkpoint; use lab.inject() "
                         f"for a decoder carrying it. Bugs a checkpoint can hold: "
                         f"{sorted(b.name for b in BUGS.values() if b.edit)}")
    check_output(out, (ckpt,), overwrite=overwrite)  # never over (or inside) the checkpoint it reads
    cfg, tensors = _cfg_tensors(ckpt)
    if not bug.applies(cfg):
        raise ValueError(f"bug {bug.name!r} cannot occur in a {cfg.architecture} with this config")
    cfg, tensors = bug.edit(cfg, tensors)
    with atomic_dir(out, overwrite=overwrite, inputs=(ckpt,)) as tmp:
        save_checkpoint(tmp, cfg, tensors, stage="lab", source=ckpt, options={"bug": bug.name}, tokenizer_dir=Path(ckpt))
    return Path(out)


def run(reference: SourceLike, model: str | Path | Decoder, bug: str | Bug, text: str | None = None,
        **compare_kw) -> Report:
    """Compare ``reference`` (HF) with ``model`` carrying ``bug``: a :class:`Report` labelled by the bug."""
    bug = _bug(bug)
    return compare(reference, inject(model, bug), text, label=bug.name, **compare_kw)


def check(reference: SourceLike, model: str | Path | Decoder, text: str | None = None, **compare_kw) -> Table:
    """Inject every applicable bug in turn (and none): did the finder name the right tensor?

    >>> lab.check(hf_model, "work/ckpt", input_ids=[[1, 2, 3, 4]])  # doctest: +SKIP
    """
    reference = ReplaySource(as_source(reference))  # one reference run serves every bug
    cfg, tensors = _cfg_tensors(model)
    clean = compare(reference, decoder_from_tensors(cfg, tensors), text, label="no bug", **compare_kw)
    rows = [{"bug": "(none)", "expected": "no divergence", "found": clean.first_divergence.name
             if clean.first_divergence else "no divergence", "error": None, "ok": clean.first_divergence is None}]
    for bug in tqdm(applicable(cfg), desc="mismatch lab", unit="bug", leave=False):
        report = run(reference, (cfg, tensors), bug, text, **compare_kw)
        d = report.first_divergence
        expected = bug.first_tensor([t.name for t in report.tensors])
        rows.append({"bug": bug.name, "expected": expected, "found": d.name if d else "no divergence",
                     "error": d.value if d else None, "ok": d is not None and d.name == expected})
    return Table(rows, max_rows=None, title="mismatch lab: first divergence per injected bug")
