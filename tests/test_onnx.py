"""ONNX export and the ONNX Runtime engine against the nbtrt reference (TorchEngine), for every
architecture and both zoo models; graph checks TensorRT depends on; bad input at build and run time."""
import json
import shutil

import onnx
import pytest
import torch
from transformers import AutoConfig

import nbtrt
from nbtrt._io import ArtifactError
from nbtrt.engine import BACKENDS, default_backend, write_manifest
from nbtrt.generate import GenerationError
from nbtrt.testing import TINY, tiny_hf_model

ARCHS = sorted(TINY)
LIMITS = dict(max_batch_size=2, max_input_len=32, max_seq_len=64)


def build_pair(ckpt, root, graph="standard", **limits):
    """(ONNX Runtime engine, torch reference engine) built from one checkpoint; ``graph`` is the
    ONNX flavour (the standard graph is the TensorRT contract these tests check)."""
    limits = {**LIMITS, **limits}
    ort = nbtrt.load(nbtrt.build(ckpt, root / f"engine-ort-{graph}", backend="onnxruntime", graph=graph, **limits))
    ref = nbtrt.load(nbtrt.build(ckpt, root / "engine-torch", backend="torch", **limits), device="cpu")
    return ort, ref


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> (hf dir, ckpt, ort engine, torch engine), built on first use and kept for the module."""
    root, made = tmp_path_factory.mktemp("onnx"), {}

    def get(arch):
        if arch not in made:
            src = tiny_hf_model(arch, root / arch)
            ckpt = nbtrt.convert(src, root / f"{arch}-ckpt")
            made[arch] = (src, ckpt, *build_pair(ckpt, root / f"{arch}-engines"))
        return made[arch]
    return get


def prefill_and_decode(engines, vocab, lengths=(12, 7), steps=16, seed=0):
    """Max abs logit difference between engines over a left-padded prefill and ``steps`` decode steps."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    follow = torch.randint(0, vocab, (len(lengths), steps), generator=g)
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    for e in engines:
        e.begin(len(lengths))
    worst = 0.0
    for t in range(steps + 1):
        a, b = (e.step(ids, mask).float() for e in engines)
        worst = max(worst, (a - b).abs().max().item())
        ids = follow[:, t:t + 1]
        mask = torch.cat([mask, torch.ones(len(lengths), 1, dtype=torch.long)], 1)
    return worst


def assert_contract(onnx_path, hf_dir):
    """onnx.checker, default-domain ops only, and the I/O contract read against the HF config."""
    onnx.checker.check_model(str(onnx_path))
    model = onnx.load(str(onnx_path), load_external_data=False)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, "custom-domain op in the graph"
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"} and not model.functions
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    hf = AutoConfig.from_pretrained(hf_dir)
    layers = hf.num_hidden_layers
    heads = hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    inputs = {v.name: dims(v) for v in model.graph.input}
    outputs = {v.name: dims(v) for v in model.graph.output}
    expected_in = {"input_ids": ["batch", "seq"], "position_ids": ["batch", "seq"],
                   "attention_mask": ["batch", "total"]}
    expected_out = {"logits": ["batch", "seq", hf.vocab_size]}
    for i in range(layers):
        for kind in ("key", "value"):
            expected_in[f"past_key_values.{i}.{kind}"] = ["batch", kv_heads, "past", head_dim]
            expected_out[f"present.{i}.{kind}"] = ["batch", kv_heads, "total", head_dim]
    assert inputs == expected_in
    assert outputs == expected_out
    names = [n.name for n in model.graph.node]
    assert len(names) == len(set(names))
    assert "/layers.0/attn/qkv/MatMul" in names and "/lm_head/MatMul" in names


