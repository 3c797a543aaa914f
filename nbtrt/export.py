"""ONNX export of the one nbtrt decoder: the graph ONNX Runtime runs and TensorRT parses.

The I/O contract, defined here once (HF-style names, symbolic dimensions)::

    input_ids                      [batch, seq]                        int64
    position_ids                   [batch, seq]                        int64
    attention_mask                 [batch, total]                      int64, 1 = real token
    past_key_values.{i}.key|value  [batch, kv_heads, past, head_dim]   model dtype
                    │
                    ▼   nbtrt.model.Decoder with a ConcatKVCache
                    │   cache_position = past + arange(seq), computed in the graph from shapes
                    ▼
    logits                         [batch, seq, vocab]                 model dtype
    present.{i}.key|value          [batch, kv_heads, total, head_dim]  total = past + seq

One graph serves prefill (past = 0, any batch) and decode (seq = 1). Nodes are named
after the module that emits them (``/layers.3/attn/qkv/MatMul``), and each module
output the debugger aligns (``embed``, ``layers.3.attn``, ``layers.3``, ``final_norm``)
is a tensor named exactly like the module, so a runtime can expose any subset as
extra graph outputs (:func:`with_outputs`). Weights live in ``model.onnx.data``.

Why ``torch.onnx.export(dynamo=True)``: the TorchScript exporter stops at opset 20
(block-wise INT4 DequantizeLinear needs 21) and is deprecated; the dynamo exporter
records each node's module path, which gives the readable names above.

>>> export_onnx("work/ckpt", "work/onnx")  # doctest: +SKIP
PosixPath('work/onnx/model.onnx')
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ._io import read_json
from .config import DecoderConfig, check_dtype
from .layouts import EPS, FORMATS, INT8_MAX, KVQuant, QuantLinear, unpack_int4
from .model import ConcatKVCache, Decoder, TORCH_DTYPES, load_decoder

OPSET = 21  # block-wise DequantizeLinear (INT4) and FP8 Q/DQ; below Attention (23), which TensorRT 10 lacks
MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
MODULE_OUTPUTS_KEY = "nbtrt.module_outputs"  # metadata: {module name: tensor name}


# ------------------------------------------------------------------------------ the contract
def input_names(cfg: DecoderConfig) -> list[str]:
    kv = [f"past_key_values.{i}.{kind}" for i in range(cfg.num_layers) for kind in ("key", "value")]
    return ["input_ids", "position_ids", "attention_mask", *kv]


def output_names(cfg: DecoderConfig) -> list[str]:
    return ["logits", *[f"present.{i}.{kind}" for i in range(cfg.num_layers) for kind in ("key", "value")]]


def capture_names(cfg: DecoderConfig) -> list[str]:
    """Module outputs every exported graph exposes by name, in execution order."""
    per_layer = ["attn_norm", "attn.qkv", "attn", "mlp_norm", "mlp"]
    return ["embed", *[n for i in range(cfg.num_layers) for n in
                       (*(f"layers.{i}.{p}" for p in per_layer), f"layers.{i}")], "final_norm", "lm_head"]


class _Contract(nn.Module):
    """The decoder seen through the ONNX contract: flat past tensors in, logits and presents out."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, position_ids, attention_mask, past):
        past_len = past[0][0].shape[2]
        cache_position = torch.arange(input_ids.shape[1], device=input_ids.device) + past_len
        kv = ConcatKVCache(list(past))
        logits = self.decoder(input_ids, position_ids, attention_mask, cache_position, kv)
        return logits, [t for pair in kv.present for t in pair]


def _example(cfg: DecoderConfig, dtype: torch.dtype, batch: int = 2, seq: int = 3, past: int = 5):
    # distinct tensors for every past input: the tracer would merge one tensor passed twice
    kv = [tuple(torch.randn(batch, cfg.num_kv_heads, past, cfg.head_dim, dtype=dtype) for _ in "kv")
          for _ in range(cfg.num_layers)]
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    positions = torch.arange(past, past + seq)[None].expand(batch, seq).contiguous()
    return ids, positions, torch.ones(batch, past + seq, dtype=torch.int64), kv


def _dynamic_shapes(cfg: DecoderConfig) -> dict:
    from torch.export import Dim

    batch, seq, past = Dim("batch"), Dim("seq"), Dim("past")
    kv = {0: batch, 2: past}
    return {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq},
            "attention_mask": {0: batch, 1: Dim.AUTO},  # = past + seq, which Dim cannot spell
            "past": [(kv, kv) for _ in range(cfg.num_layers)]}


