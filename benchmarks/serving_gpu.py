"""Issue 29's GPU targets: in-flight batching over the paged KV cache against today's static batching,
one process, one engine (llama-3.1-8b config, random weights, bf16).

  static    the compiled TorchEngine in static batches of 64 (bench.measure, as bench.py runs it):
            batch-1 128/128 tokens/s, ShareGPT-like 100 and 1000 requests (lengths capped at 512)
  inflight  nbtrt.LLM over the same weights: the same requests all at once, fixed 128/128 at full
            load, batch-1 tokens/s, a Poisson sweep of the 100-request mix, and the greedy
            agreement of its tokens with the static engine's on 64 requests

Targets (issue 29): ShareGPT-like 1000 >= 4x the static requests/s; 128/128 full load >= 15,000
output tokens/s; batch-1 within 5% of the static engine; greedy agreement >= 99% of tokens.

    python benchmarks/serving_gpu.py            # H100, ~6 minutes
    python benchmarks/serving_gpu.py --quick    # a shrunk config, any machine, a smoke test

JSON goes to ``$OUT/serving_gpu.json`` (or ``--out``); a summary is printed last.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbtrt import bench as B  # noqa: E402
from nbtrt.generate import SamplingParams  # noqa: E402
from nbtrt.serving.artifacts import engine_from_decoder, release_static_cache  # noqa: E402
from nbtrt.bench.serving import poisson_arrivals, run_requests  # noqa: E402
from nbtrt.serving.llm import LLM  # noqa: E402
from gpu import DEV, llama8b_random  # noqa: E402  (benchmarks/gpu.py: the same 8B model, N(0, 0.02) weights)


def free():
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two runs' greedy tokens agree."""
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return same / max(1, sum(len(r) for r in b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--max-batch-size", type=int, default=256, help="in-flight: sequences a step")
    ap.add_argument("--max-num-tokens", type=int, default=2048, help="in-flight: tokens a step")
    ap.add_argument("--skip-static-1000", action="store_true", help="leave out the 1000-request static run (~90 s)")
    ap.add_argument("--no-static", action="store_true", help="in-flight only (no baseline, no agreement)")
    ap.add_argument("--requests", type=int, default=1000, help="the large ShareGPT-like mix")
    ap.add_argument("--no-poisson", action="store_true", help="leave out the Poisson sweep (online serving)")
    ap.add_argument("--untiled", action="store_true", help="mixed steps per sequence (the tile kernel off)")
    ap.add_argument("--no-ablation", action="store_true",
                    help="leave out batch 1 and full load re-run without overlap and without tiling")
    ap.add_argument("--full-load", type=int, default=1024, help="128/128 requests at full load")
    ap.add_argument("--prefix-caching", action="store_true", help="in-flight: share repeated prompts' KV blocks")
    a = ap.parse_args()
    out = Path(a.out or Path(os.environ.get("OUT", "benchmarks/results")) / "serving_gpu.json")
    q = a.quick
    cap, n_small, n_large, n_agree, agree_len = (32, 12, 48, 8, 16) if q else (512, 100, a.requests, 64, 64)
    static_bs, full_load = (4, 64) if q else (64, a.full_load)
    R: dict = {"machine": B.machine(), "quick": q, "settings": vars(a)}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(R, indent=1, default=str))
        os.replace(tmp, out)

    t_start = time.perf_counter()
    model = llama8b_random(q)
    V = model.cfg.vocab_size
    mixes = {n: B.sharegpt_like(n, seed=0, max_input_len=cap, max_output_len=cap, batch_size=static_bs)
             for n in (n_small, n_large)}
    fixed1 = B.fixed(1, 128, 128, repeats=3) if not q else B.fixed(1, 16, 16, repeats=2)
    longest = 2 * cap + 8
    engine = engine_from_decoder(model, max_batch_size=static_bs, max_seq_len=longest, compile=DEV.type == "cuda",
                                 warmup=not a.no_static)
    R["compile_s"] = {"static": round(time.perf_counter() - t_start, 1)}

    # ---------------------------------------------------------------- static batching (today)
    runner = B.engine_runner(engine)
    R["static"] = {}
    agree_prompts = mixes[n_small].prompts(V)[:n_agree]
    if not a.no_static:
        R["static"]["batch1"] = B.measure(runner, fixed1, V)
        for n, mix in mixes.items():
            if n == n_large and a.skip_static_1000:
                continue
            R["static"][f"sharegpt{n}"] = B.measure(runner, mix, V, warmup=0 if n == n_large else 1)
        static_tokens = [t for i in range(0, n_agree, static_bs) for t in engine.generate(
            input_ids=agree_prompts[i:i + static_bs], max_new_tokens=agree_len, stop_token_ids=())]
        save()
    release_static_cache(engine)
    free()

    # ---------------------------------------------------------------- in-flight batching
    t = time.perf_counter()
    # prefix caching off: the same prompts run again (batch-1 repeats, the ablation, the Poisson sweep
    # of the 100-mix), and a cache would serve the repeats from memory; static batching has none
    llm = LLM(engine, max_batch_size=a.max_batch_size, max_num_tokens=a.max_num_tokens, max_seq_len=longest,
              max_input_len=longest, tiled=False if a.untiled else None, prefix_caching=a.prefix_caching)
    R["compile_s"]["inflight"] = round(time.perf_counter() - t, 1)
    R["kv_pool"] = {"blocks": llm.pool.capacity, "block_size": llm.pool.block_size,
                    "tokens": llm.pool.capacity * llm.pool.block_size, "gib": llm.pool.bytes / 2 ** 30}
    inflight = R["inflight"] = {}
    outs = llm.generate(agree_prompts, SamplingParams(max_new_tokens=agree_len), use_tqdm=False)
    if not a.no_static:
        inflight["greedy_agreement"] = agreement([o.token_ids for o in outs], static_tokens)
        inflight["greedy_exact_requests"] = sum(o.token_ids == s for o, s in zip(outs, static_tokens)) / len(outs)
    p1 = fixed1.prompts(V)[0]
    n1 = fixed1.lengths[0][1]
    run_requests(llm, [p1], [n1], progress=False)  # warm-up
    walls = [run_requests(llm, [p1], [n1], progress=False)["wall_s"] for _ in range(fixed1.repeats)]
    inflight["batch1"] = {"tokens_per_s": n1 / float(np.median(walls)), "wall_s": walls}
    for n, mix in mixes.items():
        inflight[f"sharegpt{n}"] = run_requests(llm, mix.prompts(V), [m for _, m in mix.lengths],
                                                desc=f"in-flight sharegpt {n}")
        save()
    full = B.fixed(full_load, 128, 128) if not q else B.fixed(full_load, 16, 16)
    with step_times(llm) as steps:
        inflight["fixed128_full_load"] = run_requests(llm, full.prompts(V), [m for _, m in full.lengths],
                                                      desc=f"in-flight {full_load} x 128/128")
    inflight["fixed128_full_load"]["steps"] = steps
    save()
    if not a.no_ablation:  # what each part buys, on the same engine and pool: switch one off at a time
        ablation = inflight["ablation"] = {}
        for name, attr, obj in (("no_overlap", "overlap", llm), ("untiled", "tiled", llm.runner)):
            if not getattr(obj, attr):
                continue
            setattr(obj, attr, False)
            if name == "no_overlap":
                walls = [run_requests(llm, [p1], [n1], progress=False)["wall_s"] for _ in range(fixed1.repeats)]
                ablation["batch1_no_overlap"] = {"tokens_per_s": n1 / float(np.median(walls)), "wall_s": walls}
            with step_times(llm) as st:
                ablation[f"fixed128_full_load_{name}"] = run_requests(
                    llm, full.prompts(V), [m for _, m in full.lengths], desc=f"full load, {name}")
            ablation[f"fixed128_full_load_{name}"]["steps"] = st
            setattr(obj, attr, True)
            save()
    base_rate = inflight[f"sharegpt{n_small}"]["requests_per_s"]
    mix = mixes[n_small]
    inflight["poisson"] = []
    for frac in () if a.no_poisson else (0.25, 0.5, 1.0):
        rate = frac * base_rate
        r = run_requests(llm, mix.prompts(V), [m for _, m in mix.lengths], poisson_arrivals(len(mix.lengths), rate),
                         desc=f"in-flight poisson {rate:.1f} req/s")
        inflight["poisson"].append({"rate": rate, **r})
        save()
    inflight["stats"] = llm.stats()
    if DEV.type == "cuda":
        inflight["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    llm.shutdown()
    del llm, engine, runner, model
    free()
    if not a.no_static:
        R["fp32_agreement"] = fp32_agreement(q, agree_prompts, agree_len)
    R["total_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print(summary(R))
    print(f"wrote {out}")


def fp32_agreement(quick: bool, prompts: list[list[int]], new_tokens: int, layers: int = 4) -> dict:
    """The same greedy comparison in fp32 on the first ``layers`` layers of the 8B shape: with the
    rounding of bf16 out of the way, what is left is the runtimes' own arithmetic order."""
    model = llama8b_random(quick)
    del model.layers[layers:]
    model.cfg.num_layers, model.cfg.dtype = layers, "float32"
    model.float()
    engine = engine_from_decoder(model, max_batch_size=16, max_seq_len=2 * max(map(len, prompts)) + new_tokens,
                                 compile=False, warmup=False)
    static = [t for i in range(0, len(prompts), 16) for t in engine.generate(
        input_ids=prompts[i:i + 16], max_new_tokens=new_tokens, stop_token_ids=())]
    release_static_cache(engine)
    with LLM(engine, max_batch_size=64, verbose=False, prefix_caching=False) as llm:
        outs = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_new_tokens=new_tokens), use_tqdm=False)]
    r = {"layers": layers, "dtype": "float32", "requests": len(prompts), "new_tokens": new_tokens,
         "greedy_agreement": agreement(outs, static),
         "greedy_exact_requests": sum(o == s for o, s in zip(outs, static)) / len(outs)}
    del engine, model
    free()
    return r


