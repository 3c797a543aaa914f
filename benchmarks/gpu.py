# Pins private parts of nbtrt (may break when they change): TorchEngine._static, _run, _decode_fns.
"""The GPU run: parity with HF and the speed figures of the compiled torch engine, in one script.

    python benchmarks/gpu.py --out $OUT                     # on the H100/H200 machine
    python benchmarks/gpu.py --quick --out /tmp/gpu-quick   # the same code on CPU, tiny configs

Sections (``--sections``, default all; each is timed, a failure is recorded and the run goes on):

  ceilings  device-to-device copy bandwidth and bf16 matmul rate, measured here (the floors' units)
  parity    random-weight tiny models of every architecture vs HF: bf16 logits (relative L2) and
            32 greedy tokens in fp32, through the compiled engine
  small     smollm2-135m and qwen2.5-0.5b configs, batch 1, 128-token prompt, 256 new tokens:
            HF eager generate, HF static cache + torch.compile, nbtrt compiled (tokens/s incl. context)
  sweep     qwen2.5-0.5b config, batch 1/8/32/64 (prompt 128, 128 new): tokens/s and peak memory vs HF
  mix       qwen2.5-0.5b config, the ShareGPT-like mix (100 requests, seed 0) in static batches of 64
  kernels   each quantized linear vs its dequantized reference on a real 8B shape
  llama8b   llama-3.1-8b config, bf16 / int8_wo / int4_wo / fp8 / int8_sq (W8A8): decode step time vs the
            bandwidth floor, tokens/s through the generation loop; bf16 prefill of 2048 tokens vs
            the matmul floor; each engine (and the prefill) in a process of its own

Weights are random (no download), instantiated directly on the device. JSON goes to
``$OUT/gpu_results.json`` after every section; a short table is printed last.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbtrt import bench as B  # noqa: E402
from nbtrt.runtimes.torch_engine import TorchEngine  # noqa: E402
from nbtrt.runtimes.torch_linears import (QUANT_FORMATS, decode_weight_bytes, quant_unavailable,  # noqa: E402
                                          quantize_linears)
from nbtrt.convert import convert_tensors  # noqa: E402
from nbtrt.generate import GenerationState, SamplingParams, generate_tokens  # noqa: E402
from nbtrt.mapping import architecture_for  # noqa: E402
from nbtrt.model import Decoder, decoder_from_tensors  # noqa: E402
from nbtrt.testing import REAL, TINY, hf_config, random_hf_model  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEV.type == "cuda"
# 8B variants "<format>:<tweak>" that compile with other Inductor settings (experiments, not shipped)
INDUCTOR_TWEAKS = {"pdl": {"triton.enable_pdl": True},  # programmatic dependent launch
                   "wide": {"coordinate_descent_search_radius": 2,  # a wider search of GEMV configs
                            "coordinate_descent_check_all_directions": True}}
QUICK_OVERRIDES = dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1024)


# ------------------------------------------------------------------------------ helpers
def sync():
    if CUDA:
        torch.cuda.synchronize()


def median_time(fn, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        if CUDA:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return B.percentile(times, 50)


def free():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def real_config(name: str, quick: bool, **extra):
    return hf_config(name, **(QUICK_OVERRIDES if quick else {}), **extra)


def hf_on_device(config, dtype):
    """A random-weight HF model built directly on the device."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(DEV):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def nbtrt_from_hf(hf, dtype: str) -> Decoder:
    """The nbtrt decoder for an in-memory HF model (convert's tables, no files); shares storage where it can."""
    d = hf.config.to_dict()
    arch = architecture_for(d)
    cfg = arch.config_from_hf(d, dtype)
    tensors = convert_tensors(arch, cfg, dict(hf.state_dict()))
    return decoder_from_tensors(cfg, tensors, device=DEV, dtype=dtype)


