"""Issue 29's two unmet speed targets, looked at with the profiler: where a decode step's GPU time
goes (the 8B config, bf16, random weights), at full load (256 sequences a step, the batch that
bounds 128/128 throughput) and at batch 1 (in-flight vs the static engine's step).

    python benchmarks/experiments/decode_profile.py            # a GPU, ~2 minutes
    python benchmarks/experiments/decode_profile.py --quick    # a shrunk config, any machine

For each case: the median step time (CUDA events), and the kernels over ``--steps`` decode steps
grouped by kind (GEMMs, paged attention, norms / rotary / elementwise, the rest), top kernels by
GPU time. JSON goes to ``$OUT/decode_profile.json`` (device and date in it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbtrt import bench as B  # noqa: E402
from nbtrt.generate import SamplingParams  # noqa: E402
from nbtrt.serving.artifacts import engine_from_decoder, release_static_cache  # noqa: E402
from nbtrt.serving.llm import LLM  # noqa: E402
from gpu import DEV, llama8b_random  # noqa: E402

KINDS = (("gemm", ("gemm", "sm90", "cutlass", "xmma", "ampere", "nvjet", "splitk")),
         ("attention", ("paged", "attn", "flash", "sdpa", "fmha")),
         ("norm/rotary/elementwise", ("norm", "rotary", "elementwise", "triton_poi", "triton_red", "mul", "add",
                                      "silu", "cat", "copy", "index", "fill")))


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, words in KINDS if any(w in low for w in words)), "other")


class Profiled:
    """Wrap ``llm.runner.step``: after ``skip`` decode-only steps of ``batch`` sequences, profile the
    next ``steps`` of them (CUDA events per step, and torch.profiler's kernel table)."""

    def __init__(self, llm: LLM, batch: int, skip: int, steps: int):
        self.llm, self.batch, self.skip, self.steps = llm, batch, skip, steps
        self.seen, self.events, self.prof = 0, [], None

    def __enter__(self):
        step = self.llm.runner.step

        def wrapped(b, fed=None):
            hit = b.num_decodes == len(b.seqs) == self.batch
            if hit:
                self.seen += 1
            on = hit and self.skip < self.seen <= self.skip + self.steps
            if on and self.prof is None:
                self.prof = profile(activities=[ProfilerActivity.CUDA] if DEV.type == "cuda" else [ProfilerActivity.CPU])
                self.prof.__enter__()
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if on and DEV.type == "cuda" else None
            if ev:
                ev[0].record()
            out = step(b, fed)
            if ev:
                ev[1].record()
                self.events.append(ev)
            if on and self.seen == self.skip + self.steps:
                if DEV.type == "cuda":
                    torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
            return out

        self.llm.runner.step = wrapped
        return self

    def __exit__(self, *exc):
        del self.llm.runner.step
        if DEV.type == "cuda":
            torch.cuda.synchronize()

    def result(self) -> dict:
        ms = [a.elapsed_time(b) for a, b in self.events]
        return {"batch": self.batch, "steps": len(ms), "median_step_ms": float(np.median(ms)) if ms else None,
                **kernel_table(self.prof, len(ms))}


def kernel_table(prof, steps: int) -> dict:
    if prof is None:
        return {"kernels": [], "by_kind_ms_per_step": {}}
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0
        if DEV.type != "cuda":
            t = e.self_cpu_time_total
        if t > 0 and (DEV.type != "cuda" or e.device_type.name == "CUDA"):
            rows.append({"name": e.key[:120], "calls": e.count, "ms_per_step": t / 1e3 / max(1, steps)})
    rows.sort(key=lambda r: -r["ms_per_step"])
    kinds: dict[str, float] = {}
    for r in rows:
        kinds[kind_of(r["name"])] = kinds.get(kind_of(r["name"]), 0.0) + r["ms_per_step"]
    return {"kernels": rows[:25], "by_kind_ms_per_step": kinds,
            "kernel_ms_per_step": sum(r["ms_per_step"] for r in rows)}


def static_decode_profile(engine, vocab: int, steps: int) -> dict:
    """The static engine's batch-1 decode step: prefill 128 tokens, then time and profile decode steps."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 128), generator=g).to(DEV)
    engine.begin(1)
    mask = torch.ones(1, 128, dtype=torch.long, device=DEV)
    engine.step(ids, mask)
    tok = ids[:, -1:]

    def one(past):
        m = torch.ones(1, past + 1, dtype=torch.long, device=DEV)
        return engine.step(tok, m)

    for i in range(5):
        one(128 + i)
    ev = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(steps)] if DEV.type == "cuda" else []
    act = [ProfilerActivity.CUDA] if DEV.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=act) as prof:
        for i in range(steps):
            if ev:
                ev[i][0].record()
            one(133 + i)
            if ev:
                ev[i][1].record()
        if DEV.type == "cuda":
            torch.cuda.synchronize()
    ms = [a.elapsed_time(b) for a, b in ev]
    return {"batch": 1, "steps": steps, "median_step_ms": float(np.median(ms)) if ms else None,
            **kernel_table(prof, steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--full-batch", type=int, default=256)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = Path(a.out or Path(os.environ.get("OUT", "benchmarks/results")) / "decode_profile.json")
    t0 = time.perf_counter()
    model = llama8b_random(a.quick)
    V = model.cfg.vocab_size
    engine = engine_from_decoder(model, max_batch_size=1, max_seq_len=1032, compile=DEV.type == "cuda", warmup=True)
    R: dict = {"machine": B.machine(), "quick": a.quick, "settings": vars(a)}
    R["static_batch1"] = static_decode_profile(engine, V, a.steps)
    release_static_cache(engine)
    full = a.full_batch if not a.quick else 16
    llm = LLM(engine, max_batch_size=full, max_num_tokens=2048, max_seq_len=1032, max_input_len=1032)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (128,), generator=g).tolist() for _ in range(full)]
    params = SamplingParams(max_new_tokens=128 if not a.quick else 40)
    for name, batch, n in (("inflight_batch1", 1, 1), ("inflight_full", full, full)):
        with Profiled(llm, batch, skip=5, steps=a.steps) as p:
            llm.generate(prompts[:n], params, use_tqdm=False)
        R[name] = p.result()
    llm.shutdown()
    R["total_s"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(R, indent=1, default=str))
    for name in ("static_batch1", "inflight_batch1", "inflight_full"):
        r = R[name]
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["by_kind_ms_per_step"].items(), key=lambda kv: -kv[1]))
        print(f"{name}: batch {r['batch']}, median step {r['median_step_ms']} ms; kernels/step (ms): {kinds}")
        for k in r["kernels"][:8]:
            print(f"    {k['ms_per_step']:7.3f} ms  x{k['calls'] / max(1, r['steps']):.0f}  {k['name']}")
    print(f"wrote {out}  ({R['total_s']} s)")


if __name__ == "__main__":
    main()