# ------------------------------------------------------------------------------ every architecture
@pytest.mark.parametrize("arch", ARCHS)
def test_ort_matches_reference(tiny, arch):
    src, ckpt, ort, ref = tiny(arch)
    diff = prefill_and_decode([ort, ref], vocab=257)
    assert diff <= 1e-3, f"{arch}: max abs logit difference {diff:.2e}"
    assert_contract(ort.engine_dir / "model.onnx", src)


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_matches_reference(tiny, arch):
    src, ckpt, ort, ref = tiny(arch)
    names = ["embed", "layers.0.attn_norm", "layers.0.attn", "layers.1.mlp", "layers.1", "final_norm", "lm_head"]
    ids = [[5, 9, 2, 77, 100, 3], [1, 2, 3, 4, 5, 6]]
    logits, ours = ort.capture(ids, names)
    ref_logits, theirs = ref.capture(ids, names)
    assert list(ours) == names
    for name in names:
        assert ours[name].dtype == torch.float32 and ours[name].shape == theirs[name].shape, name
        diff = (ours[name] - theirs[name]).abs().max().item()
        assert diff <= 1e-4, f"{arch} {name}: max abs {diff:.2e}"
    assert (logits - ref_logits).abs().max().item() <= 1e-4
    # only the requested tensors become extra outputs of the capture graph
    session = ort._capture_cache[1]
    extra = [o.name for o in session.get_outputs()][1 + 2 * ort.config.num_layers:]
    assert extra == [n for n in names if n != "lm_head"]


def test_capture_unknown_name(tiny):
    *_, ort, _ = tiny("LlamaForCausalLM")
    with pytest.raises(KeyError, match="layers.99"):
        ort.capture([[1, 2, 3]], ["layers.99.attn"])


def test_without_io_binding_same_logits(tiny):
    _, ckpt, ort, ref = tiny("Qwen2ForCausalLM")
    plain = nbtrt.load(ort.engine_dir, io_binding=False)
    assert prefill_and_decode([plain, ort], vocab=257, steps=4) == 0.0


def test_default_backend_on_cpu_is_onnxruntime():
    if not torch.cuda.is_available():
        assert default_backend() == "onnxruntime"


# ------------------------------------------------------------------------------ bad input
def test_limits_checked_at_build(tmp_path, tiny):
    _, ckpt, *_ = tiny("Qwen2ForCausalLM")
    with pytest.raises(ValueError, match="max_input_len"):
        nbtrt.build(ckpt, tmp_path / "e", backend="onnxruntime", max_input_len=128, max_seq_len=64)
    with pytest.raises(ValueError, match="no build options.*workspace"):
        nbtrt.build(ckpt, tmp_path / "e", backend="onnxruntime", workspace=1)
    assert not any(tmp_path.iterdir())


def test_limits_checked_at_run_time(tmp_path, tiny):
    _, ckpt, *_ = tiny("Qwen2ForCausalLM")
    engine = nbtrt.load(nbtrt.build(ckpt, tmp_path / "e", backend="onnxruntime",
                                    max_batch_size=2, max_input_len=8, max_seq_len=12))
    with pytest.raises(GenerationError, match="max_batch_size=2"):
        engine.generate(input_ids=[[1, 2]] * 3, max_new_tokens=2)
    with pytest.raises(GenerationError, match="max_batch_size=2"):
        engine.begin(3)
    with pytest.raises(GenerationError, match="max_input_len=8"):
        engine.generate(input_ids=[list(range(9))], max_new_tokens=2)
    engine.begin(1)
    engine.step(torch.tensor([list(range(8))]), torch.ones(1, 8, dtype=torch.long))
    for n in range(9, 13):
        engine.step(torch.tensor([[1]]), torch.ones(1, n, dtype=torch.long))
    with pytest.raises(GenerationError, match="max_seq_len=12"):
        engine.step(torch.tensor([[1]]), torch.ones(1, 13, dtype=torch.long))


def test_corrupted_onnx(tmp_path, tiny):
    *_, ort, _ = tiny("MistralForCausalLM")
    edir = tmp_path / "engine"
    shutil.copytree(ort.engine_dir, edir)
    with open(edir / "model.onnx", "r+b") as f:
        f.write(b"\0" * 256)  # same size, unreadable header
    with pytest.raises(ArtifactError, match="model.onnx does not match engine.json"):
        nbtrt.load(edir)
    with pytest.raises(RuntimeError, match="cannot load .*model.onnx.*rebuild the engine"):
        nbtrt.load(edir, verify=False)


def test_engine_from_another_checkpoint(tmp_path, tiny):
    src, _, ort, _ = tiny("Qwen3ForCausalLM")
    other_ckpt = nbtrt.convert(tiny_hf_model("Qwen3ForCausalLM", tmp_path / "other", seed=1), tmp_path / "ck")
    other = nbtrt.build(other_ckpt, tmp_path / "other-engine", backend="onnxruntime", **LIMITS)
    edir = tmp_path / "engine"
    shutil.copytree(ort.engine_dir, edir)
    shutil.copy(other / "model.onnx.data", edir / "model.onnx.data")  # same size, other weights
    with pytest.raises(ArtifactError, match="model.onnx.data does not match engine.json"):
        nbtrt.load(edir)
    shutil.copytree(ort.engine_dir, edir, dirs_exist_ok=True)
    shutil.copy(other / "engine.json", edir / "engine.json")  # a manifest that describes other files
    with pytest.raises(ArtifactError, match="does not match engine.json"):
        nbtrt.load(edir)


