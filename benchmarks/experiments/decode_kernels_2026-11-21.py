"""Experiment (not shipped), 2026-11-21: gemlite's Triton GEMVs for int8/int4 weight-only, and GQA
decode attention without expand copies, on the 8B config. One run, JSON to $OUT/exp.json.

    PYTHONPATH=<gemlite 0.6.0.post2 source> python benchmarks/experiments/decode_kernels_2026-11-21.py \
        bf16,int4_wo:gemlite,int8_wo:gemlite,bf16:gqa_mm,int4_wo,int8_wo,bf16:sdpa_gqa
"""
import json
import os
import sys
import time
import traceback
import importlib.util
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
spec = importlib.util.spec_from_file_location("gpu", ROOT / "benchmarks/gpu.py")
G = importlib.util.module_from_spec(spec)
spec.loader.exec_module(G)

from nbtrt.backends.torch import TorchEngine, decode_weight_bytes  # noqa
from nbtrt.model import Decoder, Attention  # noqa
from nbtrt.mapping import architecture_for  # noqa
from nbtrt.quantize.formats import quantize_weight, dequantize_weight, unpack_int4  # noqa

OUT = Path(os.environ.get("OUT", "/tmp/exp"))
OUT.mkdir(parents=True, exist_ok=True)
DEV = G.DEV
QUICK = not G.CUDA
R = {"machine": torch.cuda.get_device_name() if G.CUDA else "cpu", "date": time.strftime("%Y-%m-%d")}


def save():
    (OUT / "exp.json").write_text(json.dumps(R, indent=1, default=str))


def gemlite_module(lin: nn.Linear, layout: str, group: int):
    from gemlite.helper import A16W8_INT8, A16Wn_HQQ_INT  # noqa

    t = quantize_weight(lin.weight.detach(), layout, group)
    if layout == "int8_wo":
        return A16W8_INT8(device=DEV, dtype=torch.bfloat16).from_weights(
            t["weight"], lin.bias, scales=t["weight_scale"].view(-1, 1).to(torch.bfloat16)), t
    q = unpack_int4(t["weight"]).to(torch.int16) + 8
    from gemlite.helper import A16W4_HQQ_INT

    mod = A16W4_HQQ_INT(device=DEV, dtype=torch.bfloat16)
    out = mod.from_weights(q.to(torch.uint8), t["weight_scale"].to(torch.bfloat16),
                           torch.full_like(t["weight_scale"], 8, dtype=torch.bfloat16), bias=lin.bias)
    return out, t


def swap_gemlite(model, layout):
    for name, lin in [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]:
        model.set_submodule(name, gemlite_module(lin, layout, 128)[0])


def check_gemlite():
    rows = {}
    for layout in ("int8_wo", "int4_wo"):
        for n_out, n_in in ((6144, 4096), (4096, 14336), (14336, 4096)):
            lin = nn.Linear(n_in, n_out, bias=False, device=DEV, dtype=torch.bfloat16)
            nn.init.normal_(lin.weight, 0, 0.02)
            mod, t = gemlite_module(lin, layout, 128)
            w = dequantize_weight(t, layout, 128).to(torch.float32)
            for m in (1, 128):
                x = torch.randn(m, n_in, device=DEV, dtype=torch.bfloat16)
                ref = x.float() @ w.t()
                y = mod(x).float()
                rows[f"{layout} {n_out}x{n_in} M={m}"] = ((y - ref).norm() / ref.norm()).item()
                if m == 1:
                    g = torch.cuda.CUDAGraph()
                    y1 = mod(x)
                    torch.cuda.synchronize()
                    with torch.cuda.graph(g):
                        y1 = mod(x)
                    t1 = G.median_time(g.replay, repeats=50, warmup=5)
                    nbytes = sum(p.numel() * p.element_size() for p in mod.parameters())
                    rows[f"{layout} {n_out}x{n_in} M=1 us"] = t1 * 1e6
                    rows[f"{layout} {n_out}x{n_in} M=1 TB/s"] = nbytes / t1 / 1e12
    R["gemlite_check"] = rows
    save()