class step_times:
    """Where a run's time goes: each runner step's GPU time (CUDA events around it, read at the end:
    no synchronisation, so overlapped steps stay overlapped), summed by kind -- decode-only steps
    (CUDA graphs) and steps with a prefill chunk. Wall time minus their sum is the GPU's idle time."""

    def __init__(self, llm: LLM):
        self.llm, self.rows = llm, []

    def __enter__(self) -> dict:
        runner, step, rows = self.llm.runner, self.llm.runner.step, self.rows

        def timed(batch, fed=None):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if DEV.type == "cuda" else None
            t = time.perf_counter()
            if ev:
                ev[0].record()
            out = step(batch, fed)
            if ev:
                ev[1].record()
            rows.append((batch.num_decodes == len(batch.seqs), batch.num_tokens, ev or time.perf_counter() - t))
            return out

        runner.step = timed
        self.result = {}
        return self.result

    def __exit__(self, *exc) -> None:
        del self.llm.runner.step  # the class's own method again
        if DEV.type == "cuda":
            torch.cuda.synchronize()
        self.rows = [(d, n, t if isinstance(t, float) else t[0].elapsed_time(t[1]) / 1e3) for d, n, t in self.rows]
        for kind, decode in (("decode_only", True), ("with_prefill", False)):
            ts = [t for d, _, t in self.rows if d == decode]
            toks = [n for d, n, _ in self.rows if d == decode]
            self.result[kind] = {"steps": len(ts), "total_s": sum(ts), "median_ms": 1e3 * float(np.median(ts)) if ts else None,
                                 "median_tokens": float(np.median(toks)) if toks else None}