def test_tensorrt_missing_is_a_clear_error(tmp_path, tiny):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        if torch.cuda.is_available():
            pytest.skip("TensorRT can run here")
    except ImportError:
        pass
    _, ckpt, ort, _ = tiny("Qwen2ForCausalLM")
    with pytest.raises(RuntimeError, match="backend 'tensorrt' cannot build here: .*(tensorrt|CUDA)"):
        nbtrt.build(ckpt, tmp_path / "trt", backend="tensorrt", **LIMITS)
    assert not any(tmp_path.iterdir())
    edir = tmp_path / "as-trt"
    shutil.copytree(ort.engine_dir, edir)
    manifest = json.loads((edir / "engine.json").read_text())
    manifest.pop("manifest_sha256")
    write_manifest(edir / "engine.json", {**manifest, "backend": "tensorrt"})  # as a TensorRT build records it
    with pytest.raises(RuntimeError, match="built for 'tensorrt', which cannot run here"):
        nbtrt.load(edir)


# ------------------------------------------------------------------------------ zoo models
@pytest.fixture(scope="module", params=["smollm2-135m-instruct",
                                        pytest.param("qwen2.5-coder-0.5b-instruct", marks=pytest.mark.slow)])
def zoo_engines(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    src = nbtrt.zoo.get(request.param)
    ckpt = nbtrt.convert(src, root / "ckpt")
    return src, build_pair(ckpt, root, max_input_len=16, max_seq_len=48)


def test_zoo_model(zoo_engines):
    src, (ort, ref) = zoo_engines
    vocab = ort.config.vocab_size
    diff = prefill_and_decode([ort, ref], vocab=vocab, lengths=(11, 6))
    assert diff <= 1e-3, f"{src.name}: max abs logit difference {diff:.2e}"
    assert_contract(ort.engine_dir / "model.onnx", src)
    names = ["embed", "layers.0.attn", f"layers.{ort.config.num_layers - 1}", "final_norm"]
    ids = [ort.encode("The capital of France is")]
    _, ours = ort.capture(ids, names)
    _, theirs = ref.capture(ids, names)
    for name in names:
        # fp32 tolerance relative to the tensor's scale: SmolLM2's residual stream reaches |x| ~ 2500
        # (massive activations), where neighbouring fp32 values are already 2.4e-4 apart
        diff, scale = (ours[name] - theirs[name]).abs().max().item(), theirs[name].abs().max().item()
        assert diff <= 1e-4 + 1e-5 * scale, f"{name}: max abs {diff:.2e} at scale {scale:.1f}"


# ------------------------------------------------------------------------------ quantized checkpoints
QUANTIZED = {  # name -> quantize() arguments
    "int8_wo": dict(fmt="int8_wo"),
    "int8_wo+lm_head": dict(fmt="int8_wo", lm_head=True),  # the graph's float dtype is not lm_head's
    "int4_wo": dict(fmt="int4_wo"),
    "int4_awq+kv_int8": dict(fmt="int4_awq", kv_cache="int8"),
    "int8_sq": dict(fmt="int8_sq"),
    "int8_sq_per_tensor+kv_fp8": dict(fmt="int8_sq", activation_scheme="per_tensor", kv_cache="fp8"),
    "fp8": dict(fmt="fp8"),
}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """name -> (quantized ckpt, ort engine, torch reference engine), built on first use, of a tiny Llama
    with the real SmolLM2 tokenizer (calibration reads real text); "float" -> its unquantized reference."""
    import nbtrt.quantize as nq
    from nbtrt._io import copy_tokenizer_files

    root = tmp_path_factory.mktemp("quantized")
    src = tiny_hf_model("LlamaForCausalLM", root / "hf", vocab_size=49152, num_hidden_layers=2)
    copy_tokenizer_files(nbtrt.zoo.get("smollm2-135m-instruct"), src)
    ckpt = nbtrt.convert(src, root / "ckpt")
    cal = nq.calibrate(ckpt, num_samples=4, seq_len=64)
    made = {}

    def get(name):
        if name not in made:
            if name == "float":
                made[name] = nbtrt.load(nbtrt.build(ckpt, root / "float", backend="torch", **LIMITS), device="cpu")
            else:
                args = dict(QUANTIZED[name])
                q = nq.quantize(ckpt, root / name, args.pop("fmt"), cal, group_size=32, **args)
                made[name] = (q, *build_pair(q, root / f"{name}-engines"))
        return made[name]
    return get


@pytest.mark.parametrize("name", sorted(QUANTIZED))
def test_quantized_engine_matches_its_reference(quantized, name):
    """The graph computes the quantized reference decoder: to fp32 rounding where only weights are
    quantized. Where activations are quantized, an activation whose value sits on a rounding boundary
    can land one quantization step apart in two fp32 implementations (measured: layers agree to 6e-8
    until one such flip), so there the bar is half the format's own error against the float model."""
    ckpt, ort, ref = quantized(name)
    diff = prefill_and_decode([ort, ref], vocab=49152)
    if name in ("int8_wo", "int8_wo+lm_head", "int4_wo", "int4_awq+kv_int8", "fp8"):
        assert diff <= 1e-3, f"{name}: max abs logit difference {diff:.2e}"
    else:
        float_ref = quantized("float")
        format_error = prefill_and_decode([ref, float_ref], vocab=49152)
        assert diff <= 0.5 * format_error, f"{name}: {diff:.2e} vs the format's own error {format_error:.2e}"


@pytest.mark.parametrize("name", sorted(QUANTIZED))
def test_quantized_graph_has_tensorrt_patterns(quantized, name):
    ckpt, ort, _ = quantized(name)
    path = ort.engine_dir / "model.onnx"
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    cfg = json.loads((ckpt / "config.json").read_text())["decoder"]
    q = cfg["quantization"]
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    matmuls = {n.name: n for n in model.graph.node if n.op_type == "MatMul"}
    expected_type = {"int8_wo": onnx.TensorProto.INT8, "int4_wo": onnx.TensorProto.INT4,
                     "int4_awq": onnx.TensorProto.INT4, "int8_sq": onnx.TensorProto.INT8,
                     "fp8": onnx.TensorProto.FLOAT8E4M3FN}[q["format"]]
    for layer in q["layers"]:
        path_ = "/" + layer.replace("layers.", "layers#").replace(".", "/").replace("layers#", "layers.")
        matmul = matmuls[f"{path_}/MatMul"]
        dq = producer[matmul.input[1]]  # weight: DequantizeLinear straight into the MatMul
        assert dq.op_type == "DequantizeLinear"
        weight = inits[dq.input[0]]
        assert weight.data_type == expected_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        if expected_type == onnx.TensorProto.INT4:
            assert attrs == {"axis": 0, "block_size": 32}
        x = producer.get(matmul.input[0])
        if q["format"] == "fp8" or q.get("activation_scheme") == "per_tensor":
            assert x.op_type == "DequantizeLinear" and producer[x.input[0]].op_type == "QuantizeLinear"
    kv = q.get("kv_cache")
    for i in range(cfg["num_layers"]):
        new_key = producer[producer[f"present.{i}.key"].input[1]]
        assert (new_key.op_type == "DequantizeLinear") == bool(kv)


# ------------------------------------------------------------------------------ the ort-cpu flavour
ORT_CPU_ARCHS = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"]  # what its fused ops express


@pytest.fixture(scope="module")
def ort_cpu(tiny, tmp_path_factory):
    """arch -> (engine built with the default graph, torch reference), built on first use."""
    root, made = tmp_path_factory.mktemp("ort-cpu"), {}

    def get(arch):
        if arch not in made:
            _, ckpt, _, ref = tiny(arch)
            made[arch] = nbtrt.load(nbtrt.build(ckpt, root / arch, backend="onnxruntime", **LIMITS)), ref
        return made[arch]
    return get


def graph_ops(engine) -> list[str]:
    return [n.op_type for n in onnx.load(str(engine.engine_dir / "model.onnx"), load_external_data=False).graph.node]


@pytest.mark.parametrize("arch", ORT_CPU_ARCHS)
def test_ort_cpu_matches_reference(ort_cpu, arch):
    fast, ref = ort_cpu(arch)
    assert fast.graph == "ort-cpu", "the default graph on the CPU is the fused flavour"
    assert json.loads((fast.engine_dir / "engine.json").read_text())["options"]["graph"] == "ort-cpu"
    diff = prefill_and_decode([fast, ref], vocab=257)  # a left-padded batch, then 16 decode steps
    assert diff <= 1e-4, f"{arch}: max abs logit difference {diff:.2e}"
    # the next request reuses the in-place KV buffers: what the last one left there is never read
    diff = prefill_and_decode([fast, ref], vocab=257, lengths=(3, 5), steps=4, seed=1)
    assert diff <= 1e-4, f"{arch} (second request): max abs logit difference {diff:.2e}"
    ops = graph_ops(fast)
    layers = fast.config.num_layers
    assert ops.count("GroupQueryAttention") == layers and ops.count("SkipSimplifiedLayerNormalization") == 2 * layers
    assert ops.count("MatMul") == 4 * layers + 1, "qkv, o, gate|up, down per layer and the lm_head"
    assert "Concat" not in ops and "Softmax" not in ops


@pytest.mark.parametrize("arch", ORT_CPU_ARCHS)
def test_ort_cpu_capture_matches_reference(ort_cpu, arch):
    """The debugger's module names survive the fusions: each is a tensor of the fused graph."""
    fast, ref = ort_cpu(arch)
    names = ["embed", "layers.0.attn_norm", "layers.0.attn.qkv", "layers.0.attn", "layers.0.mlp_norm",
             "layers.0.mlp", "layers.0", "layers.1.attn", "layers.1", "final_norm", "lm_head"]
    ids = [[5, 9, 2, 77, 100, 3], [1, 2, 3, 4, 5, 6]]
    logits, ours = fast.capture(ids, names)
    ref_logits, theirs = ref.capture(ids, names)
    assert list(ours) == names
    for name in names:
        assert ours[name].shape == theirs[name].shape, name
        diff = (ours[name] - theirs[name]).abs().max().item()
        assert diff <= 1e-4, f"{arch} {name}: max abs {diff:.2e}"
    assert (logits - ref_logits).abs().max().item() <= 1e-4
    # a capture ends with the engine ready for the next request
    assert prefill_and_decode([fast, ref], vocab=257, steps=2) <= 1e-4


def test_ort_cpu_debug_compare_against_hf(ort_cpu, tiny):
    src, *_ = tiny("Qwen2ForCausalLM")
    fast, _ = ort_cpu("Qwen2ForCausalLM")
    report = nbtrt.debug.compare(src, fast, input_ids=[3, 17, 42, 9, 250, 11])
    assert report.first_divergence is None, report.table()


def test_ort_cpu_refused_where_it_does_not_apply(tiny, tmp_path):
    _, ckpt, *_ = tiny("Qwen3ForCausalLM")  # q/k norm: no fused expression here
    with pytest.raises(ValueError, match="q/k norm.*graph='standard'"):
        nbtrt.build(ckpt, tmp_path / "e", backend="onnxruntime", graph="ort-cpu", **LIMITS)
    with pytest.raises(ValueError, match="graph='fused' is not one of"):
        nbtrt.build(ckpt, tmp_path / "e", backend="onnxruntime", graph="fused", **LIMITS)
    assert not any(tmp_path.iterdir())
    auto = nbtrt.build(ckpt, tmp_path / "auto", backend="onnxruntime", **LIMITS)
    assert json.loads((auto / "engine.json").read_text())["options"]["graph"] == "standard"


@pytest.mark.parametrize("name", ["int8_wo", "int8_wo+lm_head", "int4_wo"])
def test_ort_cpu_quantized_matches_its_reference(quantized, name, tmp_path):
    """accuracy_level=0: the checkpoint's function in fp32 — int4 as MatMulNBits over the stored
    codes and scales, int8 dequantized into float MatMuls (ONNX Runtime has no fast fp32 int8 kernel)."""
    ckpt, _, ref = quantized(name)
    fast = nbtrt.load(nbtrt.build(ckpt, tmp_path / "e", backend="onnxruntime", graph="ort-cpu", accuracy_level=0,
                                  **LIMITS))
    diff = prefill_and_decode([fast, ref], vocab=49152)
    assert diff <= 1e-3, f"{name}: max abs logit difference {diff:.2e}"
    expected = 4 * fast.config.num_layers + name.endswith("lm_head") if name.startswith("int4") else 0
    assert graph_ops(fast).count("MatMulNBits") == expected


@pytest.mark.parametrize("name", ["int8_wo+lm_head", "int4_wo"])
def test_ort_cpu_quantized_default_within_the_formats_error(quantized, name, tmp_path):
    """The default accuracy_level=4 also rounds activations to int8 inside MatMulNBits: its distance
    from the quantized reference stays below the format's own distance from the float model."""
    ckpt, _, ref = quantized(name)
    fast = nbtrt.load(nbtrt.build(ckpt, tmp_path / "e", backend="onnxruntime", graph="ort-cpu", **LIMITS))
    assert graph_ops(fast).count("MatMulNBits") == 4 * fast.config.num_layers + name.endswith("lm_head")
    diff = prefill_and_decode([fast, ref], vocab=49152)
    format_error = prefill_and_decode([ref, quantized("float")], vocab=49152)
    assert diff <= format_error, f"{name}: {diff:.2e} vs the format's own error {format_error:.2e}"


def test_ort_cpu_zoo_greedy_equals_hf(zoo_engines, tmp_path):
    """SmolLM2 (and Qwen2.5 with --slow) in fp32: the fused graph's greedy tokens are HF's."""
    from transformers import AutoModelForCausalLM

    src, (ort, _) = zoo_engines
    ckpt = json.loads((ort.engine_dir / "engine.json").read_text())["checkpoint"]["path"]
    fast = nbtrt.load(nbtrt.build(ckpt, tmp_path / "e", backend="onnxruntime", max_batch_size=2,
                                  max_input_len=64, max_seq_len=128))
    assert fast.graph == "ort-cpu"
    hf = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=False, dtype=torch.float32).eval()
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Write a haiku about the sea."}]]
    ends = set(fast.end_token_ids)

    def until_end(tokens):  # HF keeps the end token it stopped at; the engine's generate need not
        return tokens[:next((k for k, t in enumerate(tokens) if t in ends), len(tokens))]
    for chat in chats:
        ids = fast.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        got = fast.generate(input_ids=[ids], max_new_tokens=32, temperature=0.0)[0]
        assert until_end(got) == until_end(want) and len(until_end(want)) >= 5, (got, want)