# ------------------------------------------------------------------------------ export
def export_onnx(ckpt_or_model: str | Path | Decoder, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Export the decoder of a checkpoint (or a loaded :class:`Decoder`) to ``out_dir/model.onnx``.

    >>> export_onnx("work/ckpt", "work/onnx", dtype="float16")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    stages = tqdm(total=4, desc="export: load decoder", unit="stage")
    check_dtype(dtype)
    if isinstance(ckpt_or_model, Decoder):
        model = ckpt_or_model if dtype is None else copy.deepcopy(ckpt_or_model).to(TORCH_DTYPES[dtype])  # not the caller's
    else:
        model = load_decoder(ckpt_or_model, dtype=dtype)
    cfg = model.cfg
    torch_dtype = model.float_dtype
    quantized = _quantized_modules(model) if cfg.quantization else {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _stage(stages, "export: trace (torch.export, ~1 s per layer)")
    # the exporter logs one warning per torchvision op it cannot register; nbtrt uses none of them
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    chatter = io.StringIO()  # the exporter prints its own progress lines; shown only if it fails
    # a quantized decoder is traced with float stand-ins; the Q/DQ patterns replace them afterwards
    with warnings.catch_warnings(), torch.no_grad(), _float_stand_ins(model, quantized), \
            contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter says nothing about our graph
        try:
            program = torch.onnx.export(
                _Contract(model.eval()), _example(cfg, torch_dtype), dynamo=True, opset_version=OPSET,
                input_names=input_names(cfg), output_names=output_names(cfg),
                dynamic_shapes=_dynamic_shapes(cfg), optimize=True, verbose=False)
        except Exception as e:
            raise RuntimeError(f"torch.onnx.export failed for this decoder: {e}\n{chatter.getvalue()[-2000:]}") from e
    _stage(stages, "export: name nodes" + (", quantize patterns" if quantized else ""))
    graph = program.model.graph
    for value in list(graph.initializers.values()):  # checkpoint names: layers.0.attn.qkv.weight
        value.name = value.name.removeprefix("decoder.")
    _name_nodes(graph)
    _name_dims(graph, cfg)
    outputs = _name_module_outputs(graph, cfg)
    if quantized:
        _quantize_graph(graph, cfg, quantized, torch_dtype)
    program.model.metadata_props.update({
        MODULE_OUTPUTS_KEY: json.dumps(outputs),
        "nbtrt.decoder": json.dumps({**cfg.to_dict(), "dtype": str(torch_dtype).removeprefix("torch.")}),
    })
    program.model.producer_name = "nbtrt"
    _stage(stages, f"export: save {MODEL_FILE} + {DATA_FILE}")
    import onnx_ir as ir

    path = out_dir / MODEL_FILE
    ir.save(program.model, path, external_data=DATA_FILE)
    _stage(stages, "export: done")
    stages.close()
    return path


def _stage(bar, name: str) -> None:
    bar.update(1)
    bar.set_description(name)


def _scope(node) -> str:
    """Module path of the node ('layers.0.attn.qkv'), '' for the decoder itself."""
    scopes = json.loads(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]").replace("'", '"'))
    modules = [s for s in scopes[:-1] if s.startswith("decoder")]  # the last entry is the op, not a module
    return modules[-1].removeprefix("decoder").lstrip(".") if modules else ""


def _name_nodes(graph) -> None:
    """``/layers.3/attn/qkv/MatMul``: the module path, '/'-separated, with ``layers.N`` kept whole."""
    seen: Counter = Counter()
    for node in graph:
        # nodes the optimizer created carry no scope; they take their consumers' shared scope
        scope = _scope(node) or _shared_scope([_scope(u) for o in node.outputs for u, _ in o.uses()])
        base = f"{_node_path(scope).rstrip('/')}/{node.op_type}"
        node.name = base if not seen[base] else f"{base}_{seen[base]}"
        seen[base] += 1


def _node_path(module: str) -> str:
    """'layers.3.attn.qkv' -> '/layers.3/attn/qkv' (the node-name prefix of that module)."""
    return "/" + module.replace("layers.", "layers#").replace(".", "/").replace("layers#", "layers.")


def _shared_scope(scopes: list[str]) -> str:
    parts = [s.split(".") for s in scopes if s]
    if not parts:
        return ""
    common = []
    for segment in zip(*parts):
        if len(set(segment)) != 1:
            break
        common.append(segment[0])
    return ".".join(common)


def _name_dims(graph, cfg: DecoderConfig) -> None:
    """The exporter calls total 's53' at one place and 'past + seq' at another; call it total."""
    import onnx_ir as ir

    total = {graph.inputs[2].shape[1].value}  # attention_mask [batch, total]
    total |= {o.shape[2].value for o in graph.outputs[1:]}
    for value in [*graph.inputs, *graph.outputs]:
        if value.shape is not None:
            value.shape = ir.Shape(["total" if getattr(d, "value", d) in total else d for d in value.shape])


def _name_module_outputs(graph, cfg: DecoderConfig) -> dict[str, str]:
    """Name each capturable module's output tensor after the module.

    A module's output is what its last op computes (every nbtrt module returns its final
    value), so it is the output of the last node in graph order inside that module's scope.
    """
    wanted = set(capture_names(cfg))
    last = {}
    for node in graph:
        scope = _scope(node)
        while scope:  # the node belongs to its module and to every enclosing one
            if scope in wanted:
                last[scope] = node
            scope = scope.rpartition(".")[0]
    missing = sorted(wanted - set(last))
    if missing:
        raise RuntimeError(f"export found no nodes for modules {missing[:5]}; the exporter's scope metadata changed?")
    names = {}
    for module in capture_names(cfg):
        value = last[module].outputs[0]
        if value.is_graph_output():  # lm_head: its output is already `logits`
            names[module] = value.name
            continue
        value.name = module
        names[module] = module
    return names


# ------------------------------------------------------------------------------ quantized checkpoints
#
# The patterns TensorRT's ONNX parser turns into quantized kernels (names for layers.0.attn.qkv):
#
#   weight-only (int8_wo, int4_wo, int4_awq)          W8A8 / FP8 (int8_sq per_tensor, fp8)
#   x ─[Mul pre_quant_scale: int4_awq]─┐              x ─▶ QuantizeLinear ─▶ DequantizeLinear ─┐
#   q [in, out] ─▶ DequantizeLinear ─▶ MatMul           q [in, out] ─▶ DequantizeLinear ─▶ MatMul
#
#   int8: per output channel (axis 1); int4: blocks of group_size along `in` (axis 0, opset 21);
#   fp8: one scale. int8_sq per_token computes each token's scale in the graph (|x|max / 127) and
#   rounds with plain ops, since an INT8 QuantizeLinear needs a constant scale.
#   KV cache (int8 / fp8): QuantizeLinear -> DequantizeLinear on the new key/value before the
#   Concat that makes present.{i}.key/value, as the reference quantizes what the cache stores.
def _quantized_modules(model: Decoder) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, KVQuant))}