def shared_copy(model: Decoder) -> Decoder:
    """Another module tree over the same weight storage (quantization swaps modules in place)."""
    tensors = {k: v for k, v in model.state_dict().items() if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    return decoder_from_tensors(model.cfg, tensors, device=DEV, dtype=model.cfg.dtype)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def engine_tokens_per_s(engine, prompt_len: int, new: int, repeats: int) -> dict:
    """Tokens/s through the one generation loop (context phase included) and the per-token loop time."""
    runner = B.engine_runner(engine)
    return B.measure(runner, B.fixed(1, prompt_len, new, repeats=repeats), engine.config.vocab_size, warmup=1)


def decode_step_seconds(engine, batch: int, prompt_len: int, repeats: int = 50) -> float:
    """GPU time of one decode step alone: the captured graph replayed (CPU: the compiled call)."""
    engine.begin(batch)
    ids = torch.randint(0, engine.config.vocab_size, (batch, prompt_len), device=DEV)
    mask = torch.ones_like(ids)
    engine.step(ids, mask)
    tok = ids[:, :1]
    engine.step(tok, torch.ones(batch, prompt_len + 1, dtype=torch.long, device=DEV))  # captures on CUDA
    st = engine._static[batch]
    if st.graph is not None:
        return median_time(st.graph.replay, repeats=repeats, warmup=3)
    with torch.inference_mode():
        return median_time(lambda: engine._run(engine._decode_fns, st.ids, st.mask, st.cache_position), repeats=5)


def prefill_times(engine, prompt_len: int, calls: int = 3) -> list[float]:
    """Seconds of each of a few separate batch-1 prefills (host clock, synchronised)."""
    ids = torch.randint(0, engine.config.vocab_size, (1, prompt_len), device=DEV)
    out = []
    for _ in range(calls):
        engine.begin(1)
        sync()
        t = time.perf_counter()
        engine.step(ids, torch.ones_like(ids))
        sync()
        out.append(time.perf_counter() - t)
    return out


def profile_kernels(fn, calls: int, top: int = 15) -> list[dict]:
    """The GPU kernels ``fn`` runs (graph replays included), by total time: where a step goes."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            rows.append({"kernel": e.key[:90], "calls": e.count // calls, "us_per_call_total": t / calls})
    rows.sort(key=lambda r: -r["us_per_call_total"])
    total = sum(r["us_per_call_total"] for r in rows)
    return [{"total_us": total, "kernels": len(rows)}] + rows[:top]


@contextlib.contextmanager
def sdpa_decode(enabled: bool = True):
    """Engines built inside decode with SDPA on expanded KV heads, as before grouped_decode_attention
    (variant ``bf16:expand``): the compiled decode block is chosen when the engine is built."""
    import nbtrt.runtimes.torch_attention as pieces  # TorchEngine reads pieces.decode_block when built

    def block(layer, x, rope, mask, k, v, cache_position):
        return layer(x, rope, mask, pieces.LayerKV(k, v), cache_position)

    saved = pieces.decode_block
    if enabled:
        pieces.decode_block = block
    try:
        yield
    finally:
        pieces.decode_block = saved


def llama8b_random(quick: bool) -> Decoder:
    """The llama-3.1-8b config (``quick``: shrunk) in bf16 on the device, its matrices N(0, 0.02)."""
    cfg_hf = real_config("llama-3.1-8b", quick).to_dict()
    cfg = architecture_for(cfg_hf).config_from_hf(cfg_hf, "bfloat16")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEV):
            model = Decoder(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return model


# ------------------------------------------------------------------------------ sections
def sec_ceilings(R, quick):
    n = (1 << 26) if quick else (1 << 30)  # elements of bf16: 2 GiB on GPU
    a = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    t = median_time(lambda: b.copy_(a), repeats=10)
    copy_bw = 2 * a.numel() * a.element_size() / t  # bytes read + bytes written
    del a, b
    m = 512 if quick else 8192
    x = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    y = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    t = median_time(lambda: x @ y, repeats=10)
    free()
    R["ceilings"] = {"copy_bytes_per_s": copy_bw, "copy_tb_s": copy_bw / 1e12, "matmul_flop_per_s": 2 * m ** 3 / t,
                     "matmul_tflop_s": 2 * m ** 3 / t / 1e12, "matmul_shape": [m, m, m], "copy_gib": n * 2 / 2 ** 30}


def sec_parity(R, quick):
    out = {}
    g = torch.Generator().manual_seed(1)
    for arch in sorted(TINY):
        row = {}
        try:
            # bf16: logits of a left-padded batch, prefill + 8 decode steps, vs HF's full forward
            hf = random_hf_model(arch, dtype=torch.bfloat16).to(DEV)
            eng = TorchEngine.from_decoder(nbtrt_from_hf(hf, "bfloat16"), max_batch_size=2, max_seq_len=64,
                                           compile=True, warmup=False)
            V = hf.config.vocab_size
            prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (12, 7)]
            follow = torch.randint(0, V, (2, 8), generator=g).to(DEV)
            ids = torch.tensor([[0] * (12 - len(p)) + p for p in prompts], device=DEV)
            mask = torch.tensor([[0] * (12 - len(p)) + [1] * len(p) for p in prompts], device=DEV)
            eng.begin(2)
            ours = [eng.step(ids, mask)]
            for t in range(8):
                mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long, device=DEV)], 1)
                ours.append(eng.step(follow[:, t:t + 1], mask))
            with torch.no_grad():
                ref = hf(input_ids=torch.cat([ids, follow], 1), attention_mask=mask,
                         position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, 11:]
            ours = torch.stack(ours, 1)
            row["bf16_rel_l2"] = rel_l2(ours, ref)
            row["bf16_max_abs"] = (ours.float() - ref.float()).abs().max().item()
            # one unpadded prompt: the prefill takes the causal (maskless) path
            one = torch.tensor([prompts[0]], device=DEV)
            eng.begin(1)
            ours = [eng.step(one, torch.ones_like(one))]
            for t in range(4):
                ours.append(eng.step(follow[:1, t:t + 1], torch.ones(1, 13 + t, dtype=torch.long, device=DEV)))
            with torch.no_grad():
                ref = hf(input_ids=torch.cat([one, follow[:1, :4]], 1)).logits[:, 11:]
            row["bf16_unpadded_rel_l2"] = rel_l2(torch.stack(ours, 1), ref)
            del hf, eng
            # fp32: 32 greedy tokens, HF generate vs the engine's generation loop
            hf = random_hf_model(arch, dtype=torch.float32).to(DEV)
            eng = TorchEngine.from_decoder(nbtrt_from_hf(hf, "float32"), max_batch_size=2, max_seq_len=64,
                                           compile=True, warmup=False)
            ids = torch.tensor([[0] * (12 - len(p)) + p for p in prompts], device=DEV)
            mask = torch.tensor([[0] * (12 - len(p)) + [1] * len(p) for p in prompts], device=DEV)
            with torch.no_grad():
                hf_out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32,
                                     do_sample=False, pad_token_id=0)[:, 12:].tolist()
            state = GenerationState(prompts)
            for _ in generate_tokens(eng, prompts, SamplingParams(max_new_tokens=32), state=state):
                pass
            row["fp32_greedy_identical"] = state.tokens == hf_out
            row["fp32_first_mismatch"] = next((i for i in range(32) if any(
                s[i] != h[i] for s, h in zip(state.tokens, hf_out))), None)
            row["ok"] = max(row["bf16_rel_l2"], row["bf16_unpadded_rel_l2"]) <= 1e-2 and row["fp32_greedy_identical"]
            del hf, eng
        except Exception as e:  # record and go on: one architecture must not hide the others
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()[-2000:]
            row["ok"] = False
        out[arch] = row
        free()
    R["parity"] = out


def sec_small(R, quick):
    new, prompt, reps = (16, 32, 2) if quick else (256, 128, 3)
    out = {}
    for name in ("smollm2-135m", "qwen2.5-0.5b"):
        res = {}
        hf = hf_on_device(real_config(name, quick), torch.bfloat16)
        wl = B.fixed(1, prompt, new, repeats=reps)
        V = hf.config.vocab_size
        for compile in (False, True):
            t = time.perf_counter()
            r = B.measure(B.hf_runner(hf, compile=compile, max_batch_size=1), B.Workload(
                wl.name, wl.lengths, 1, repeats=2 if not compile else reps), V, warmup=1)
            r["total_seconds_incl_warmup"] = time.perf_counter() - t
            res[r["runner"]] = r
        model = nbtrt_from_hf(hf, "bfloat16")
        del hf
        free()
        t = time.perf_counter()
        eng = TorchEngine.from_decoder(model, max_batch_size=1, max_seq_len=prompt + new, compile=True)
        compile_s = time.perf_counter() - t
        r = engine_tokens_per_s(eng, prompt, new, reps)
        r["compile_seconds"] = compile_s
        r["decode_step_s"] = decode_step_seconds(eng, 1, prompt)
        r["loop_s_per_token"] = r["tpot_s"]["p50"]
        res["nbtrt-torch-compiled"] = r
        hf_e, hf_c = res["hf-eager"]["tokens_per_s"], res["hf-compile"]["tokens_per_s"]
        res["speedup_vs_hf_eager"] = r["tokens_per_s"] / hf_e
        res["speedup_vs_hf_compile"] = r["tokens_per_s"] / hf_c
        out[name] = res
        del eng, model
        free()
    R["small"] = out


def sec_sweep(R, quick):
    new, prompt = (8, 16) if quick else (128, 128)
    batches = (1, 2, 4) if quick else (1, 8, 32, 64)
    hf = hf_on_device(real_config("qwen2.5-0.5b", quick), torch.bfloat16)
    V = hf.config.vocab_size
    rows = []
    hf_run = B.hf_runner(hf, compile=False, max_batch_size=max(batches))
    for b in batches:
        rows.append(B.measure(hf_run, B.fixed(b, prompt, new, repeats=2), V, warmup=1))
    rows.append(B.measure(B.skipped("hf-compile", "bf16", "not swept: transformers recompiles its static-cache "
                                     "graph for every batch size (minutes of compile per point)"),
                          B.fixed(batches[0], prompt, new), V))
    model = nbtrt_from_hf(hf, "bfloat16")
    del hf, hf_run
    free()
    eng = TorchEngine.from_decoder(model, max_batch_size=max(batches), max_seq_len=prompt + new, compile=True)
    run = B.engine_runner(eng)
    for b in batches:
        r = B.measure(run, B.fixed(b, prompt, new, repeats=2), V, warmup=1)
        rows.append(r)
    R["sweep"] = {"model": "qwen2.5-0.5b", "prompt": prompt, "new_tokens": new, "results": rows}
    del eng, model, run
    free()


def sec_mix(R, quick):
    """The ShareGPT-like request mix (100 requests, seed 0, full-size lengths) in static batches of 64."""
    n, cap, bs = (12, 32, 4) if quick else (100, 1024, 64)
    mix = B.sharegpt_like(n, seed=0, max_input_len=cap, max_output_len=cap, batch_size=bs)
    hf = hf_on_device(real_config("qwen2.5-0.5b", quick), torch.bfloat16)
    V = hf.config.vocab_size
    rows = [B.measure(B.hf_runner(hf, compile=False, max_batch_size=bs), mix, V),
            B.measure(B.hf_runner(hf, compile=True, max_batch_size=bs), mix, V)]  # listed skipped, with the reason
    model = nbtrt_from_hf(hf, "bfloat16")
    del hf
    free()
    longest = max(a for a, _ in mix.lengths) + max(b for _, b in mix.lengths)
    eng = TorchEngine.from_decoder(model, max_batch_size=bs, max_seq_len=longest, compile=True)
    rows.append(B.measure(B.engine_runner(eng), mix, V))
    R["mix"] = {"model": "qwen2.5-0.5b", "workload": mix.name, "lengths": mix.lengths, "results": rows}
    del eng, model
    free()


def _kernel_reference(fmt: str, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What each format computes (nbtrt.layouts' layout), written out independently in float32."""
    wf, xf = w.float(), x.float()
    if fmt in ("int8_wo", "int8_sq"):
        s = wf.abs().amax(1, keepdim=True) / 127
        wd = (wf / s).round().clamp(-127, 127) * s
        if fmt == "int8_sq":
            xs = xf.abs().amax(1, keepdim=True) / 127
            xf = (xf / xs).round().clamp(-127, 127) * xs
        return xf @ wd.t()
    if fmt == "int4_wo":  # symmetric, groups of 128 inputs
        N, K = wf.shape
        wg = wf.reshape(N, K // 128, 128)
        s = wg.abs().amax(-1, keepdim=True) / 7
        return xf @ ((wg / s).round().clamp(-8, 7) * s).reshape(N, K).t()
    if fmt == "fp8":  # weight per tensor, activations per token
        s = wf.abs().amax() / 448
        xs = xf.abs().amax(1, keepdim=True) / 448
        return ((xf / xs).to(torch.float8_e4m3fn).float() * xs) @ ((wf / s).to(torch.float8_e4m3fn).float() * s).t()
    raise KeyError(fmt)


def sec_kernels(R, quick):
    K, N = (256, 512) if quick else (4096, 14336)
    dtype = torch.bfloat16
    out = {}
    for fmt in QUANT_FORMATS:
        reason = quant_unavailable(fmt, DEV, dtype)
        if reason:
            out[fmt] = {"skipped": reason}
            continue
        try:
            torch.manual_seed(0)
            lin = torch.nn.Linear(K, N, bias=False, device=DEV, dtype=dtype)
            holder = torch.nn.Sequential(lin)
            quantize_linears(holder, fmt)
            row = {}
            for m in (1, 16, 64):
                x = torch.randn(m, K, device=DEV, dtype=dtype)
                y = holder(x[None]).float()[0]  # as [batch, tokens, in]: m > 1 is a prefill
                row[f"m{m}_rel_vs_reference"] = rel_l2(y, _kernel_reference(fmt, lin.weight, x))
                row[f"m{m}_rel_vs_float"] = rel_l2(y, x.float() @ lin.weight.float().t())
            out[fmt] = row
        except Exception as e:
            out[fmt] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-1500:]}
        free()
    R["kernels"] = out