def test_float16_engine(tiny, tmp_path):
    """A float32 checkpoint built as a float16 engine runs the float16 graph; compared with the
    reference decoder cast to float16 (fp16 rounding, so a looser bar than fp32)."""
    _, ckpt, _, _ = tiny("Qwen2ForCausalLM")
    ort = nbtrt.load(nbtrt.build(ckpt, tmp_path / "fp16", backend="onnxruntime", dtype="float16", **LIMITS))
    ref = nbtrt.load(nbtrt.build(ckpt, tmp_path / "ref", backend="torch", **LIMITS), device="cpu", dtype="float16")
    assert json.loads((tmp_path / "fp16" / "engine.json").read_text())["decoder"]["dtype"] == "float16"
    model = onnx.load(str(tmp_path / "fp16" / "model.onnx"), load_external_data=False)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    diff = prefill_and_decode([ort, ref], vocab=257)
    assert diff <= 5e-3, f"max abs logit difference {diff:.2e}"
    with pytest.raises(ValueError, match="no bfloat16 kernels.*dtype='float32'"):
        nbtrt.build(ckpt, tmp_path / "bf16", backend="onnxruntime", dtype="bfloat16", **LIMITS)
    with pytest.raises(ValueError, match=r"dtype='fp16' is not one of \['bfloat16', 'float16', 'float32'\]"):
        nbtrt.build(ckpt, tmp_path / "typo", backend="onnxruntime", dtype="fp16", **LIMITS)
    assert not (tmp_path / "typo").exists()
    assert not (tmp_path / "bf16").exists()


