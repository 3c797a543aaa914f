# Pins private parts of nbtrt (may break when they change): kernels.triton_int4._kernel; sets runtimes.torch_linears.INT4_TRITON_MAX_ROWS and reads runtimes.torch_engine.ATTENTION_BACKENDS.
"""INT4 linears of many rows (a prefill), GPU: the Triton kernel that reads the packed weight
(``nbtrt::int4_weight_mm``) against dequantizing it for cuBLAS (``nbtrt::int4_dequantize`` +
``F.linear``), on the 8B config's shapes, and the 8B INT4 engine's 128-token prefill either way.

    PYTHONPATH=. python benchmarks/experiments/int4_prefill_gemm.py kernels|engine|noise [out.json]

``kernels``: each shape and row count autotuned over a wide list of tile configs (the best and
every config's time; the shipped list is ``triton_int4.CONFIGS``), the old path's time, and the
largest error against the dequantized weight's matmul. ``engine``: the 8B INT4 engine's prefill
(host clock, CUDA events, kernels) with the Triton kernel off, then on (``INT4_TRITON_MAX_ROWS``),
and the eager model's prefill logits either way. ``noise``: those logits against a reordering of
attention alone (SDPA's math backend), for scale.
"""
import itertools
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.experiments.prefill_host import host_and_gpu_ms
from benchmarks.gpu import DEV, llama8b_random, profile_kernels, rel_l2, sync
from nbtrt.kernels import cuda_int4, triton_int4
from nbtrt.runtimes import torch_engine as torch_backend, torch_linears

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
ROWS = (16, 128, 512, 2048)
GROUP = 128
WIDE = tuple((m, n, k, w, s) for m, n, k, (w, s) in itertools.product(
    (16, 32, 64, 128), (32, 64, 128, 256), (64, 128), ((4, 3), (8, 3), (4, 4))))


def bench_ms(fn) -> float:
    import triton
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def kernels(R):
    for name, (N, K) in SHAPES.items():
        u = torch.randint(0, 16, (N, K), device=DEV, dtype=torch.int32)
        words = cuda_int4.pack(u)
        del u
        scales_t = (torch.rand(K // GROUP, N, device=DEV) * 0.02 + 0.001).to(torch.bfloat16)
        for M in ROWS:
            x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
            configs = tuple(c for c in WIDE if (c[0] <= 32) == (M <= 32) and c[1] * c[2] * c[0] <= 128 * 256 * 64)
            kernel = triton_int4._kernel(configs)
            y = x.new_empty(M, N)
            grid = lambda meta: ((M + meta["BLOCK_M"] - 1) // meta["BLOCK_M"], (N + meta["BLOCK_N"] - 1) // meta["BLOCK_N"])  # noqa: E731
            kernel.cache.clear()  # tuned again for each row count
            t = time.perf_counter()
            kernel[grid](x, words, scales_t, y, M, N, K, GROUP)
            tune_s = time.perf_counter() - t
            ref = F.linear(x, torch.ops.nbtrt.int4_dequantize(words, scales_t, GROUP))
            timings = {str(tuple(c.kwargs.values()) + (c.num_warps, c.num_stages)): ms[0] if isinstance(ms, list) else ms
                       for c, ms in kernel.configs_timings.items()}
            best = kernel.best_config
            row = {"best": str(tuple(best.kwargs.values()) + (best.num_warps, best.num_stages)),
                   "triton_ms": min(timings.values()), "tune_s": tune_s,
                   "shipped_ms": None, "rel_l2": rel_l2(y.float(), ref.float()),
                   "dequant_mm_ms": bench_ms(lambda: F.linear(x, torch.ops.nbtrt.int4_dequantize(words, scales_t, GROUP))),
                   "configs_ms": timings}
            shipped = triton_int4._kernel()
            row["shipped_ms"] = bench_ms(lambda: shipped[grid](x, words, scales_t, y, M, N, K, GROUP))
            if M <= 64:
                row["int4_mm_ms"] = bench_ms(lambda: torch.ops.nbtrt.int4_mm(x, words, scales_t, GROUP))
            R[f"{name}_{M}"] = row
            print(name, M, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "configs_ms"},
                  flush=True)
        del words, scales_t
        torch.cuda.empty_cache()


def int4_8b_engine(prompt: int, compile: bool):
    """The 8B config's INT4 engine over random weights (not warmed up), and a random prompt."""
    from nbtrt.runtimes.torch_engine import TorchEngine

    model = llama8b_random(quick=False)
    eng = TorchEngine.from_decoder(model, max_batch_size=1, max_seq_len=prompt + 256, compile=compile,
                                   quant="int4_wo", warmup=False)
    return eng, torch.randint(0, model.cfg.vocab_size, (1, prompt), device=DEV)


def engine(R, prompt=128, calls=7):
    eng, ids = int4_8b_engine(prompt, compile=True)
    logits = {}
    for label, max_rows in (("dequant_cublas", 0), ("triton", 128)):
        torch_linears.INT4_TRITON_MAX_ROWS = max_rows
        with torch.inference_mode():
            logits[label] = eng.model(ids).float()[:, -1]  # eager: the same modules, uncompiled

        def prefill():
            eng.begin(1)
            return eng.step(ids, torch.ones_like(ids))

        t = time.perf_counter()
        prefill()
        sync()
        first_s = time.perf_counter() - t
        host, gpu = host_and_gpu_ms(prefill, calls)
        prof = profile_kernels(prefill, 1, top=8)
        row = {"first_call_s": first_s, "host_ms": host, "gpu_ms": gpu, "host_ms_median": statistics.median(host),
               "gpu_ms_median": statistics.median(gpu), "kernels_ms": prof[0]["total_us"] / 1e3,
               "kernel_count": prof[0]["kernels"], "top_kernels": prof[1:]}
        print(label, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                      if k not in ("top_kernels", "host_ms", "gpu_ms")}, flush=True)
        R[label] = row
    R["eager_logits_rel_l2"] = rel_l2(logits["triton"], logits["dequant_cublas"])
    print("eager logits rel L2, triton vs dequant+cuBLAS:", R["eager_logits_rel_l2"], flush=True)


def noise(R, prompt=128):
    """How far two orders of the same arithmetic drift apart over the 8B model's 32 random layers:
    the eager INT4 model's prefill logits with either INT4 path, each under the engine's attention backends
    and its math backend (a reordering of attention alone), all pairs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    eng, ids = int4_8b_engine(prompt, compile=False)
    logits = {}
    for path, max_rows in (("dequant_cublas", 0), ("triton", 128)):
        torch_linears.INT4_TRITON_MAX_ROWS = max_rows
        for attention, backends in (("default", torch_backend.ATTENTION_BACKENDS), ("math", [SDPBackend.MATH])):
            with torch.inference_mode(), sdpa_kernel(backends):
                logits[f"{path}/{attention}"] = eng.model(ids).float()[:, -1]
    names = list(logits)
    R["rel_l2"] = {f"{a} vs {b}": rel_l2(logits[a], logits[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    for pair, value in R["rel_l2"].items():
        print(pair, round(value, 4), flush=True)


if __name__ == "__main__":
    mode, out = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    R = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "mode": mode}
    {"kernels": kernels, "engine": engine, "noise": noise}[mode](R)
    if out:
        json.dump(R, open(out, "w"), indent=1)
