# Pins private parts of nbtrt (may break when they change): TorchEngine._static, _replay, _prefill_static, _pool.
"""Experiment (GPU): does an INT4 8B engine's decode graph replay slower once other things exist
in the process? One engine (graphed prefills off while it warms up), its decode graph replayed
(median of 50, five times) after each step in turn: nothing; a small unrelated graph captured in a
pool of its own; 2 GiB held in a plain tensor; a 128-token prefill graph captured (the engine's,
in its pool); that graph deleted. argv[2] "uncaptured-first": before the graph, the same padded
prefill compiled and run without one; "own-pool": the prefill graph in a pool of its own; "no-pdl": decode kernels launched without
programmatic dependent launch. JSON to argv[1].

    PYTHONPATH=. python benchmarks/experiments/graph_neighbours.py $OUT/graph_neighbours.json
"""
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu as G  # noqa: E402

from nbtrt.runtimes.torch_engine import TorchEngine  # noqa: E402

QUICK = bool(os.environ.get("QUICK"))
VARIANT = sys.argv[2] if len(sys.argv) > 2 else ""  # "uncaptured-first", "own-pool" or "no-pdl"


def without_pdl() -> None:
    """Decode kernels launched without programmatic dependent launch (Inductor's and nbtrt's)."""
    from nbtrt.kernels import cuda_int4

    compile_ = torch.compile

    def compile_without_pdl(fn, **kw):
        kw["options"] = {k: v for k, v in (kw.get("options") or {}).items() if k != "triton.enable_pdl"}
        return compile_(fn, **kw)

    torch.compile = compile_without_pdl
    cuda_int4.dependent_launch = lambda device_index: False


def main() -> None:
    if VARIANT == "no-pdl":
        without_pdl()
    model = G.llama8b_random(QUICK)
    eng = TorchEngine.from_decoder(model, max_batch_size=1, max_seq_len=384, quant="int4_wo", compile=True,
                                   warmup=False)
    eng.graph_prefill = False
    eng.warmup()
    prompt = torch.randint(0, eng.config.vocab_size, (1, 128), device=G.DEV)
    rows = {}

    def replay_ms(step: str) -> None:
        G.decode_step_seconds(eng, 1, 128)  # a fresh prefill and decode step, as gpu.py measures
        graph = eng._static[1].graph
        rows[step] = [1e3 * G.median_time(graph.replay, repeats=50, warmup=3) for _ in range(5)] if graph else []
        print(f"{step:28s} {[round(x, 3) for x in rows[step]]}", flush=True)

    replay_ms("alone")
    small = torch.cuda.CUDAGraph() if G.CUDA else None
    if small is not None:
        a = torch.randn(256, 256, device=G.DEV)
        with torch.cuda.graph(small):
            b = a @ a
    replay_ms("small graph, own pool")
    held = torch.empty(2 << 30, dtype=torch.uint8, device=G.DEV)
    replay_ms("2 GiB held")
    del held
    replay_ms("2 GiB freed")
    eng.graph_prefill = True
    if VARIANT == "uncaptured-first":  # the padded prefill compiled and run, no graph captured
        replay = eng._replay
        eng._replay = lambda st, run, what, new: run()
        eng.begin(1)
        eng.step(prompt, torch.ones_like(prompt))
        replay_ms("padded prefill, no graph")
        eng._replay = replay
        eng._prefill_static.clear()
    if VARIANT == "own-pool":  # the prefill graph in a memory pool of its own
        decode_pool, eng._pool = eng._pool, torch.cuda.graph_pool_handle()
    eng.begin(1)
    eng.step(prompt, torch.ones_like(prompt))
    replay_ms("prefill graph captured")
    eng._prefill_static.clear()
    gc.collect()
    replay_ms("prefill graph deleted")
    out = {"device": torch.cuda.get_device_name() if G.CUDA else "cpu", "date": time.strftime("%Y-%m-%d"),
           "variant": VARIANT, "replay_ms": rows, "median_ms": {k: statistics.median(v) for k, v in rows.items() if v}}
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