# ------------------------------------------------------------------------------ notebook helpers
def test_memory_plan_against_real_tensors(tiny):
    """The plan's float32 numbers against what the engine really holds: the weight file's size
    and the bytes of the present tensors after a prefill."""
    from nbtrt.memory import memory_plan

    _, ckpt, ort, _ = tiny("LlamaForCausalLM")
    B, T = 2, 9
    ort.begin(B)
    ort.step(torch.randint(0, 257, (B, T)), torch.ones(B, T, dtype=torch.long))
    kv_bytes = sum(v.numpy().nbytes for v in ort._past)
    row = memory_plan(ort.config, max_batch_size=B, max_seq_len=T)[0]
    assert row["precision"] == "float32"
    assert row["kv_cache_gib"] == pytest.approx(kv_bytes / 2 ** 30, rel=1e-3, abs=1e-6)
    data = (ort.engine_dir / "model.onnx.data").stat().st_size
    assert row["weights_gib"] == pytest.approx(data / 2 ** 30, rel=0.02)


def test_build_options_widget(tiny, tmp_path):
    from nbtrt.widgets import BuildOptions

    _, ckpt, *_ = tiny("Qwen2ForCausalLM")
    opts = BuildOptions(max_batch_size=2, max_input_len=16, max_seq_len=32)
    assert opts.backend.value == default_backend()
    assert opts.builder_opt_level.layout.display == "none"
    opts.backend.value = "tensorrt"
    assert opts.builder_opt_level.layout.display is None
    if BACKENDS["tensorrt"].available():
        assert "tensorrt cannot build here" in opts.status.value
        opts.max_input_len.value = 64  # the backend's problem stays shown while the limits change
        assert "tensorrt cannot build here" in opts.status.value and "max_input_len" in opts.status.value
        opts.max_input_len.value = 16
        assert "tensorrt cannot build here" in opts.status.value
    opts.backend.value = "onnxruntime"
    assert "cannot build here" not in opts.status.value
    opts.dtype.value = "float16"
    opts.max_input_len.value = 64
    assert "max_input_len must not exceed max_seq_len" in opts.status.value
    opts.max_input_len.value = 16
    assert opts.kwargs == {"backend": "onnxruntime", "max_batch_size": 2, "max_input_len": 16, "max_seq_len": 32,
                           "dtype": "float16"}
    edir = nbtrt.build(ckpt, tmp_path / "e", **opts.kwargs)
    summary = nbtrt.export.engine_summary(edir)
    assert {f["file"] for f in summary["files"]} >= {"model.onnx", "model.onnx.data"}
    assert {r["weight"] for r in summary["linears"]} == {"float16"}
    assert summary["linears"][0] == {"module": "layers.0.attn.qkv", "weight": "float16", "block": None,
                                     "activation": "float16", "in x out": [64, 128]}


