# Pins private parts of nbtrt (may break when they change): TorchEngine._static (its decode graph); sets runtimes.torch_engine.ATTENTION_BACKENDS.
"""Experiment (GPU): graph_kinds.py found that capturing a graph of flash attention takes an INT4
8B engine's decode graph's dependent-launch overlap away. Does another SDPA backend do the same?
For each backend, in a process of its own (the slow state outlasts the graph that caused it): the
decode graph replayed (median of 50, three times) alone; after a graph of that backend's causal
attention (128 tokens, 32 heads of 128); after the engine's own 128-token prefill graph with that
backend its only one; then the engine's first token and tokens/s as gpu.py measures them.
JSON to argv[1]; argv[2] the backends, comma-separated (default all four).

    PYTHONPATH=. python benchmarks/experiments/attention_graphs.py $OUT/attention_graphs.json flash,efficient
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu as G  # noqa: E402
from graph_kinds import captured  # noqa: E402

import nbtrt.runtimes.torch_engine as nbtrt_torch  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
QUICK = bool(os.environ.get("QUICK"))


def one(name: str) -> dict:
    backend = BACKENDS[name]
    model = G.llama8b_random(QUICK)
    eng = nbtrt_torch.TorchEngine.from_decoder(model, max_batch_size=1, max_seq_len=384, quant="int4_wo",
                                               compile=True, warmup=False)
    eng.graph_prefill = False
    eng.warmup()
    G.decode_step_seconds(eng, 1, 128)
    graph = eng._static[1].graph
    rows, keep = {}, []

    def replay_ms(step: str) -> None:
        rows[step] = [1e3 * G.median_time(graph.replay, repeats=50, warmup=3) for _ in range(3)] if graph else []
        print(f"{name:10s} {step:30s} {[round(x, 3) for x in rows[step]]}", flush=True)

    replay_ms("alone")
    q = torch.randn(1, 32, 128, 128, device=G.DEV, dtype=torch.bfloat16)
    with sdpa_kernel([backend]):
        keep.append(captured(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True)))
    replay_ms("attention graph")
    nbtrt_torch.ATTENTION_BACKENDS = [backend]  # _run reads it at call time
    eng.graph_prefill = True
    prompt = torch.randint(0, eng.config.vocab_size, (1, 128), device=G.DEV)
    eng.begin(1)
    eng.step(prompt, torch.ones_like(prompt))
    replay_ms("engine prefill graph")
    r = G.engine_tokens_per_s(eng, 128, 16 if QUICK else 256, repeats=3)
    row = {"replay_ms": rows, "tokens_per_s": r["tokens_per_s"], "ttft_s": r["ttft_s"]["p50"], "tpot_s": r["tpot_s"]["p50"]}
    print(f"{name:10s} ttft {row['ttft_s'] * 1e3:.1f} ms  tpot {row['tpot_s'] * 1e3:.3f} ms  {row['tokens_per_s']:.1f} tok/s", flush=True)
    return row


def main() -> None:
    if sys.argv[1] == "--one":
        Path(sys.argv[3]).write_text(json.dumps(one(sys.argv[2]), default=str))
        return
    out = Path(sys.argv[1])
    rows = {}
    for name in (sys.argv[2] if len(sys.argv) > 2 else ",".join(BACKENDS)).split(","):
        part = out.with_suffix(f".{name}.json")
        done = subprocess.run([sys.executable, __file__, "--one", name, str(part)], capture_output=True, text=True)
        print(done.stdout, end="", flush=True)
        rows[name] = json.loads(part.read_text()) if part.exists() else {"error": (done.stdout + done.stderr)[-2000:]}
        if "error" in rows[name]:
            print(name, rows[name]["error"][-600:], flush=True)
        out.write_text(json.dumps({"device": torch.cuda.get_device_name() if G.CUDA else "cpu",
                                   "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