def sec_llama8b(R, quick, formats):
    """Each 8B engine, and the long prefill, in a process of its own (``--llama8b-part``), as a
    deployment runs one: engines built after another one in the same process ran their decode
    graph 5-8 % slower (loop_pauses.py; graph_neighbours.py and graph_kinds.py found captured
    graphs that take the decode graph's dependent-launch overlap away: README, "One engine a process")."""
    import subprocess
    import tempfile

    out = {"parts_in_own_processes": True}
    ceil = R.get("ceilings", {})
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        for part in ["bf16"] + list(formats) + ["prefill"]:
            left = DEADLINE - time.perf_counter()
            if left < 60:
                (variants if part != "prefill" else out)[part] = {"skipped": "time budget"}
                continue
            path = Path(tmp) / f"{part}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--llama8b-part", part, "--out", str(path)]
            cmd += ["--quick"] if quick else []
            try:
                done = subprocess.run(cmd, timeout=left, capture_output=True, text=True)
                got = json.loads(path.read_text())
            except subprocess.TimeoutExpired:
                got = {"error": f"did not finish in the {left:.0f} s left"}
            except (OSError, ValueError):  # it died before writing its JSON, or while writing it
                got = {"error": f"exit {done.returncode}", "traceback": (done.stdout + done.stderr)[-2000:]}
            if part == "prefill":
                out["prefill"] = got
            else:
                out.update({k: got.pop(k) for k in ("config", "init_seconds", "prompt", "new_tokens") if k in got})
                variants[part] = got
            _save({**R, "llama8b": {**out, "variants": variants}})
    bf = variants.get("bf16", {}).get("tokens_per_s")
    for row in variants.values():
        if ceil and "weight_bytes" in row:
            row["bandwidth_floor_s"] = row["weight_bytes"] / ceil["copy_bytes_per_s"]
            row["step_over_floor"] = row["decode_step_s"] / row["bandwidth_floor_s"]
            row["achieved_tb_s"] = row["weight_bytes"] / row["decode_step_s"] / 1e12
        if bf and row.get("tokens_per_s"):
            row["speedup_vs_bf16"] = row["tokens_per_s"] / bf
    pre = out.get("prefill", {})
    if ceil and "flops" in pre:
        floor = pre["flops"] / ceil["matmul_flop_per_s"]
        pre.update(floor_s=floor, over_floor=pre["seconds"] / floor,
                   achieved_tflop_s=pre["flops"] / pre["seconds"] / 1e12)
    out["variants"] = variants
    R["llama8b"] = out