@contextlib.contextmanager
def _float_stand_ins(model: Decoder, quantized: dict[str, nn.Module]):
    """Temporarily put plain nn.Linear (dequantized weight) / nn.Identity where the quantized modules are."""
    dtype = model.float_dtype

    def stand_in(module):
        if not hasattr(module, "dequantized_weight"):
            return nn.Identity()
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.dequantized_weight().to(dtype), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.to(dtype), requires_grad=False)
        return linear

    for name, module in quantized.items():
        model.set_submodule(name, stand_in(module))
    try:
        yield model
    finally:
        for name, module in quantized.items():
            model.set_submodule(name, module)


def _quantize_graph(graph, cfg: DecoderConfig, quantized: dict[str, nn.Module], dtype: torch.dtype) -> None:
    q = cfg.quantization
    nodes = {n.name: n for n in graph}
    fmt = q.format
    for name in q.layers:
        module, path = quantized[name], _node_path(name)
        matmul = nodes[f"{path}/MatMul"]
        old = matmul.inputs[1]
        matmul.replace_input_with(1, _dequantized_weight(graph, matmul, name, module, dtype))
        x = matmul.inputs[0]
        if fmt == "int4_awq":
            x = _insert(graph, matmul, f"{path}/pre_quant/Mul", "Mul", [x, _const(graph, f"{name}.pre_quant_scale",
                                                                                   module.pre_quant_scale, dtype)])
        act = FORMATS[fmt].activation
        if act and module.static:
            x = _qdq(graph, matmul, f"{path}/input", x, _const(graph, f"{name}.input_scale", module.input_scale, dtype),
                     act)
        elif act:
            x = _dynamic_int8(graph, matmul, f"{path}/input", x, dtype)
        matmul.replace_input_with(0, x)
        _drop_if_unused(graph, old)
    if q.kv_cache:
        producers = {o.name: n for n in graph for o in n.outputs}
        for i in range(cfg.num_layers):
            for kind, short in (("key", "k"), ("value", "v")):
                concat = producers[f"present.{i}.{kind}"]
                scale = _const(graph, f"layers.{i}.attn.{short}_quant.scale",
                               quantized[f"layers.{i}.attn.{short}_quant"].scale, dtype)
                new = _qdq(graph, concat, f"/layers.{i}/attn/{short}_quant", concat.inputs[1], scale, q.kv_cache)
                concat.replace_input_with(1, new)
    graph.sort()