def summary(R: dict) -> str:
    s, i = R["static"], R["inflight"]
    lines = [f"device: {R['machine'].get('gpu') or 'cpu'}  date: {R['machine']['date']}  total {R['total_s']} s  "
             f"compile {R['compile_s']}", f"KV pool: {R['kv_pool']}"]
    for key in [k for k in i if k.startswith("sharegpt")]:
        ri = i[key]["requests_per_s"]
        st = s.get(key)
        base = f"static {st['requests_per_s']:.2f} req/s {st['tokens_per_s']:.0f} tok/s -> " if st else "static: not run -> "
        ratio = f" = {ri / st['requests_per_s']:.2f}x" if st else ""
        lines.append(f"{key}: {base}in-flight {ri:.2f} req/s {i[key]['output_tokens_per_s']:.0f} tok/s{ratio}  "
                     f"TTFT p50 {i[key]['ttft_s']['p50']:.2f}s ITL p99 {1e3 * i[key]['itl_s']['p99']:.1f}ms "
                     f"(target 1000: >= 4x)")
    f = i["fixed128_full_load"]
    lines.append(f"fixed 128/128 full load: {f['output_tokens_per_s']:.0f} output tok/s, wall {f['wall_s']:.2f} s, peak KV blocks "
                 f"{f['kv_blocks']['peak']} (target >= 15000)")
    for kind, st in f.get("steps", {}).items():
        if st["steps"]:
            lines.append(f"  {kind} steps: {st['steps']}, GPU {st['total_s']:.2f} s, median {st['median_ms']:.1f} ms "
                         f"of {st['median_tokens']:.0f} tokens")
    for key, r in i.get("ablation", {}).items():
        if key.startswith("batch1"):
            lines.append(f"  ablation {key}: {r['tokens_per_s']:.1f} tok/s")
        else:
            gpu = sum(st["total_s"] for st in r["steps"].values())
            lines.append(f"  ablation {key}: {r['output_tokens_per_s']:.0f} tok/s, wall {r['wall_s']:.2f} s, "
                         f"GPU busy {gpu:.2f} s")
    b_i = i["batch1"]["tokens_per_s"]
    if "batch1" in s:
        b_s = s["batch1"]["tokens_per_s"]
        lines.append(f"batch 1: static {b_s:.1f} tok/s, in-flight {b_i:.1f} tok/s = {b_i / b_s:.3f}x (target >= 0.95)")
        lines.append(f"greedy agreement with the static engine: {100 * i['greedy_agreement']:.2f}% of tokens, "
                     f"{100 * i['greedy_exact_requests']:.0f}% of requests identical (target >= 99%)")
    else:
        lines.append(f"batch 1: in-flight {b_i:.1f} tok/s (static not run)")
    if "fp32_agreement" in R:
        f32 = R["fp32_agreement"]
        lines.append(f"greedy agreement in fp32 ({f32['layers']} layers of the same shape): "
                     f"{100 * f32['greedy_agreement']:.2f}% of tokens, {100 * f32['greedy_exact_requests']:.0f}% of requests")
    for p in i["poisson"]:
        lines.append(f"poisson {p['rate']:.2f} req/s: {p['requests_per_s']:.2f} req/s served, TTFT p50 "
                     f"{p['ttft_s']['p50']:.3f}s p99 {p['ttft_s']['p99']:.3f}s, TPOT p50 {1e3 * p['tpot_s']['p50']:.1f}ms")
    lines.append(f"preemptions: {i['stats']['preemptions']}, peak memory {i.get('peak_memory_gib', 0):.1f} GiB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
