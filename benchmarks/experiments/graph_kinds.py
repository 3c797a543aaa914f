# Pins private parts of nbtrt (may break when they change): TorchEngine._static (its decode graph).
"""Experiment (GPU): which kind of captured graph takes an INT4 8B engine's decode graph's
dependent-launch overlap away (graph_neighbours.py found that capturing a prefill graph does).
One engine; its decode graph replayed (median of 50, three times) alone, then after each of
these is captured in turn, each a graph of its own: an Inductor Triton kernel compiled without
dependent launch; nbtrt's NVRTC dequantization (one layer's gate/up weight); flash attention;
a cuBLAS GEMM of 128 rows; an Inductor Triton kernel compiled with dependent launch. The first
step after which the replay slows names the suspect; then the engine's own 128-token prefill
graph, and a dependent-launch kernel's graph after it. JSON to argv[1].

    PYTHONPATH=. python benchmarks/experiments/graph_kinds.py $OUT/graph_kinds.json
"""
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu as G  # noqa: E402

from nbtrt.runtimes.torch_linears import Int4GatedInput  # noqa: E402

from nbtrt.runtimes.torch_engine import TorchEngine  # noqa: E402

QUICK = bool(os.environ.get("QUICK"))


def captured(fn) -> torch.cuda.CUDAGraph | None:
    """``fn`` run twice, then captured as a graph of its own (kept alive by the caller)."""
    fn()
    fn()
    if not G.CUDA:
        return None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    return graph


def main() -> None:
    model = G.llama8b_random(QUICK)
    eng = TorchEngine.from_decoder(model, max_batch_size=1, max_seq_len=384, quant="int4_wo", compile=True)
    dev, bf = G.DEV, torch.bfloat16
    G.decode_step_seconds(eng, 1, 128)
    graph = eng._static[1].graph
    rows, keep = {}, []

    def replay_ms(step: str) -> None:
        rows[step] = [1e3 * G.median_time(graph.replay, repeats=50, warmup=3) for _ in range(3)] if graph else []
        print(f"{step:34s} {[round(x, 3) for x in rows[step]]}", flush=True)

    replay_ms("alone")
    x = torch.randn(64, 4096, device=dev, dtype=bf)
    plain = torch.compile(lambda t: (t.float() * 2).sum(-1), fullgraph=True)
    keep.append(captured(lambda: plain(x)))
    replay_ms("Triton kernel, no dependent launch")
    gated = next((m for m in eng.model.modules() if isinstance(m, Int4GatedInput)), None)
    if gated is not None:
        keep.append(captured(lambda: torch.ops.nbtrt.int4_dequantize(gated.packed, gated.scales, gated.group_size)))
        replay_ms("NVRTC int4 dequantization")
    q = torch.randn(1, 32, 128, 128, device=dev, dtype=bf)
    keep.append(captured(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True)))
    replay_ms("flash attention")
    a, w = torch.randn(128, 4096, device=dev, dtype=bf), torch.randn(4096, 4096, device=dev, dtype=bf)
    keep.append(captured(lambda: a @ w))
    replay_ms("cuBLAS GEMM, 128 rows")
    pdl = torch.compile(lambda t: (t.float() * 3).sum(-1), fullgraph=True, options={"triton.enable_pdl": True})
    keep.append(captured(lambda: pdl(x)))
    replay_ms("Triton kernel, dependent launch")
    prompt = torch.randint(0, eng.config.vocab_size, (1, 128), device=dev)
    eng.graph_prefill = True
    eng.begin(1)
    eng.step(prompt, torch.ones_like(prompt))
    eng.graph_prefill = False
    replay_ms("then the engine's prefill graph")
    pdl2 = torch.compile(lambda t: (t.float() * 4).sum(-1), fullgraph=True, options={"triton.enable_pdl": True})
    keep.append(captured(lambda: pdl2(x)))
    replay_ms("then a dependent-launch kernel again")
    out = {"device": torch.cuda.get_device_name() if G.CUDA else "cpu", "date": time.strftime("%Y-%m-%d"),
           "replay_ms": rows}
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
