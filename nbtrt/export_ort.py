"""The ``ort-cpu`` graph flavour: the same decoder written with ONNX Runtime's fused CPU operators.

The standard graph (:mod:`nbtrt.export`) is the TensorRT contract and stays as it is. This
flavour is for ONNX Runtime on the CPU only, where a decode step of the standard graph is
~40 small ops per layer (norms spelt out, rotary by Slice/Concat, GQA by repeat_interleave,
attention by MatMul/Softmax, the KV cache grown by Concat: a copy of the whole cache per
layer per step). Here one layer is six nodes (names for layer 3)::

    x ─▶ SkipSimplifiedLayerNormalization ─▶ layers.3.attn_norm      (residual sum out: layers.2)
          /layers.3/attn_norm
         ─▶ MatMul | MatMulNBits  /layers.3/attn/qkv                  ─▶ layers.3.attn.qkv (packed q|k|v)
         ─▶ GroupQueryAttention   /layers.3/attn/GroupQueryAttention  rotary inside, KV cache written in place
              past_key_values.3.key|value ═ present.3.key|value         (one buffer [batch, kv, max_seq, head_dim])
         ─▶ MatMul | MatMulNBits  /layers.3/attn/o                    ─▶ layers.3.attn
         ─▶ SkipSimplifiedLayerNormalization /layers.3/mlp_norm       ─▶ layers.3.mlp_norm
         ─▶ MatMul | MatMulNBits  /layers.3/mlp/gate_up (gate and up fused) ─▶ Split ─▶ SiLU(gate) * up
         ─▶ MatMul | MatMulNBits  /layers.3/mlp/down                  ─▶ layers.3.mlp

I/O: ``input_ids``, ``position_ids`` [batch, seq] int64; ``attention_bias`` [batch, 1, seq, total]
float (0 or the dtype's min: left padding; GQA adds its own causal mask); ``seqlens_k`` [batch]
int32 (= total - 1) and ``total_sequence_length`` [] int32; ``past_key_values.{i}.key|value``
[batch, kv_heads, max_seq, head_dim], which the runtime binds to the same buffers as
``present.{i}.key|value`` so that GroupQueryAttention appends the new keys in place. Module
outputs keep the debugger's names (``embed``, ``layers.3.attn``, ``layers.3``, ...) and the
same metadata key as the standard graph, so :func:`nbtrt.export.with_outputs` works on it.

Quantized checkpoints (int8_wo / int4_wo and GPTQ's, which share their layouts) become
``MatMulNBits``: the stored codes shifted to unsigned (its default zero point is 2^(bits-1))
and the stored scales, so the weights are bit-for-bit the checkpoint's.

>>> export_ort_cpu("work/ckpt", "work/engine", max_seq_len=2048)  # doctest: +SKIP
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .config import DecoderConfig
from .export import DATA_FILE, MODEL_FILE, MODULE_OUTPUTS_KEY, capture_names
from .layouts import FORMATS, unpack_int4
from .model import Rope

GRAPHS = ("auto", "standard", "ort-cpu")
MS = "com.microsoft"
LAST_POSITION = "/lm_head/last_position/Slice"  # final_norm[:, -1:], the generation graph's lm_head input
INT8_BLOCK = 128  # MatMulNBits needs a power-of-two block: a per-channel int8 scale is repeated per block


def ort_cpu_unsupported(cfg: DecoderConfig, dtype: str | None = None) -> str | None:
    """Why the ``ort-cpu`` flavour cannot express this decoder (None: it can)."""
    q = cfg.quantization
    checks = [
        ((dtype or cfg.dtype) != "float32", f"dtype {dtype or cfg.dtype} (ONNX Runtime's fused CPU kernels here are fp32)"),
        (cfg.norm != "rms", "LayerNorm models"),
        (cfg.position != "rope", "learned position embeddings"),
        (not cfg.gated_mlp or cfg.activation != "silu", f"an MLP other than SwiGLU ({cfg.activation})"),
        (cfg.qk_norm, "q/k norm"),
        (bool(cfg.sliding_window), "sliding-window attention"),
        (cfg.attn_scale is not None, "a custom attention scale"),
        (bool(q.get("kv_cache")), f"a {q.get('kv_cache')} KV cache"),
        (q.format is not None and FORMATS[q.format].activation is not None, f"{q.format} (quantized activations)"),
        (q.format == "int4_awq", "int4_awq (its per-channel input scales)"),
        (q.format is not None and FORMATS.get(q.format) and FORMATS[q.format].weight == "fp8", "fp8 weights"),
    ]
    reasons = [why for bad, why in checks if bad]
    return f"the ort-cpu graph does not support {', '.join(reasons)}" if reasons else None


def choose_graph(graph: str, cfg: DecoderConfig, dtype: str | None, on_cuda: bool) -> str:
    """The one place the flavour is chosen: ``auto`` is ``ort-cpu`` on the CPU where it applies."""
    if graph not in GRAPHS:
        raise ValueError(f"graph={graph!r} is not one of {GRAPHS}")
    reason = ort_cpu_unsupported(cfg, dtype)
    if graph == "ort-cpu" and reason:
        raise ValueError(f"{reason}; build it with graph='standard'")
    if graph == "auto":
        return "standard" if on_cuda or reason else "ort-cpu"
    return graph


# ------------------------------------------------------------------------------ the builder
class _Graph:
    """Nodes, initializers and named values of the graph being written, in order."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def const(self, name: str, array) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | int, name: str, domain: str = "", **attrs):
        from onnx import helper

        if isinstance(outputs, int):
            outputs = [f"{name}/output_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs


def _weight(t: dict, name: str) -> np.ndarray:
    return t[f"{name}.weight"].float().numpy()


def _linear(g: _Graph, cfg: DecoderConfig, t: dict, x: str, parts: list[str], path: str, out: str | None = None,
            accuracy_level: int = 0) -> str:
    """x @ W.T (+ bias) for the linears ``parts`` concatenated along their outputs (one node).

    Float: MatMul over the [in, out] weight. Quantized: MatMulNBits over the stored codes."""
    q = cfg.quantization
    quantized = [p in set(q.get("layers") or ()) for p in parts]
    if any(quantized) and not all(quantized):  # only fuse what shares one kernel
        outs = [_linear(g, cfg, t, x, [p], f"{path}_{k}", accuracy_level=accuracy_level) for k, p in enumerate(parts)]
        return g.node("Concat", outs, [out or f"{path}/output_0"], f"{path}/Concat", axis=-1)
    key = parts[0] if len(parts) == 1 else path.lstrip("/").replace("/", ".")
    biases = [t[f"{p}.bias"].float().numpy() for p in parts if f"{p}.bias" in t]
    bias = g.const(f"{key}.bias", np.concatenate(biases)) if biases else None
    y = out if bias is None else None
    # ONNX Runtime 1.32's 8-bit MatMulNBits with fp32 compute measured 2 s per SmolLM2 token (its
    # 4-bit one ~0.1 s): int8 weights at accuracy_level 0/1 are dequantized into a float MatMul instead
    int8_fp32 = FORMATS[q.format].weight == "int8" and accuracy_level in (0, 1) if q.format else False
    if all(quantized) and not int8_fp32:
        kind, inputs, attrs = _nbits(g, cfg, t, parts, key)
        y = g.node("MatMulNBits", [x, *inputs], [y or f"{path}/output_0"], f"{path}/MatMulNBits", domain=MS,
                   accuracy_level=accuracy_level, **attrs)
        # MatMulNBits' own bias input is left out: an Add keeps the float bias exactly as the reference adds it
    else:
        w = np.concatenate([_float_weight(t, p, q) for p in parts]).T
        y = g.node("MatMul", [x, g.const(f"{key}.weight_t", w)], [y or f"{path}/output_0"], f"{path}/MatMul")
    if bias is not None:
        y = g.node("Add", [y, bias], [out or f"{path}/output_1"], f"{path}/Add")
    return y


def _float_weight(t: dict, name: str, q) -> np.ndarray:
    """The [out, in] float weight of a linear; an int8 one dequantized (exactly the reference's)."""
    if f"{name}.weight_scale" not in t:
        return _weight(t, name)
    return (t[f"{name}.weight"].float() * t[f"{name}.weight_scale"].float()[:, None]).numpy()


def _nbits(g: _Graph, cfg: DecoderConfig, t: dict, parts: list[str], key: str):
    """MatMulNBits inputs (codes [N, blocks, block bytes] uint8, scales [N * blocks]) and attributes."""
    q = cfg.quantization
    bits = 4 if FORMATS[q.format].weight == "int4" else 8
    codes, scales = [], []
    for p in parts:
        if bits == 4:
            c = unpack_int4(t[f"{p}.weight"]).to(torch.int16) + 8  # [out, in], unsigned: zero point 8
            s = t[f"{p}.weight_scale"].float()  # [out, ceil(in / g)]
            block = q.group_size
        else:
            c = t[f"{p}.weight"].to(torch.int16) + 128  # zero point 128
            block = INT8_BLOCK
            s = t[f"{p}.weight_scale"].float()[:, None].expand(-1, -(-c.shape[1] // block))
        codes.append(c)
        scales.append(s)
    c, s = torch.cat(codes), torch.cat(scales)
    n, k = c.shape
    blocks = -(-k // block)
    padded = torch.full((n, blocks * block), 2 ** (bits - 1), dtype=torch.int16)  # pad with code 0
    padded[:, :k] = c
    u8 = padded.to(torch.uint8)
    if bits == 4:
        u8 = u8[:, 0::2] | (u8[:, 1::2] << 4)  # low nibble holds the even element
    packed = u8.reshape(n, blocks, -1).numpy()
    inputs = [g.const(f"{key}.weight_nbits", packed), g.const(f"{key}.weight_scale", s.reshape(-1).numpy())]
    return bits, inputs, {"K": k, "N": n, "bits": bits, "block_size": block}


def export_ort_cpu(ckpt_dir: str | Path, out_dir: str | Path, max_seq_len: int, accuracy_level: int = 0) -> Path:
    """Write the ``ort-cpu`` flavour of a checkpoint's decoder to ``out_dir/model.onnx`` (+ .data).

    ``max_seq_len`` sizes the rotary tables (positions the engine can reach). ``accuracy_level``
    is MatMulNBits' compute precision (0/1: fp32, as the graph says; 4: int8 activations).

    >>> export_ort_cpu("work/ckpt", "work/engine", max_seq_len=2048)  # doctest: +SKIP
    PosixPath('work/engine/model.onnx')
    """
    import onnx
    from onnx import TensorProto, helper
    from tqdm.auto import tqdm

    cfg, t = load_checkpoint(ckpt_dir)
    reason = ort_cpu_unsupported(cfg)
    if reason:
        raise ValueError(f"{ckpt_dir}: {reason}; build it with graph='standard'")
    g, L, eps = _Graph(), cfg.num_layers, cfg.norm_eps
    lin = dict(g=g, cfg=cfg, t=t, accuracy_level=accuracy_level)
    # rotary tables [max_seq_len, head_dim / 2] from the reference's own inverse frequencies
    freqs = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * Rope(cfg).inv_freq[None]
    cos, sin = g.const("rope.cos_cache", freqs.cos().numpy()), g.const("rope.sin_cache", freqs.sin().numpy())
    embed = g.node("Gather", [g.const("embed.tok.weight", _weight(t, "embed.tok")), "input_ids"], ["embed"], "/embed/Gather")
    x, residual = embed, None  # x: what the next norm adds to the residual stream
    for i in tqdm(range(L), desc="export: ort-cpu layers", unit="layer", leave=False):
        p, path = f"layers.{i}", f"/layers.{i}"
        h = _norm(g, t, f"{p}.attn_norm", x, residual, eps, f"{p}.attn_norm", f"layers.{i - 1}" if i else None)
        qkv = _linear(x=h, parts=[f"{p}.attn.qkv"], path=f"{path}/attn/qkv", out=f"{p}.attn.qkv", **lin)
        attn, _, _ = g.node(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
             "total_sequence_length", cos, sin, "", "attention_bias"],
            [f"{path}/attn/context", f"present.{i}.key", f"present.{i}.value"],
            f"{path}/attn/GroupQueryAttention", domain=MS, num_heads=cfg.num_heads, kv_num_heads=cfg.num_kv_heads,
            do_rotary=1, rotary_interleaved=0, scale=cfg.head_dim ** -0.5)
        attn = _linear(x=attn, parts=[f"{p}.attn.o"], path=f"{path}/attn/o", out=f"{p}.attn", **lin)
        residual = x if residual is None else f"layers.{i - 1}"
        h = _norm(g, t, f"{p}.mlp_norm", attn, residual, eps, f"{p}.mlp_norm", f"{p}.attn_residual")
        residual = f"{p}.attn_residual"
        gate_up = _linear(x=h, parts=[f"{p}.mlp.gate", f"{p}.mlp.up"], path=f"{path}/mlp/gate_up", **lin)
        gate, up = g.node("Split", [gate_up], 2, f"{path}/mlp/Split", axis=-1, num_outputs=2)
        act = g.node("Mul", [gate, g.node("Sigmoid", [gate], 1, f"{path}/mlp/Sigmoid")], 1, f"{path}/mlp/Mul")
        gated = g.node("Mul", [act, up], 1, f"{path}/mlp/Mul_1")
        x = _linear(x=gated, parts=[f"{p}.mlp.down"], path=f"{path}/mlp/down", out=f"{p}.mlp", **lin)
    final = _norm(g, t, "final_norm", x, residual, eps, "final_norm", f"layers.{L - 1}")
    head = "embed.tok" if cfg.tie_embeddings else "lm_head"
    # generation reads the last position's logits only: the lm_head (a fifth of SmolLM2's weights)
    # runs on one position per prompt, not 128; the debugger's capture graph drops this Slice
    last = g.node("Slice", [final, g.const("lm_head.last.starts", np.array([-1])),
                            g.const("lm_head.last.ends", np.array([np.iinfo(np.int64).max])),
                            g.const("lm_head.last.axes", np.array([1]))], 1, LAST_POSITION)
    _linear(x=last, parts=[head], path="/lm_head", out="logits", **lin)

    f32 = TensorProto.FLOAT
    kv = ["batch", cfg.num_kv_heads, "max_seq", cfg.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_bias", f32, ["batch", 1, "seq", "total"]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
              *[helper.make_tensor_value_info(f"past_key_values.{i}.{k}", f32, kv) for i in range(L) for k in ("key", "value")]]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", 1, cfg.vocab_size]),
               *[helper.make_tensor_value_info(f"present.{i}.{k}", f32, kv) for i in range(L) for k in ("key", "value")]]
    graph = helper.make_graph(g.nodes, "nbtrt-ort-cpu", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, producer_name="nbtrt", opset_imports=[helper.make_opsetid("", 21),
                                                                          helper.make_opsetid(MS, 1)])
    table = {n: ("logits" if n == "lm_head" else n) for n in capture_names(cfg)}
    for key, value in {MODULE_OUTPUTS_KEY: json.dumps(table), "nbtrt.graph": "ort-cpu",
                       "nbtrt.decoder": json.dumps(cfg.to_dict())}.items():
        model.metadata_props.add(key=key, value=value)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    return out / MODEL_FILE


def all_positions(model) -> None:
    """Make an ``ort-cpu`` graph (an ``onnx.ModelProto``, edited in place) compute the logits of
    every position, as the debugger compares them: the lm_head reads final_norm itself."""
    from onnx import TensorShapeProto

    nodes = model.graph.node
    cut = next(n for n in nodes if n.name == LAST_POSITION)
    for node in nodes:
        node.input[:] = [cut.input[0] if name == cut.output[0] else name for name in node.input]
    nodes.remove(cut)
    logits = next(o for o in model.graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].CopyFrom(TensorShapeProto.Dimension(dim_param="seq"))


def _norm(g: _Graph, t: dict, name: str, x: str, residual: str | None, eps: float, out: str, sum_out: str | None) -> str:
    """RMSNorm of ``x + residual`` (SkipSimplifiedLayerNormalization, the sum is output as ``sum_out``),
    or of ``x`` alone for the first norm."""
    gamma = g.const(f"{name}.weight", t[f"{name}.weight"].float().numpy())
    path = "/" + name.replace(".", "/").replace("layers/", "layers.")
    if residual is None:
        return g.node("SimplifiedLayerNormalization", [x, gamma], [out], f"{path}/SimplifiedLayerNormalization",
                      axis=-1, epsilon=eps, stash_type=1)
    g.node("SkipSimplifiedLayerNormalization", [x, residual, gamma], [out, "", "", sum_out],
           f"{path}/SkipSimplifiedLayerNormalization", domain=MS, epsilon=eps)
    return out
