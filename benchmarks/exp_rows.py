"""Experiment (8B config, one GPU run): the Triton INT8 kernel for a few rows
(nbtrt.backends.triton_int8) against cuBLAS in bf16, per linear shape and row count, and the
INT8 engine's decode step by batch size against bf16's.

    python benchmarks/exp_rows.py   # writes $OUT/exp_rows.json
"""
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu as G  # noqa: E402
from nbtrt.backends import triton_int8  # noqa: E402
from nbtrt.backends.torch import TorchEngine  # noqa: E402
from nbtrt.mapping import architecture_for  # noqa: E402
from nbtrt.model import Decoder  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp"), "exp_rows.json")
DEADLINE = time.perf_counter() + float(os.environ.get("BUDGET", 480))
R = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}


def save():
    OUT.write_text(json.dumps(R, indent=1, default=str))


def step_ms(engine, batch):
    engine.cache = None
    return 1e3 * G.decode_step_seconds(engine, batch, 128, repeats=30)


def prefill_ms(engine, tokens):
    return 1e3 * min(G.prefill_times(engine, tokens, calls=4)[1:])  # the first call may compile


def guarded(key, fn):
    if time.perf_counter() > DEADLINE:
        R[key] = "skipped: budget"
        return
    t = time.perf_counter()
    try:
        R[key] = fn()
    except Exception as e:
        R[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-1500:]}
    print(key, json.dumps(R[key], default=str)[:600], f"({time.perf_counter() - t:.0f} s)", flush=True)
    save()


cfg_hf = G.real_config("llama-3.1-8b", False).to_dict()
cfg = architecture_for(cfg_hf).config_from_hf(cfg_hf, "bfloat16")
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    model = Decoder(cfg).eval()
torch.set_default_dtype(torch.float32)
with torch.no_grad():
    for p in model.parameters():
        if p.dim() == 2:
            p.normal_(0, 0.02)

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
PER_LAYER = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}
COPIES = 8  # distinct weights cycled per timing, more bytes than the L2 holds


def graph_us(calls):
    """Median µs of one of ``calls`` (a list of thunks), replayed as one CUDA graph."""
    for f in calls:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in calls:
            f()
    return 1e6 * G.median_time(g.replay, repeats=20, warmup=3) / len(calls)


def kernel_rows():
    kernel = triton_int8._kernel()
    out = {}
    for name, (N, K) in SHAPES.items():
        copies = 2 if name == "lm_head" else COPIES
        w8 = [torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda") for _ in range(copies)]
        scale = torch.rand(N, device="cuda", dtype=torch.bfloat16) / 100
        w16 = [w.to(torch.bfloat16) for w in w8[:2]]
        row = {}
        for M in (1, 2, 4, 8, 16, 32, 63):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            for bm in (16, 64):
                if bm < M:
                    continue
                grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
                row[f"int8_M{M}_BM{bm}_us"] = graph_us(
                    [lambda w=w: kernel[grid](x, w, scale, y, M, N, K, BLOCK_M=bm) for w in w8])
            row[f"bf16_M{M}_us"] = graph_us([lambda w=w: torch.mm(x, w.t(), out=y) for w in w16])
        row["best_config"] = str(kernel.best_config)
        out[name] = row
        del w8, w16
        G.free()
    # a decode step's linears (32 layers + lm_head), int8 kernel with BLOCK_M 64 vs bf16 cuBLAS
    for M in (1, 2, 4, 8, 16, 32, 63):
        for key in (f"int8_M{M}_BM64_us", f"bf16_M{M}_us"):
            out.setdefault("step_linears_ms", {})[key] = 1e-3 * (
                sum(32 * PER_LAYER[n] * out[n][key] for n in PER_LAYER) + out["lm_head"][key])
    return out


def engine(fmt, batch=32):
    m = model if fmt == "bf16" else G.shared_copy(model)
    return TorchEngine.from_decoder(m, max_batch_size=batch, max_seq_len=400, compile=True,
                                    quant=None if fmt == "bf16" else fmt, warmup=False)


def engine_rows(fmt, batches=(1, 2, 4, 8, 16, 32)):
    def run():
        eng = engine(fmt)
        out = {"step_ms": {b: step_ms(eng, b) for b in batches}}
        eng.cache = None
        G.decode_step_seconds(eng, 8, 128, repeats=3)
        out["b8_profile"] = G.profile_kernels(eng._static[8].graph.replay, 3, top=8)
        eng.cache = None
        out["prefill_ms"] = {t: prefill_ms(eng, t) for t in (16, 48, 128)}
        eng.cache = None
        r = G.engine_tokens_per_s(eng, 128, 256, 3)
        out.update(tokens_per_s=r["tokens_per_s"], ttft_ms=1e3 * r["ttft_s"]["p50"])
        del eng
        G.free()
        return out
    return run


import triton  # noqa: E402

if "kernel" in os.environ.get("PARTS", "kernel,engines"):
    guarded("kernel", kernel_rows)
guarded("bf16", engine_rows("bf16"))
guarded("int8_wo", engine_rows("int8_wo"))
guarded("int4_wo", engine_rows("int4_wo", (1, 8)))
if isinstance(R.get("int8_wo"), dict) and isinstance(R.get("bf16"), dict) and "tokens_per_s" in R["int8_wo"]:
    R["int8_vs_bf16_tokens_per_s"] = R["int8_wo"]["tokens_per_s"] / R["bf16"]["tokens_per_s"]
    save()
print("done", R.get("int8_vs_bf16_tokens_per_s"), flush=True)