def llama8b_part(part: str, quick: bool) -> dict:
    """One part of the 8B section, in this process: an engine's row (``part`` a format, or
    "<format>:<tweak>") or the bf16 prefill of 2048 tokens (``part`` "prefill")."""
    t = time.perf_counter()
    model = llama8b_random(quick)
    head = {"config": model.cfg.to_dict(), "init_seconds": time.perf_counter() - t}
    return {**head, **(llama8b_prefill(model, quick) if part == "prefill" else llama8b_variant(model, part, quick))}


def llama8b_variant(model: Decoder, fmt: str, quick: bool) -> dict:
    """Decode step time, the 128-token prefill and tokens/s through the generation loop of one engine."""
    prompt, new, reps = (32, 16, 2) if quick else (128, 256, 3)
    row = {"prompt": prompt, "new_tokens": new}
    quant, _, tweak = fmt.partition(":")  # "int8_wo:inline": mlp.down's input left to Inductor
    reason = None if quant == "bf16" else quant_unavailable(quant, DEV, torch.bfloat16)
    if reason:
        return {**row, "skipped": reason}
    try:
        with torch._inductor.config.patch(INDUCTOR_TWEAKS.get(tweak, {})):
            t = time.perf_counter()
            with sdpa_decode(tweak == "expand"):
                eng = TorchEngine.from_decoder(model, max_batch_size=1, max_seq_len=prompt + new, compile=True,
                                               quant=None if quant == "bf16" else quant, warmup=False)
            if tweak == "inline":
                for mod in eng.model.modules():
                    if hasattr(mod, "realize_input"):
                        mod.realize_input = False
            eng.warmup()
            row["load_quantize_compile_seconds"] = time.perf_counter() - t
            row["quant_report"] = eng.quant_report
            row["weight_bytes"] = decode_weight_bytes(eng.model)
            row["decode_step_s"] = decode_step_seconds(eng, 1, prompt)
            row["prefill_128_s"] = prefill_times(eng, prompt)
            if quant in ("bf16", "int8_wo", "int4_wo") and CUDA:  # where a decode step's time goes
                row["decode_profile"] = profile_kernels(eng._static[1].graph.replay, 5)
            from torch._dynamo.utils import counters

            graphs = counters["stats"]["unique_graphs"]
            r = engine_tokens_per_s(eng, prompt, new, reps)
            row["graphs_compiled_while_measuring"] = counters["stats"]["unique_graphs"] - graphs
            row.update(tokens_per_s=r["tokens_per_s"], ttft_s=r["ttft_s"]["p50"], tpot_s=r["tpot_s"]["p50"],
                       peak_memory_bytes=r["peak_memory_bytes"])
            row["loop_overhead_s_per_token"] = row["tpot_s"] - row["decode_step_s"]
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc()[-2000:]
    return row