def _const(graph, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None):
    """Register ``tensor`` (cast to ``dtype`` when given) as an initializer; return its value."""
    import onnx_ir as ir
    from onnx_ir.tensor_adapters import TorchTensor

    t = tensor.detach().cpu().contiguous()
    t = t.to(dtype) if dtype is not None else t
    value = ir.Value(name=name, const_value=TorchTensor(t, name=name))
    value.shape, value.dtype = value.const_value.shape, value.const_value.dtype
    graph.register_initializer(value)
    return value


def _insert(graph, before, name: str, op: str, inputs: list, **attributes):
    """Insert one node ahead of ``before``; return its output value."""
    import onnx_ir as ir

    node = ir.node(op, inputs, attributes or None, name=name)
    graph.insert_before(before, node)
    return node.outputs[0]


def _qdq(graph, before, path: str, x, scale, kind: str):
    """QuantizeLinear -> DequantizeLinear with a constant scale and a zero point of the quantized type."""
    zero = torch.zeros((), dtype=torch.int8 if kind == "int8" else torch.float8_e4m3fn)
    zp = _const(graph, f"{path.strip('/').replace('/', '.')}.zero_point", zero)
    quant = _insert(graph, before, f"{path}/QuantizeLinear", "QuantizeLinear", [x, scale, zp])
    return _insert(graph, before, f"{path}/DequantizeLinear", "DequantizeLinear", [quant, scale, zp])


def _dynamic_int8(graph, before, path: str, x, dtype: torch.dtype):
    """Per-token symmetric int8 fake quantization, as the reference: s = max(|x|max / 127, eps);
    round(x / s) clipped to [-127, 127], times s."""
    key = path.strip("/").replace("/", ".")
    c = {n: _const(graph, f"{key}.{n}", torch.tensor(v), dtype) for n, v in
         (("qmax", INT8_MAX), ("qmin", -INT8_MAX), ("eps", EPS))}
    amax = _insert(graph, before, f"{path}/ReduceMax", "ReduceMax",
                   [_insert(graph, before, f"{path}/Abs", "Abs", [x]),
                    _const(graph, f"{key}.axes", torch.tensor([-1]))], keepdims=1)
    scale = _insert(graph, before, f"{path}/Max", "Max",
                    [_insert(graph, before, f"{path}/Div", "Div", [amax, c["qmax"]]), c["eps"]])
    rounded = _insert(graph, before, f"{path}/Round", "Round",
                      [_insert(graph, before, f"{path}/Div_1", "Div", [x, scale])])
    clipped = _insert(graph, before, f"{path}/Clip", "Clip", [rounded, c["qmin"], c["qmax"]])
    return _insert(graph, before, f"{path}/Mul", "Mul", [clipped, scale])


def _dequantized_weight(graph, matmul, name: str, module, dtype: torch.dtype):
    """DequantizeLinear over the stored weight, transposed to MatMul's [in, out]."""
    import onnx_ir as ir

    kind = FORMATS[module.fmt].weight
    path = _node_path(name)
    scale = module.weight_scale
    attrs: dict = {}
    if kind == "int4":
        q_t = unpack_int4(module.weight).t().contiguous()  # [in, out], int4 values in int8
        flat = q_t.flatten().to(torch.uint8) & 0xF
        flat = torch.cat([flat, flat.new_zeros(flat.numel() % 2)])  # ONNX packs the flat row-major order
        packed = (flat[0::2] | (flat[1::2] << 4)).numpy()
        value = ir.Value(name=f"{name}.weight_q", const_value=ir.PackedTensor(
            packed, ir.DataType.INT4, shape=list(q_t.shape), name=f"{name}.weight_q"))
        value.shape, value.dtype = value.const_value.shape, value.const_value.dtype
        graph.register_initializer(value)
        weight = value
        scale, attrs = scale.t(), {"axis": 0, "block_size": module.group_size}
    else:
        weight = _const(graph, f"{name}.weight_q", module.weight.t())
        if kind == "int8":
            attrs = {"axis": 1}
    scale = _const(graph, f"{name}.weight_scale", scale, dtype)
    return _insert(graph, matmul, f"{path}/DequantizeLinear", "DequantizeLinear", [weight, scale], **attrs)


def _drop_if_unused(graph, value) -> None:
    """Remove a replaced float weight (and the Transpose that fed it, if any)."""
    if value.uses() or value.is_graph_output():
        return
    if value.is_initializer():
        graph.initializers.pop(value.name)
    elif value.producer() is not None:
        producer = value.producer()
        inputs = list(producer.inputs)
        graph.remove(producer, safe=True)
        for v in inputs:
            _drop_if_unused(graph, v)


