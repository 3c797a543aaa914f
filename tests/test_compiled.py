"""The compiled torch engine (torch.compile on CPU here; CUDA graphs on GPU) and its quantized linears."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import nbtrt
from nbtrt.runtimes.torch_linears import QUANT_FORMATS, quantize_linears
from nbtrt.runtimes.torch_engine import TorchEngine
from nbtrt.debug.metrics import tensor_metrics
from nbtrt.generate import GenerationState, SamplingParams, generate_tokens
from nbtrt.testing import tiny_hf_model

ARCH = "Qwen2ForCausalLM"  # QKV bias, tied embeddings, GQA: the flags most likely to break a fast path


def rel_l2(ref: torch.Tensor, cand: torch.Tensor) -> float:
    """||cand - ref|| / ||ref||, in float64 (the debugger's metric)."""
    return tensor_metrics(ref, cand)["rel_l2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled")
    src = tiny_hf_model(ARCH, root / "hf")
    return src, nbtrt.convert(src, root / "ckpt")


@pytest.fixture(scope="module")
def compiled(tiny, tmp_path_factory):
    _, ckpt = tiny
    edir = nbtrt.build(ckpt, tmp_path_factory.mktemp("e") / "engine", backend="torch", max_batch_size=2,
                       max_input_len=16, max_seq_len=32, compile=True)
    return nbtrt.load(edir, device="cpu", warmup=False)


def _batch():
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (9, 5)]
    ids = torch.tensor([[0] * (9 - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (9 - len(p)) + [1] * len(p) for p in prompts])
    return prompts, ids, mask, torch.randint(0, 257, (2, 6), generator=g)


def test_compiled_engine_matches_hf(tiny, compiled):
    src, _ = tiny
    assert compiled.compiled and json.loads((compiled.engine_dir / "engine.json").read_text())["options"] == {"compile": True}
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    _, ids, mask, follow = _batch()
    compiled.begin(2)
    ours = [compiled.step(ids, mask)]
    for t in range(follow.shape[1]):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        ours.append(compiled.step(follow[:, t:t + 1], mask))
    with torch.no_grad():
        full = ref(input_ids=torch.cat([ids, follow], 1), attention_mask=mask,
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, 8:]
    diff = (torch.stack(ours, 1) - full).abs()
    assert diff.max().item() <= 1e-4, f"max {diff.max():.2e} mean {diff.mean():.2e}"


def test_compiled_greedy_tokens_equal_eager(tiny, compiled):
    _, ckpt = tiny
    eager = TorchEngine.from_decoder(nbtrt.model.load_decoder(ckpt), max_batch_size=2, max_seq_len=32, compile=False)
    prompts, *_ = _batch()
    got = []
    for engine in (eager, compiled):
        state = GenerationState(prompts)
        for _ in generate_tokens(engine, prompts, SamplingParams(max_new_tokens=12), state=state):
            pass
        got.append(state.tokens)
    assert got[0] == got[1] and len(got[0][0]) == 12


def test_second_engine_reuses_compiled_graphs(tiny, compiled):
    """A reload compiles nothing new: the graphs are shared (and Inductor's disk cache serves new processes)."""
    from torch._dynamo.utils import counters

    _, ckpt = tiny
    prompts, *_ = _batch()
    for _ in generate_tokens(compiled, prompts, SamplingParams(max_new_tokens=2)):
        pass
    before = counters["stats"]["unique_graphs"]
    again = TorchEngine.from_decoder(nbtrt.model.load_decoder(ckpt), max_batch_size=2, max_seq_len=32, compile=True,
                                     warmup=False)
    for _ in generate_tokens(again, prompts, SamplingParams(max_new_tokens=3)):
        pass
    assert counters["stats"]["unique_graphs"] == before


def test_capture_still_works_on_compiled_engine(compiled):
    prompts, ids, _, _ = _batch()
    logits, caught = compiled.capture([prompts[0]], ["embed", "layers.1.attn", "layers.1", "final_norm"])
    assert set(caught) == {"embed", "layers.1.attn", "layers.1", "final_norm"}
    assert caught["layers.1"].shape == (1, 9, 64)
    compiled.begin(1)
    last = compiled.step(torch.tensor([prompts[0]]), torch.ones(1, 9, dtype=torch.long))
    torch.testing.assert_close(logits[:, -1], last, rtol=1e-4, atol=1e-4)


def _reference(fmt, w, x):
    """Each format's arithmetic as nbtrt.layouts documents it, written out in float32."""
    if fmt in ("int8_wo", "int8_sq"):
        s = w.abs().amax(1, keepdim=True) / 127
        wd = (w / s).round().clamp(-127, 127) * s
        if fmt == "int8_sq":  # activations per token at run time
            xs = x.abs().amax(1, keepdim=True) / 127
            x = (x / xs).round().clamp(-127, 127) * xs
        return x @ wd.t()
    if fmt == "int4_wo":  # symmetric int4 per group of 64 inputs (the largest of 128/64/32 dividing 64)
        N, K = w.shape
        wg = w.reshape(N, K // 64, 64)
        s = wg.abs().amax(-1, keepdim=True) / 7
        return x @ ((wg / s).round().clamp(-8, 7) * s).reshape(N, K).t()
    s = w.abs().amax() / 448  # fp8: weight per tensor, activations per token
    xs = x.abs().amax(1, keepdim=True) / 448
    return ((x / xs).to(torch.float8_e4m3fn).float() * xs) @ ((w / s).to(torch.float8_e4m3fn).float() * s).t()


def _turns(engine, prompt: list[int], batch: int) -> list[torch.Tensor]:
    """Logits of a prompt (the same one in each of ``batch`` rows), 4 decode steps (fixed tokens,
    so a near tie cannot change what follows), then a second turn of 3 tokens prefilled after them
    (attending over the slots a padded prefill wrote)."""
    dev = engine.device
    ids = torch.tensor([prompt] * batch, device=dev)
    mask = torch.ones_like(ids)
    engine.begin(batch)
    out = [engine.step(ids, mask)]
    for token in (21, 22, 23, 24):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out.append(engine.step(torch.full((batch, 1), token, device=dev), mask))
    turn = torch.tensor([[11, 12, 13]] * batch, device=dev)
    out.append(engine.step(turn, torch.cat([mask, torch.ones_like(turn)], 1)))
    return out


def test_graphed_prefill_pads_the_prompt_and_keeps_its_logits(tiny):
    """A graphed prefill pads the prompt on the right to its bucket (off CUDA: the same static path,
    no graph): the prompt's last logits, decode after it and a second turn over the padded slots
    equal the prompt's own-length prefill's."""
    _, ckpt = tiny
    engine = TorchEngine.from_decoder(nbtrt.model.load_decoder(ckpt), max_batch_size=2, max_seq_len=32, compile=False,
                                      graph_prefill=True)
    assert engine.graph_prefill
    g = torch.Generator().manual_seed(5)
    for n, batch, bucket in ((5, 2, 8), (9, 1, 16), (16, 1, 16)):
        prompt = torch.randint(0, 257, (n,), generator=g).tolist()
        got = {}
        for graphed in (False, True):
            engine.graph_prefill = graphed
            got[graphed] = torch.stack(_turns(engine, prompt, batch))
        assert set(engine._prefill_static) == {(batch, bucket)}
        torch.testing.assert_close(got[True], got[False], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", sorted(QUANT_FORMATS))
def test_quantized_linear_matches_its_arithmetic(fmt):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=True)
    holder = torch.nn.Sequential(lin)
    report = quantize_linears(holder, fmt)
    assert report == {"format": fmt, "quantized": 1, "kept": []}
    assert type(holder[0]).__name__ == {"int8_wo": "Int8WeightOnlyLinear", "int4_wo": "Int4WeightOnlyLinear",
                                        "fp8": "FP8Linear", "int8_sq": "W8A8Linear"}[fmt]
    x = torch.randn(5, 64)
    with torch.no_grad():
        got = holder(x)
        want = _reference(fmt, lin.weight, x) + lin.bias
        exact = x @ lin.weight.t() + lin.bias
    err = rel_l2(want, got)
    assert err <= 1e-4 if fmt != "int4_wo" else err <= 3e-3, err  # int4 kernel keeps scale/zero in its dtype
    # and quantization error itself is what the format promises, not garbage
    bound = {"int8_wo": 0.02, "int8_sq": 0.03, "fp8": 0.08, "int4_wo": 0.2}[fmt]
    assert rel_l2(exact, got) <= bound


def test_old_torch_quant_name_maps_to_nbtrt_quantize_name():
    """The torch engine's formats are nbtrt.quantize's; its old name ``w8a8`` still works, with a warning."""
    holder = torch.nn.Sequential(torch.nn.Linear(64, 96))
    with pytest.warns(DeprecationWarning, match="int8_sq"):
        report = quantize_linears(holder, "w8a8")
    assert report["format"] == "int8_sq" and type(holder[0]).__name__ == "W8A8Linear"


@pytest.mark.parametrize("fmt", ["int8_wo", "int4_wo"])
def test_quantized_engine_close_to_float_and_capturable(tiny, tmp_path, fmt):
    _, ckpt = tiny
    float_engine = nbtrt.load(nbtrt.build(ckpt, tmp_path / "f", backend="torch", max_seq_len=32, max_input_len=16),
                              device="cpu")
    q = nbtrt.load(nbtrt.build(ckpt, tmp_path / "q", backend="torch", max_seq_len=32, max_input_len=16, quant=fmt),
                   device="cpu")
    # 2 layers x (qkv, o, gate, up, down) + lm_head; tinygemm needs out_features % 8 == 0 (vocab 257 is not)
    assert q.quant_report["quantized"] == {"int8_wo": 11, "int4_wo": 10}[fmt]
    assert q.quant_report["kept"] == ({"int8_wo": [], "int4_wo": ["lm_head"]}[fmt])
    prompts, ids, mask, _ = _batch()
    a, _ = float_engine.capture([prompts[0]], ["layers.0"])
    b, caught = q.capture([prompts[0]], ["layers.0"])
    rel = rel_l2(a, b)
    assert 0 < rel <= {"int8_wo": 0.02, "int4_wo": 0.25}[fmt], rel
    assert caught["layers.0"].shape == (1, 9, 64)


def test_torch_build_options_are_checked(tiny, tmp_path):
    _, ckpt = tiny
    with pytest.raises(ValueError, match="quant='int3'"):
        nbtrt.build(ckpt, tmp_path / "a", backend="torch", quant="int3")
    with pytest.raises(ValueError, match="unknown torch build options"):
        nbtrt.build(ckpt, tmp_path / "b", backend="torch", fused=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_engine_matches_hf_bf16(tiny):
    src, _ = tiny
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).cuda().eval()
    engine = TorchEngine.from_decoder(nbtrt.model.load_decoder(tiny[1], device="cuda", dtype="bfloat16"),
                                      max_batch_size=2, max_seq_len=32)
    assert engine.compiled  # the default on CUDA
    _, ids, mask, follow = _batch()
    ids, mask, follow = ids.cuda(), mask.cuda(), follow.cuda()
    engine.begin(2)
    ours = [engine.step(ids, mask)]
    for t in range(follow.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        ours.append(engine.step(follow[:, t:t + 1], mask))
    with torch.no_grad():
        full = ref(input_ids=torch.cat([ids, follow], 1), attention_mask=mask,
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, 8:]
    ours = torch.stack(ours, 1).double()
    assert rel_l2(full, ours) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quant", [None, "int4_wo"])
def test_cuda_graphed_prefill_equals_the_unpadded_one(tiny, quant):
    """On CUDA a short causal prompt prefills through a captured graph at its bucketed length:
    logits, decode and a second turn as the prompt's own-length prefill gives them (fp32; INT4 in
    bf16, where padding 50 rows to 64 changes the kernel: a GEMV kernel below 64, dequantize + cuBLAS
    from 64)."""
    dtype = "bfloat16" if quant else "float32"
    engine = TorchEngine.from_decoder(nbtrt.model.load_decoder(tiny[1], device="cuda", dtype=dtype),
                                      max_batch_size=2, max_seq_len=96, quant=quant)
    g = torch.Generator().manual_seed(5)
    for n, batch, bucket in ((5, 2, 8), (9, 1, 16), (50, 1, 64), (70, 1, None)):
        prompt = torch.randint(0, 257, (n,), generator=g).tolist()
        got = {}
        for graphed in (False, True):
            engine.graph_prefill = graphed
            got[graphed] = torch.stack(_turns(engine, prompt, batch)).double()
        if bucket:
            assert engine._prefill_static[batch, bucket].graph is not None
        else:  # 128 slots would not fit in the cache: the prompt's own length, no graph
            assert (batch, 128) not in engine._prefill_static
        assert rel_l2(got[False], got[True]) <= (2e-2 if quant else 1e-5), (n, batch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_prefill_attention_is_not_cudnns(tmp_path):
    """cuDNN's attention plans each new prompt length anew (README, "The first token"): the
    compiled prefill, causal and padded, runs flash or memory-efficient attention instead. Heads
    of 128 dimensions, as the 8B config's, where PyTorch would pick cuDNN's on an H100."""
    from torch.profiler import ProfilerActivity, profile

    src = tiny_hf_model(ARCH, tmp_path / "hf", hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=128)
    engine = TorchEngine.from_decoder(nbtrt.model.load_decoder(nbtrt.convert(src, tmp_path / "ckpt"), device="cuda",
                                                               dtype="bfloat16"), max_batch_size=2, max_seq_len=32)
    _, ids, mask, _ = _batch()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for m in (torch.ones_like(mask), mask):  # causal, then padded (an explicit mask)
            engine.begin(2)
            engine.step(ids.cuda(), m.cuda())
    ops = {e.key for e in prof.key_averages()}
    assert not [op for op in ops if "cudnn_attention" in op]
    assert {op for op in ops if "flash_attention" in op or "efficient_attention" in op}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generation_queued_ahead_equals_step_by_step(tiny):
    """On CUDA the loop queues each next step before it copies this step's tokens back."""
    engine = TorchEngine.from_decoder(nbtrt.model.load_decoder(tiny[1], device="cuda", dtype="bfloat16"),
                                      max_batch_size=2, max_seq_len=32)
    assert engine.queues_steps
    prompts, *_ = _batch()
    for params in (SamplingParams(max_new_tokens=20),
                   SamplingParams(max_new_tokens=20, do_sample=True, top_k=0, seed=3)):
        got = {}
        for ahead in (True, False):
            engine.queues_steps = ahead
            state = GenerationState(prompts)
            for _ in generate_tokens(engine, prompts, params, state=state):
                pass
            got[ahead] = state.tokens
        assert got[True] == got[False] and len(got[True][0]) == 20


@pytest.mark.parametrize("fmt,group,fast", [("int8_wo", 128, 10), ("int4_wo", 32, 10), ("int4_wo", 128, 0)])
def test_quantized_checkpoint_runs_on_kernels(tiny, tmp_path, fmt, group, fast):
    """A checkpoint from nbtrt.quantize loads into kernel-backed modules that compute what its
    reference modules (formats.QuantLinear, dequantize then matmul) compute. Shapes the kernel
    cannot take (int4 groups of 128 over 64 / 96 inputs) keep the reference module, reported."""
    from nbtrt.quantize import quantize
    from nbtrt.layouts import QuantLinear

    _, ckpt = tiny
    qckpt = quantize(ckpt, tmp_path / "q", fmt, group_size=group)
    reference = nbtrt.model.load_decoder(qckpt)
    assert any(isinstance(m, QuantLinear) for m in reference.modules())
    engine = nbtrt.load(nbtrt.build(qckpt, tmp_path / "e", backend="torch", max_seq_len=32, max_input_len=16),
                        device="cpu")
    assert engine.quant == fmt and engine.quant_report["quantized"] == fast
    assert len(engine.quant_report["kept"]) == 10 - fast
    assert sum(isinstance(m, QuantLinear) for m in engine.model.modules()) == 10 - fast
    prompts, *_ = _batch()
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        want = reference(ids)[:, -1]
    engine.begin(1)
    got = engine.step(ids, torch.ones_like(ids))
    assert rel_l2(want, got) <= 1e-5


def test_int8_down_projection_reads_a_realized_input(tiny):
    """Only mlp.down asks for its input in memory (Inductor would recompute silu(gate) * up for
    every output row of the GEMV); the copy changes no number."""
    _, ckpt = tiny
    model = nbtrt.model.load_decoder(ckpt)
    quantize_linears(model, "int8_wo")
    flags = {name: m.realize_input for name, m in model.named_modules() if hasattr(m, "realize_input")}
    assert flags and all(on == name.endswith("mlp.down") for name, on in flags.items())
    down = model.layers[0].mlp.down
    x = torch.randn(1, 1, down.weight.shape[1])
    with torch.no_grad():
        realized = down(x)
        down.realize_input = False
        torch.testing.assert_close(down(x), realized, rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_decode_attention_equals_sdpa_on_expanded_heads(dtype, device):
    """The compiled decode's attention reads each KV head once for its query heads; it must give
    what SDPA gives on the expanded heads, masked slots (padding, unfilled cache) included."""
    from nbtrt.runtimes.torch_attention import grouped_decode_attention

    g = torch.Generator().manual_seed(0)
    B, H, KV, S, D = 2, 6, 2, 11, 16
    q, k, v = (torch.randn(*shape, generator=g).to(device, dtype) for shape in ((B, H, 1, D), (B, KV, S, D), (B, KV, S, D)))
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.4
    mask[..., 0] = True
    mask = mask.to(device)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.repeat_interleave(H // KV, 1).float(), v.repeat_interleave(H // KV, 1).float(),
        attn_mask=mask, scale=0.3)
    got = grouped_decode_attention(q, k, v, mask, 0.3)
    assert got.dtype == dtype and got.shape == (B, H, 1, D)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_l2(want, got) <= tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("in_features,group,mma", [(4096, 128, True), (192, 64, True), (64, 32, False), (96, 32, False)])
def test_int4_prefill_dequantizes_exactly_what_the_decode_kernel_multiplies(in_features, group, mma):
    """INT4 on CUDA takes nbtrt's mma kernel where it fits (groups of 64 inputs or more), else
    tinygemm (8, 4 and 2 inner k-tiles here, its layout found by probing its packing kernel). A
    prefill reads the weight back out of either layout and runs one bf16 matmul: the weight is bit
    for bit the checkpoint's, and the product agrees with the decode kernel's, token by token."""
    from nbtrt.runtimes.torch_linears import Int4WeightOnlyLinear
    from nbtrt.layouts import quantize_int4, unpack_int4

    torch.manual_seed(0)
    w = torch.randn(256, in_features, device="cuda") * 0.02
    packed, scale = quantize_int4(w, group)
    lin = Int4WeightOnlyLinear(packed, scale, group, None, torch.bfloat16)
    assert lin.mma == mma and (lin.mma or lin.tile_order is not None), lin.mma_unavailable
    want = (unpack_int4(packed).float() * scale.bfloat16().float().repeat_interleave(group, 1)).bfloat16()
    assert torch.equal(lin.dequantize(), want)
    x = torch.randn(2, 40, in_features, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        prefill = lin(x)
        by_token = torch.cat([lin(x[:, i:i + 1]) for i in range(x.shape[1])], 1)  # the decode kernel
        compiled = torch.compile(lin, dynamic=True, fullgraph=True)(x)
    assert rel_l2(by_token, prefill) <= 1e-2
    torch.testing.assert_close(compiled, prefill, rtol=1e-2, atol=1e-2)


def test_int4_mma_layout_unpacks_to_the_nibbles_it_packed():
    """The mma kernel's pre-shuffled words hold every nibble once, and unpack() reads them back;
    slicing the rows (lm_head-sized weights) does not change the words."""
    from nbtrt.kernels import cuda_int4

    u = torch.randint(0, 16, (48, 192), dtype=torch.int32)
    words = cuda_int4.pack(u)
    assert words.dtype == torch.int32 and words.numel() == u.numel() // 8
    assert torch.equal(cuda_int4.unpack(words, 48, 192), u)
    assert torch.equal(cuda_int4.pack(u, rows_per_step=16), words)
    assert cuda_int4.unavailable_reason(torch.device("cpu"), 48, 192, 64) is not None
    assert not cuda_int4.fits(40, 192, 64) and not cuda_int4.fits(48, 192, 32) and cuda_int4.fits(48, 192, 64)


def _random_int4_weight(out_features: int, in_features: int, group: int):
    """Seeded nibbles u = q + 8 [N, K] and bf16 scales [N, K / group] on CUDA, and the fp32 weight
    they stand for, ``(u - 8) * scale``."""
    torch.manual_seed(0)
    u = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32, device="cuda")
    scale = (torch.rand(out_features, in_features // group, device="cuda") / 50 + 1e-3).bfloat16()
    return u, scale, (u - 8).float() * scale.float().repeat_interleave(group, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 63])
@pytest.mark.parametrize("out_features,in_features,group", [(4096, 4096, 128), (6144, 4096, 128), (4096, 14336, 128),
                                                            (48, 576, 64), (160, 512, 256)])
def test_int4_mma_kernel_equals_dequantize_then_matmul(rows, out_features, in_features, group):
    """The mma kernel gives the dequantized weight's product (fp32) within bf16 rounding, for 1 to
    8 rows (the B operand's columns, partly filled) and more (one launch per 8), on the 8B model's
    shapes (1, 8 and 16 warps a block) and small ones (1 warp, groups of 64 and 256)."""
    from nbtrt.kernels import cuda_int4

    u, scale, weight = _random_int4_weight(out_features, in_features, group)
    assert cuda_int4.unavailable_reason(u.device, out_features, in_features, group) is None
    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
    got = torch.ops.nbtrt.int4_mm(x, cuda_int4.pack(u), scale.t().contiguous(), group)
    assert got.shape == (rows, out_features) and got.dtype == torch.bfloat16
    assert rel_l2(x.float() @ weight.t(), got) <= 4e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [64, 100, 300])
@pytest.mark.parametrize("out_features,in_features,group", [(4096, 4096, 128), (4096, 14336, 128), (48, 576, 64),
                                                            (160, 512, 256)])
def test_int4_triton_kernel_equals_dequantize_then_matmul(rows, out_features, in_features, group):
    """The Triton kernel reads the packed words as they are (nibbles in the decode kernel's order,
    inputs taken in that order too) and gives the dequantized weight's product (fp32) within bf16
    rounding, for rows that fill its row tiles or not and weights of whole and partial column tiles."""
    from nbtrt.kernels import cuda_int4, triton_int4

    u, scale, weight = _random_int4_weight(out_features, in_features, group)
    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
    assert triton_int4.takes(x)
    got = torch.ops.nbtrt.int4_weight_mm(x, cuda_int4.pack(u), scale.t().contiguous(), group)
    assert got.shape == (rows, out_features) and got.dtype == torch.bfloat16
    assert rel_l2(x.float() @ weight.t(), got) <= 4e-3


def test_dependent_launch_structs_have_cuda_h_layout():
    """cuLaunchKernelEx reads CUlaunchConfig and CUlaunchAttribute by offset, as cuda.h lays them out
    on 64-bit hosts; the attribute is CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION (6), on."""
    import ctypes

    from nbtrt.kernels import nvrtc

    config = nvrtc._LaunchConfig
    fields = ("grid", "block", "shared_bytes", "stream", "attrs", "num_attrs")
    assert [getattr(config, f).offset for f in fields] == [0, 12, 24, 32, 40, 48] and ctypes.sizeof(config) == 56
    attribute = nvrtc._LaunchAttribute
    assert (attribute.id.offset, attribute.value.offset, ctypes.sizeof(attribute)) == (0, 8, 72)
    assert (nvrtc._DEPENDENT.id, nvrtc._DEPENDENT.value) == (6, 1)


def test_gate_up_interleave_puts_a_tiles_gate_rows_over_its_up_rows():
    """The fused INT4 MLP input's weight: each 16-row tile of the kernel holds 8 gate rows, then the
    up rows of the same 8 outputs, so the tile's epilogue has both halves of act(gate) * up."""
    from nbtrt.kernels import cuda_int4

    gate = torch.arange(16 * 3).view(16, 3)
    up = -gate - 1
    both = cuda_int4.interleave_gate_up(gate, up)
    assert both.shape == (32, 3)
    for tile in range(2):
        assert torch.equal(both[16 * tile:16 * tile + 8], gate[8 * tile:8 * tile + 8])
        assert torch.equal(both[16 * tile + 8:16 * tile + 16], up[8 * tile:8 * tile + 8])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("rows", [1, 5, 63, 80])
def test_int4_gated_input_equals_its_two_projections(activation, rows):
    """``act(gate(x)) * up(x)`` from the fused module (one launch, the activation applied in the
    kernel; 64 rows or more: one matmul of the interleaved weight) equals the two INT4 linears and the
    activation run apart."""
    from nbtrt.runtimes.torch_linears import Int4GatedInput, Int4WeightOnlyLinear
    from nbtrt.model import ACTIVATIONS
    from nbtrt.layouts import quantize_int4

    torch.manual_seed(0)
    I, K, group = 1024, 512, 128
    gate, up = (Int4WeightOnlyLinear(*quantize_int4(torch.randn(I, K, device="cuda") * 0.05, group), group, None,
                                     torch.bfloat16) for _ in range(2))
    assert Int4GatedInput.takes(gate, up, activation)
    fused = Int4GatedInput(gate, up, activation)
    x = torch.randn(1, rows, K, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = ACTIVATIONS[activation](gate(x)) * up(x)
        got = fused(x)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert rel_l2(want, got) <= 5e-3


def test_int8_kernel_takes_whole_tiles_and_only_cuda():
    from nbtrt.kernels import cuda_int8

    assert cuda_int8.fits(48, 192) and not cuda_int8.fits(40, 192) and not cuda_int8.fits(48, 96)
    assert cuda_int8.unavailable_reason(torch.device("cpu"), 48, 192) is not None
    lin = torch.nn.Sequential(torch.nn.Linear(192, 48, bias=False).bfloat16())
    quantize_linears(lin, "int8_wo")
    assert not lin[0].gemv and "CUDA" in lin[0].gemv_unavailable


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
@pytest.mark.parametrize("out_features,in_features", [(4096, 4096), (1024, 4096), (4096, 14336), (48, 576), (160, 64)])
def test_int8_mma_kernel_equals_the_eager_module(rows, out_features, in_features):
    """nbtrt's INT8 kernel gives the eager module's ``linear(x, w) * scale`` within bf16 rounding,
    for 1 to 8 rows (the B operand's columns, partly filled) and more (one launch per 8), on the 8B
    model's shapes (4 and 16 warps a block) and small ones (one chunk a warp)."""
    from nbtrt.kernels import cuda_int8

    torch.manual_seed(0)
    weight = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8, device="cuda")
    scale = (torch.rand(out_features, device="cuda") / 100 + 1e-4).bfloat16()
    assert cuda_int8.unavailable_reason(weight.device, out_features, in_features) is None
    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
    got = torch.ops.nbtrt.int8_mm(x, weight, scale)
    assert got.shape == (rows, out_features) and got.dtype == torch.bfloat16
    assert rel_l2((x.float() @ weight.float().t()) * scale.float(), got) <= 4e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("rows", [1, 5, 9])
def test_int8_gated_input_equals_its_two_projections(activation, rows):
    """``act(gate(x)) * up(x)`` from the fused INT8 module (one launch up to 8 rows, the two
    linears past that) equals the two INT8 linears' eager arithmetic and the activation."""
    from nbtrt.runtimes.torch_linears import Int8GatedInput
    from nbtrt.model import ACTIVATIONS

    torch.manual_seed(0)
    I, K = 1024, 512
    holder = torch.nn.Sequential(*(torch.nn.Linear(K, I, bias=False).cuda().bfloat16() for _ in range(2)))
    quantize_linears(holder, "int8_wo")
    gate, up = holder
    assert Int8GatedInput.takes(gate, up, activation)
    fused = Int8GatedInput(gate, up, activation)
    x = torch.randn(1, rows, K, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = fused(x)
        gate.gemv = up.gemv = False  # the reference: the eager modules' linear(x, w) * scale
        want = ACTIVATIONS[activation](gate(x)) * up(x)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert rel_l2(want, got) <= 5e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [2, 17, 63])
def test_int8_triton_kernel_equals_dequantize_then_matmul(rows):
    """The Triton INT8 kernel (a few rows: batched decode, short prompts) gives the eager product,
    the weight dequantized then multiplied, for row counts that fill its 64-row tile partly, and
    output counts that are not a whole number of its column blocks."""
    from nbtrt.kernels import triton_int8

    torch.manual_seed(0)
    weight = torch.randint(-127, 128, (200, 384), dtype=torch.int8, device="cuda")
    scale = torch.rand(200, device="cuda", dtype=torch.bfloat16) / 100
    x = torch.randn(rows, 384, device="cuda", dtype=torch.bfloat16)
    assert triton_int8.takes(x, weight)
    want = (x.float() @ weight.float().t()).bfloat16() * scale
    got = torch.ops.nbtrt.int8_weight_mm(x, weight, scale)
    assert rel_l2(want, got) <= 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_int8_linear_takes_its_kernel_by_rows():
    """Compiled, an INT8 linear runs nbtrt's kernel in the graph up to 8 rows, the Triton kernel
    below MANY_ROWS rows and dequantize + cuBLAS from there; all agree with the eager module."""
    from torch._inductor.utils import run_and_get_code

    from nbtrt.runtimes.torch_linears import MANY_ROWS

    torch.manual_seed(0)
    holder = torch.nn.Sequential(torch.nn.Linear(512, 768, bias=False).cuda().bfloat16())
    quantize_linears(holder, "int8_wo")
    lin = holder[0]
    kernels = ("nbtrt.int8_mm", "int8_weight_mm_kernel", "extern_kernels.mm")  # nbtrt's, Triton, cuBLAS
    for rows, kernel in ((8, kernels[0]), (9, kernels[1]), (MANY_ROWS, kernels[2])):
        x = torch.randn(rows, 1, 512, device="cuda", dtype=torch.bfloat16)
        torch._dynamo.reset()
        with torch.no_grad():
            got, (code,) = run_and_get_code(torch.compile(lin, fullgraph=True), x)
            lin.gemv = False  # the eager reference: linear(x, w) * scale
            want = lin(x)
            lin.gemv = True
        assert rel_l2(want, got) <= 1e-2
        assert [k for k in kernels if k in code] == [kernel], rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_int4_linear_takes_its_kernel_by_rows():
    """Compiled, an INT4 linear runs nbtrt's kernel in the graph below MANY_ROWS rows, the Triton
    kernel up to INT4_TRITON_MAX_ROWS and dequantize + cuBLAS past it; all agree with the eager
    module's dequantized weight."""
    from torch._inductor.utils import run_and_get_code

    from nbtrt.runtimes.torch_linears import INT4_TRITON_MAX_ROWS, MANY_ROWS

    torch.manual_seed(0)
    holder = torch.nn.Sequential(torch.nn.Linear(512, 768, bias=False).cuda().bfloat16())
    quantize_linears(holder, "int4_wo")
    lin = holder[0]
    assert lin.mma, lin.mma_unavailable
    kernels = ("nbtrt.int4_mm", "int4_weight_mm_kernel", "nbtrt.int4_dequantize")  # nbtrt's, Triton, cuBLAS
    for rows, kernel in ((MANY_ROWS - 1, kernels[0]), (MANY_ROWS, kernels[1]), (INT4_TRITON_MAX_ROWS, kernels[1]),
                         (INT4_TRITON_MAX_ROWS + 1, kernels[2])):
        x = torch.randn(rows, 1, 512, device="cuda", dtype=torch.bfloat16)
        torch._dynamo.reset()
        with torch.no_grad():
            got, (code,) = run_and_get_code(torch.compile(lin, fullgraph=True), x)
            want = x @ lin.dequantize().t()
        assert rel_l2(want, got) <= 1e-2
        assert [k for k in kernels if k in code] == [kernel], rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quantized_cuda_warmup_compiles_the_prefill_of_every_row_range(tmp_path):
    """Weight-only linears pick their kernel by rows (INT8: nbtrt's kernel up to 8, Triton tile of
    16 or 64 rows, then dequantize + cuBLAS; INT4: nbtrt's kernel, the Triton kernel up to 128
    rows, then dequantize + cuBLAS), so a prefill graph serves one range of prompt lengths.
    Warm-up compiles them all: no prompt compiles later, and every range gives logits close to the
    unquantized engine's."""
    from torch._dynamo.utils import counters

    src = tiny_hf_model(ARCH, tmp_path / "hf", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                        num_key_value_heads=2)
    ckpt = nbtrt.convert(src, tmp_path / "ckpt")
    engines = {quant: TorchEngine.from_decoder(nbtrt.model.load_decoder(ckpt, device="cuda", dtype="bfloat16"),
                                               max_input_len=140, max_seq_len=160, quant=quant)
               for quant in (None, "int8_wo", "int4_wo")}
    layers = engines[None].config.num_layers
    assert engines["int4_wo"].quant_report["fused_gate_up"] == engines["int8_wo"].quant_report["fused_gate_up"] == layers
    tokens = torch.randint(0, 257, (135,)).tolist()
    compiled = {}
    for n in (5, 12, 30, 70, 135):
        logits = {}
        prompt = torch.tensor([tokens[:n]], device="cuda")  # a fresh tensor: a slice's strides are guarded too
        for quant, engine in engines.items():
            graphs = counters["stats"]["unique_graphs"]
            engine.begin(1)
            logits[quant] = engine.step(prompt, torch.ones_like(prompt)).float()
            compiled[quant, n] = counters["stats"]["unique_graphs"] - graphs
        for quant in ("int8_wo", "int4_wo"):
            rel = rel_l2(logits[None], logits[quant])
            assert rel <= {"int8_wo": 0.03, "int4_wo": 0.3}[quant], (quant, n, rel)
    assert not any(compiled.values()), compiled


def test_kernel_timing_shadows_inductors_gpu_timing_only_inside():
    """Inside ``kernel_timing`` Inductor's benchmarker times GPU kernels with ``kernel_ms``; nested
    use keeps it until the outermost exit, and after that the benchmarker's own method is back."""
    from torch._inductor.runtime.benchmarking import benchmarker

    from nbtrt.kernels import inductor_timing

    own = type(benchmarker).benchmark_gpu
    with inductor_timing.kernel_timing():
        assert benchmarker.benchmark_gpu is inductor_timing.kernel_ms
        with inductor_timing.kernel_timing():
            assert benchmarker.benchmark_gpu is inductor_timing.kernel_ms
        assert benchmarker.benchmark_gpu is inductor_timing.kernel_ms
    assert "benchmark_gpu" not in vars(benchmarker) and type(benchmarker).benchmark_gpu is own


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_ms_times_the_kernel_not_its_launch():
    """A 1-µs kernel that the host takes 300 µs to launch: one launch between two events (Inductor's
    timing) shows the host's time; ``kernel_ms`` queues the launches behind a GPU sleep and shows
    the kernel's."""
    import time

    from nbtrt.kernels.inductor_timing import kernel_ms

    x = torch.zeros(1024, device="cuda")

    def slow_launch():
        time.sleep(300e-6)
        x.add_(1)

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    slow_launch()
    end.record()
    torch.cuda.synchronize()
    assert start.elapsed_time(end) > 0.25
    assert kernel_ms(slow_launch) < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_tunes_its_kernels_with_kernel_ms(tiny, monkeypatch):
    """A compiled engine's first steps on CUDA, where Inductor tunes each new kernel, time the
    kernels with ``kernel_ms`` (the caches are off, so this run tunes rather than reads earlier
    choices); the engine's output is unchanged by it."""
    from nbtrt.kernels import inductor_timing

    calls = []
    timed = inductor_timing.kernel_ms
    monkeypatch.setattr(inductor_timing, "kernel_ms", lambda fn, **kw: calls.append(fn) or timed(fn, **kw))
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False):
        engine = TorchEngine.from_decoder(nbtrt.model.load_decoder(tiny[1], device="cuda", dtype="bfloat16"),
                                          max_batch_size=1, max_seq_len=32)
    assert engine.compiled and calls
    eager = TorchEngine.from_decoder(nbtrt.model.load_decoder(tiny[1], device="cuda", dtype="bfloat16"),
                                     max_batch_size=1, max_seq_len=32, compile=False)
    ids = torch.tensor([[5, 9, 2, 7]], device="cuda")
    for e in (engine, eager):
        e.begin(1)
    got, want = engine.step(ids, torch.ones_like(ids)), eager.step(ids, torch.ones_like(ids))
    assert rel_l2(want, got) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,KV,S,D", [(2, 6, 2, 11, 16), (1, 32, 8, 384, 128), (3, 14, 2, 200, 64),
                                        (2, 4, 4, 9000, 80), (1, 8, 1, 130, 256)])
@pytest.mark.parametrize("one_split", [False, True])
def test_flash_decoding_kernel_equals_the_matmul_path(dtype, B, H, KV, S, D, one_split):
    """nbtrt's decode attention kernels give what the matmul path gives: grouped query heads
    (1, 3, 7 and 8 a KV head), head sizes that are and are not powers of two, caches of one
    split, several, and longer splits (9000 slots), or all in one, slots masked as padding or
    not yet filled; called directly and from a compiled graph."""
    from nbtrt.kernels import triton_attention
    from nbtrt.runtimes.torch_engine import _LIMIT_KEY
    from nbtrt.runtimes.torch_attention import grouped_decode_attention

    block = triton_attention.BLOCK_S
    split = block * -(-S // block) if one_split else triton_attention.keys_per_split(S)
    g = torch.Generator().manual_seed(S)
    q, k, v = (torch.randn(*shape, generator=g).to("cuda", dtype) for shape in ((B, H, 1, D), (B, KV, S, D), (B, KV, S, D)))
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool)
    for b in range(B):  # sequence b: its first 3b slots padding, then filled up to a length of its own
        filled = S - 5 * b - 1
        mask[b, ..., 3 * b:filled] = torch.rand(filled - 3 * b, generator=g) > 0.1
        mask[b, ..., filled - 1] = True
    mask = mask.cuda()
    assert triton_attention.takes(q, k)
    want = grouped_decode_attention(q.float(), k.float(), v.float(), mask, D ** -0.5)
    args = (q, k, v, mask[:, 0, 0], D ** -0.5, split)
    eager = torch.ops.nbtrt.decode_attention(*args)
    with torch._dynamo.config.patch(**{_LIMIT_KEY: 64}):  # one compile per case, one code object
        compiled = torch.compile(lambda *a: torch.ops.nbtrt.decode_attention(*a), fullgraph=True)(*args)
    for got in (eager, compiled):
        assert got.dtype == dtype and got.shape == (B, H, 1, D)
        assert rel_l2(want, got) <= (1e-5 if dtype == torch.float32 else 1e-2)