def llama8b_prefill(model: Decoder, quick: bool) -> dict:
    """The bf16 prefill of 2048 tokens (causal, and the masked path for comparison) and its flops."""
    cfg = model.cfg
    pre_len = 256 if quick else 2048
    try:
        eng = TorchEngine.from_decoder(model, max_batch_size=1, max_seq_len=pre_len + 8, compile=True, warmup=False)
        ids = torch.randint(0, cfg.vocab_size, (1, pre_len), device=DEV)
        mask = torch.ones_like(ids)

        def prefill():
            eng.begin(1)
            eng.step(ids, mask)

        t = time.perf_counter()
        prefill()
        sync()
        first = time.perf_counter() - t
        secs = median_time(prefill, repeats=5, warmup=1)
        profile = profile_kernels(prefill, 1) if CUDA else None
        eng.causal_prefill = False  # the masked path every padded batch takes, for comparison
        masked = median_time(prefill, repeats=5, warmup=1)
        masked_profile = profile_kernels(prefill, 1) if CUDA else None
        L, H, D = cfg.num_layers, cfg.num_heads, cfg.head_dim
        linear = sum(mod.weight.numel() for name, mod in model.named_modules()
                     if isinstance(mod, torch.nn.Linear) and name != "lm_head")
        flops = 2 * linear * pre_len + 2 * cfg.hidden_size * cfg.vocab_size  # lm_head for the last token only
        flops += L * 2 * pre_len * pre_len * H * D  # causal QK^T and PV: half of 2 x 2*T*T*D per head
        return {"tokens": pre_len, "seconds": secs, "first_call_seconds_incl_compile": first, "flops": flops,
                "tokens_per_s": pre_len / secs, "profile": profile, "masked_seconds": masked,
                "masked_profile": masked_profile}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}