def test_memory_view_follows_the_build_options(tiny, capsys):
    """The memory figure redraws when a limit changes (outside a kernel the Output widget's
    displays go to stdout, which is what this reads)."""
    from nbtrt.config import load_checkpoint_config
    from nbtrt.widgets import BuildOptions
    from nbtrt.widgets.build import memory_view

    _, ckpt, *_ = tiny("Qwen2ForCausalLM")
    cfg, _ = load_checkpoint_config(ckpt)
    opts = BuildOptions(max_batch_size=2, max_input_len=16, max_seq_len=32)
    memory_view(cfg, opts)
    assert "max_batch_size=2, max_seq_len=32" in capsys.readouterr().out
    opts.max_seq_len.value = 64
    assert "max_batch_size=2, max_seq_len=64" in capsys.readouterr().out


def test_tensorrt_profiles_cover_the_limits(tiny):
    """The optimization profiles TensorRT would get (pure Python: the only part of the TensorRT
    backend that runs without tensorrt): every shape the ONNX Runtime engine accepted in
    prefill_and_decode lies inside the context or the generation profile."""
    from nbtrt.runtimes.tensorrt import optimization_profiles
    from nbtrt.engine import EngineLimits

    *_, ort, _ = tiny("Qwen2ForCausalLM")
    cfg, lim = ort.config, EngineLimits(**LIMITS)
    context, generation = optimization_profiles(cfg, lim)
    assert set(context) == set(generation) == set(nbtrt.export.input_names(cfg))

    def inside(profile, shapes):
        return all(all(lo <= s <= hi for lo, s, hi in zip(profile[n][0], shape, profile[n][2]))
                   for n, shape in shapes.items())

    def shapes(batch, seq, past):
        kv = (batch, cfg.num_kv_heads, past, cfg.head_dim)
        return {"input_ids": (batch, seq), "position_ids": (batch, seq), "attention_mask": (batch, past + seq),
                **{n: kv for n in nbtrt.export.input_names(cfg)[3:]}}

    for batch in (1, lim.max_batch_size):
        for seq in (1, lim.max_input_len):
            assert inside(context, shapes(batch, seq, 0))
        for past in (1, lim.max_seq_len - 1):
            assert inside(generation, shapes(batch, 1, past))
    assert not inside(context, shapes(lim.max_batch_size + 1, 1, 0))
    assert not inside(generation, shapes(1, 1, lim.max_seq_len))