# ------------------------------------------------------------------------------ reading graphs
ONNX_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 3: "int8", 2: "uint8", 22: "int4", 17: "float8e4m3fn",
              7: "int64", 6: "int32", 9: "bool"}


def graph_summary(onnx_path: str | Path) -> dict[str, list[dict]]:
    """The graph's inputs and outputs (name, dtype, shape) and, per linear, the precision of its
    weight and of its input, read from the file without loading the weights.

    >>> graph_summary("work/engine/model.onnx")["linears"][0]  # doctest: +SKIP
    {'module': 'layers.0.attn.qkv', 'weight': 'int4', 'block': 128, 'activation': 'float32', 'in x out': [576, 960]}
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    typed = {v.name: v for v in [*graph.value_info, *graph.input, *graph.output]}

    def io(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": ONNX_TYPES.get(t.elem_type, str(t.elem_type)),
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}

    def origin(name):  # a MatMul operand back to its constant: (initializer, DequantizeLinear, transposed)
        node = producer.get(name)
        if node is not None and node.op_type in ("Transpose", "DequantizeLinear"):
            found, _, transposed = origin(node.input[0])
            dq = node if node.op_type == "DequantizeLinear" else None
            return found, dq, transposed != (node.op_type == "Transpose")
        return inits.get(name), None, False

    linears = []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight, dq, transposed = origin(node.input[1])
        if weight is None:
            continue  # attention's activation x activation products
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute} if dq is not None else {}
        x = producer.get(node.input[0])
        quantized_input = x is not None and x.op_type == "DequantizeLinear"
        act = inits[x.input[2]].data_type if quantized_input and len(x.input) > 2 else None
        activation = ONNX_TYPES.get(act) if quantized_input else (
            io(typed[node.input[0]])["dtype"] if node.input[0] in typed else "float")
        if x is not None and x.op_type == "Mul" and x.name.endswith("/input/Mul"):
            activation = "int8 (per token)"
        linears.append({"module": node.name.removesuffix("/MatMul").lstrip("/").replace("/", "."),
                        "weight": ONNX_TYPES.get(weight.data_type, str(weight.data_type)),
                        "block": attrs.get("block_size"), "activation": activation,
                        "in x out": list(weight.dims)[::-1] if transposed else list(weight.dims)})
    return {"inputs": [io(v) for v in graph.input], "outputs": [io(v) for v in graph.output], "linears": linears}

def engine_summary(engine_dir: str | Path) -> dict[str, list[dict]]:
    """An engine directory at a glance: its files (from engine.json) and its graph (:func:`graph_summary`).

    >>> summary = engine_summary("work/engine")  # doctest: +SKIP
    >>> summary["files"], summary["inputs"], summary["outputs"], summary["linears"]  # doctest: +SKIP
    """
    engine_dir = Path(engine_dir)
    manifest = read_json(engine_dir / "engine.json")
    files = [{"file": name, "MiB": round(info["bytes"] / 2 ** 20, 3)} for name, info in manifest["files"].items()]
    return {"files": files, **graph_summary(engine_dir / MODEL_FILE)}


def module_outputs(onnx_model) -> dict[str, str]:
    """{module name: tensor name} recorded at export, from a graph file (read without its
    weights) or an already loaded ``onnx.ModelProto``."""
    import onnx

    if not isinstance(onnx_model, onnx.ModelProto):
        onnx_model = onnx.load(str(onnx_model), load_external_data=False)
    meta = {p.key: p.value for p in onnx_model.metadata_props}
    return json.loads(meta.get(MODULE_OUTPUTS_KEY, "{}"))


def with_outputs(onnx_path: str | Path, names: list[str]):
    """The graph of ``onnx_path`` (an ``onnx.ModelProto``, weights left in the external data file
    beside it) that also outputs the named module tensors. Nothing is written: ONNX Runtime runs
    it from memory, reading the weights from ``onnx_path``'s folder.

    >>> proto = with_outputs("work/engine/model.onnx", ["layers.0.attn"])  # doctest: +SKIP
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    table = module_outputs(model)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise KeyError(f"no captured tensor for {unknown[:3]}; this graph exposes {list(table)[:6]} ...")
    existing = {o.name for o in model.graph.output}
    typed = {v.name: v for v in model.graph.value_info}
    for name in names:
        if table[name] not in existing:
            model.graph.output.append(typed.get(table[name]) or onnx.ValueInfoProto(name=table[name]))
            existing.add(table[name])
    return model