# ------------------------------------------------------------------------------ main
OUT_PATH: Path | None = None
DEADLINE = float("inf")


def _save(R):
    if OUT_PATH is not None:
        OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
        tmp = OUT_PATH.with_suffix(".tmp")
        tmp.write_text(json.dumps(R, indent=1, default=str))
        os.replace(tmp, OUT_PATH)


def summary(R) -> str:
    lines = [f"device: {R['machine'].get('gpu') or 'cpu'}   date: {R['machine']['date']}"]
    c = R.get("ceilings")
    if c:
        lines.append(f"ceilings: copy {c['copy_tb_s']:.2f} TB/s, bf16 matmul {c['matmul_tflop_s']:.0f} TFLOP/s")
    for arch, row in R.get("parity", {}).items():
        lines.append(f"parity {arch:22} bf16 relL2 {row.get('bf16_rel_l2', float('nan')):.2e} "
                     f"(unpadded {row.get('bf16_unpadded_rel_l2', float('nan')):.2e})  fp32 greedy32 "
                     f"{'identical' if row.get('fp32_greedy_identical') else 'DIFFERS'}  {'ok' if row['ok'] else 'FAIL ' + row.get('error', '')}")
    for name, res in R.get("small", {}).items():
        s = "  ".join(f"{k} {v['tokens_per_s']:.1f}" for k, v in res.items() if isinstance(v, dict) and "tokens_per_s" in v)
        lines.append(f"small {name}: tok/s {s} | x eager {res['speedup_vs_hf_eager']:.2f} (>=8)  "
                     f"x compile {res['speedup_vs_hf_compile']:.2f} (>=1.3)")
    sw = R.get("sweep")
    if sw:
        for r in sw["results"]:
            if r["status"] == "ok":
                lines.append(f"sweep {r['runner']:22} b{r['batch_size']:<3} {r['tokens_per_s']:9.1f} tok/s "
                             f"peak {r['peak_memory_bytes'] / 2 ** 30:.2f} GiB")
    for r in (R.get("mix") or {}).get("results", []):
        lines.append(f"mix {r['runner']:22} " + (f"{r['tokens_per_s']:9.1f} tok/s {r['requests_per_s']:.2f} req/s "
                     f"latency p50 {r['latency_s']['p50']:.2f} s p95 {r['latency_s']['p95']:.2f} s "
                     f"ttft p50 {r['ttft_s']['p50']:.3f} s" if r["status"] == "ok" else f"skipped: {r['reason']}"))
    for fmt, row in R.get("kernels", {}).items():
        lines.append(f"kernel {fmt:8} " + "  ".join(f"{k} {v:.1e}" for k, v in row.items() if isinstance(v, float))
                     + (f" {row.get('skipped', '')}{row.get('error', '')}"))
    ll = R.get("llama8b")
    if ll:
        for fmt, row in ll.get("variants", {}).items():
            if "tokens_per_s" in row:
                lines.append(f"8b {fmt:14} step {1e3 * row['decode_step_s']:.2f} ms (floor {1e3 * row.get('bandwidth_floor_s', 0):.2f}, "
                             f"x{row.get('step_over_floor', 0):.2f}, <=1.3)  {row['tokens_per_s']:.1f} tok/s  "
                             f"x bf16 {row.get('speedup_vs_bf16', 0):.2f}")
            else:
                lines.append(f"8b {fmt:14} {row.get('skipped', '')}{row.get('error', '')}")
        p = ll.get("prefill", {})
        if "seconds" in p:
            lines.append(f"8b prefill {p['tokens']}: {1e3 * p['seconds']:.1f} ms (floor {1e3 * p.get('floor_s', 0):.1f}, "
                         f"x{p.get('over_floor', 0):.2f}, <=1.5); masked path {1e3 * p.get('masked_seconds', 0):.1f} ms")
            for key in ("profile", "masked_profile"):
                for k in (p.get(key) or [])[:6]:
                    lines.append(f"   prefill {key} {k}")
        elif p:
            lines.append(f"8b prefill: {p.get('error')}")
        for fmt, row in ll.get("variants", {}).items():
            if row.get("prefill_128_s"):
                lines.append(f"8b {fmt:14} prefill-128 calls {[round(1e3 * x, 1) for x in row['prefill_128_s']]} ms, "
                             f"graphs compiled while measuring {row.get('graphs_compiled_while_measuring')}")
        for fmt, row in ll.get("variants", {}).items():
            for k in (row.get("decode_profile") or [])[:8]:
                lines.append(f"   {fmt} decode kernels {k}")
    for k, v in R.get("section_seconds", {}).items():
        lines.append(f"time {k}: {v:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    global OUT_PATH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "work/gpu"))
    ap.add_argument("--quick", action="store_true", help="tiny configs and lengths (a CPU rehearsal)")
    ap.add_argument("--sections", default="ceilings,parity,small,sweep,kernels,llama8b")
    ap.add_argument("--formats", default="int8_wo,int4_wo,fp8,int8_sq", help="quantized variants of the 8B run")
    ap.add_argument("--budget", type=float, default=540, help="seconds; later sections are skipped past it")
    ap.add_argument("--llama8b-part", help=argparse.SUPPRESS)  # one part of the 8B section; JSON to --out
    a = ap.parse_args(argv)
    if a.llama8b_part:
        Path(a.out).write_text(json.dumps(llama8b_part(a.llama8b_part, a.quick), default=str))
        return 0
    OUT_PATH = Path(a.out) / "gpu_results.json"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32
    R = {"machine": B.machine(), "quick": a.quick, "argv": sys.argv[1:], "section_seconds": {}, "errors": {}}
    if CUDA:
        R["machine"]["gpu_capability"] = list(torch.cuda.get_device_capability())
        R["machine"]["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    start = time.perf_counter()
    global DEADLINE
    DEADLINE = start + a.budget
    for sec in a.sections.split(","):
        t = time.perf_counter()
        if t > DEADLINE:
            R["errors"][sec] = f"skipped: past the {a.budget:.0f} s budget"
            continue
        print(f"== {sec} (t={t - start:.0f}s)", flush=True)
        try:
            if sec == "llama8b":
                sec_llama8b(R, a.quick, [f for f in a.formats.split(",") if f])
            else:
                globals()[f"sec_{sec}"](R, a.quick)
        except Exception as e:
            R["errors"][sec] = traceback.format_exc()[-3000:]
            print(f"!! {sec} failed: {type(e).__name__}: {e}", flush=True)
        R["section_seconds"][sec] = time.perf_counter() - t
        R["total_seconds"] = time.perf_counter() - start
        _save(R)
    print(summary(R))
    for sec, tb in R["errors"].items():
        print(f"--- {sec} error:\n{tb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