def gqa_mm_forward(self, x, rope, mask, kv, cache_position):
    from nbtrt.model import rotate_half

    cfg = self.cfg
    B, T, _ = x.shape
    q, k, v = self.qkv(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    q = q.view(B, T, cfg.num_heads, cfg.head_dim).transpose(1, 2)
    k = k.view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    v = v.view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    if rope is not None:
        cos, sin = rope
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
    k, v = kv.update(self.index, self.k_quant(k), self.v_quant(v), cache_position)
    groups = cfg.num_heads // cfg.num_kv_heads
    if T == 1 and mask is not None:
        qg = q.reshape(B, cfg.num_kv_heads, groups, cfg.head_dim)
        s = torch.matmul(qg, k.transpose(-1, -2)).float() * self.scale  # [B, KV, G, S]
        s = s.masked_fill(~mask, float("-inf"))  # mask [B, 1, 1, S]
        p = torch.softmax(s, -1).to(q.dtype)
        out = torch.matmul(p, v).reshape(B, cfg.num_heads, 1, cfg.head_dim)
    else:
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
    return self.o(out.transpose(1, 2).reshape(B, T, cfg.q_size))


def sdpa_gqa_forward(self, x, rope, mask, kv, cache_position):
    from nbtrt.model import rotate_half

    cfg = self.cfg
    B, T, _ = x.shape
    q, k, v = self.qkv(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    q = q.view(B, T, cfg.num_heads, cfg.head_dim).transpose(1, 2)
    k = k.view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    v = v.view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    if rope is not None:
        cos, sin = rope
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
    k, v = kv.update(self.index, self.k_quant(k), self.v_quant(v), cache_position)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                         enable_gqa=True)
    return self.o(out.transpose(1, 2).reshape(B, T, cfg.q_size))


def llama8b(variants):
    prompt, new, reps = (32, 16, 1) if QUICK else (128, 256, 3)
    cfg_hf = G.real_config("llama-3.1-8b", QUICK).to_dict()
    cfg = architecture_for(cfg_hf).config_from_hf(cfg_hf, "bfloat16")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEV):
        model = Decoder(cfg).eval()
    torch.set_default_dtype(old)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    orig_forward = Attention.forward
    ids = torch.randint(0, cfg.vocab_size, (1, 24), device=DEV)
    ref_logits = ref_next = ref_dec = None
    out = R.setdefault("llama8b", {})
    for v in variants:
        row = {}
        fmt, _, tweak = v.partition(":")
        try:
            torch._dynamo.reset()  # patched Attention.forward: the guards do not see class attributes
            Attention.forward = {"gqa_mm": gqa_mm_forward, "sdpa_gqa": sdpa_gqa_forward}.get(tweak, orig_forward)
            m = model if fmt == "bf16" else G.shared_copy(model)
            t = time.perf_counter()
            if tweak == "gemlite":
                swap_gemlite(m, fmt)
                quant = None
            else:
                quant = None if fmt == "bf16" else fmt
            eng = TorchEngine.from_decoder(m, max_batch_size=1, max_seq_len=prompt + new, compile=True,
                                           quant=quant, warmup=False)
            eng.warmup()
            row["load_compile_s"] = time.perf_counter() - t
            row["weight_bytes"] = decode_weight_bytes(eng.model)
            # logits of a greedy prefill vs the bf16 engine's
            eng.begin(1)
            lg = eng.step(ids, torch.ones_like(ids)).float()
            if ref_logits is None:
                ref_logits = lg
            row["prefill_logits_rel_l2_vs_bf16"] = ((lg - ref_logits).norm() / ref_logits.norm()).item()
            nxt = lg.argmax(-1, keepdim=True) if ref_next is None else ref_next
            ref_next = nxt
            ld = eng.step(nxt, torch.ones(1, ids.shape[1] + 1, dtype=torch.long, device=DEV)).float()
            eng.step(nxt, torch.ones(1, ids.shape[1] + 2, dtype=torch.long, device=DEV))  # the graph path too
            ld2 = eng.step(nxt, torch.ones(1, ids.shape[1] + 3, dtype=torch.long, device=DEV)).float()
            if ref_dec is None:
                ref_dec = (ld, ld2)
            row["decode_logits_rel_l2_vs_bf16"] = [((a - b).norm() / b.norm()).item() for a, b in zip((ld, ld2), ref_dec)]
            row["decode_step_s"] = G.decode_step_seconds(eng, 1, prompt)
            if G.CUDA:
                row["profile"] = G.profile_kernels(eng._static[1].graph.replay, 5, top=12)
            r = G.engine_tokens_per_s(eng, prompt, new, reps)
            row.update(tokens_per_s=r["tokens_per_s"], ttft_s=r["ttft_s"]["p50"], tpot_s=r["tpot_s"]["p50"])
            del eng, m
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()[-3000:]
        finally:
            Attention.forward = orig_forward
        out[v] = row
        print(v, {k: row.get(k) for k in ("decode_step_s", "tokens_per_s", "ttft_s", "tpot_s", "prefill_logits_rel_l2_vs_bf16", "decode_logits_rel_l2_vs_bf16", "error")},
              flush=True)
        G.free()
        save()
    bf = out.get("bf16", {}).get("tokens_per_s")
    for v, row in out.items():
        if bf and row.get("tokens_per_s"):
            row["speedup_vs_bf16"] = row["tokens_per_s"] / bf
    save()


if __name__ == "__main__":
    t0 = time.perf_counter()
    G.sec_ceilings(R, QUICK)
    print(R["ceilings"], flush=True)
    if G.CUDA:
        import gemlite

        if "h100" not in torch.cuda.get_device_name().lower():
            gemlite.load_config(str(Path(gemlite.__file__).parent / "configs/h100.json"))
        try:
            check_gemlite()
            print(json.dumps(R["gemlite_check"], indent=1), flush=True)
        except Exception:
            R["gemlite_check_error"] = traceback.format_exc()[-3000:]
            print(R["gemlite_check_error"], flush=True)
    variants = sys.argv[1].split(",") if len(sys.argv) > 1 else ["bf16", "bf16:gqa_mm", "bf16:sdpa_gqa"]
    llama8b(variants)
    R["total_s"] = time.perf_counter() - t0
    save()
    for v, row in R["llama8b"].items():
        print(f"{v:18s} step {row.get('decode_step_s', 0)*1e3:7.3f} ms  tok/s {row.get('tokens_per_s', 0):7.1f}  "
              f"x{row.get('speedup_vs_bf16', 0):.2f}  ttft {row.get('ttft_s', 0)*1e3:6.1f} ms  rel {row.get('prefill_logits_rel_l2_vs_bf16')} {row.get('decode_logits_rel_l2_vs_bf16')}  {row.get('error', '')}")
