# Pins private parts of nbtrt (may break when they change): TorchEngine._static; swaps runtimes.torch_attention.decode_attention (read by decode_block at call time).
"""Experiment (GPU): what decode attention costs an 8B engine's decode step, and whether a fused
kernel saves it. Each run is variant:format (bf16 or int4_wo; max_seq_len 384, as gpu.py's), in
a process of its own: "triton" (shipped: nbtrt's flash-decoding kernels, triton_attention),
"grouped" (grouped_decode_attention, the path before it: two cuBLAS GEMMs and a softmax kernel a
layer), "none" (attention skipped, the query passed through: the bound on what any kernel could
save), "flex" (torch's flex_attention, which Inductor lowers to its Triton flash-decoding
template); "triton-32" the kernel with splits of 32 slots. Decode graph replay, ms, median of 50, five times. JSON to argv[1].

    PYTHONPATH=. python benchmarks/experiments/decode_attention.py $OUT/decode_attention.json triton:int4_wo,grouped:int4_wo,none:int4_wo
"""
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu as G  # noqa: E402

import nbtrt.runtimes.torch_attention as nbtrt_torch  # noqa: E402  (decode_block reads decode_attention at call time)
from nbtrt.runtimes.torch_engine import TorchEngine  # noqa: E402

QUICK = bool(os.environ.get("QUICK"))


def flex_decode_attention(q, k, v, mask, scale):
    from torch.nn.attention.flex_attention import flex_attention

    seen = mask[:, 0, 0]  # [B, S]

    def padding(score, b, h, q_idx, kv_idx):
        return torch.where(seen[b, kv_idx], score, -float("inf"))

    return flex_attention(q, k, v, score_mod=padding, scale=scale, enable_gqa=True)


VARIANTS = {"triton": nbtrt_torch.decode_attention, "grouped": nbtrt_torch.grouped_decode_attention, "none": lambda q, k, v, mask, scale: q,
            "flex": flex_decode_attention}


def one(variant: str, fmt: str) -> dict:
    from nbtrt.kernels import triton_attention

    variant, _, block = variant.partition("-")  # "triton-32": splits of 32 slots
    triton_attention.BLOCK_S = int(block or triton_attention.BLOCK_S)
    nbtrt_torch.decode_attention = VARIANTS[variant]  # decode_block reads it at call time
    eng = TorchEngine.from_decoder(G.llama8b_random(QUICK), max_batch_size=1, max_seq_len=384,
                                               quant=None if fmt == "bf16" else fmt, compile=True)
    G.decode_step_seconds(eng, 1, 128)
    graph = eng._static[1].graph
    times = [1e3 * G.median_time(graph.replay, repeats=50, warmup=3) for _ in range(5)] if graph else []
    print(f"{variant:8s} {fmt:8s} {[round(x, 3) for x in times]}", flush=True)
    return {"replay_ms": times, "median_ms": statistics.median(times) if times else None}


def main() -> None:
    if sys.argv[1] == "--one":
        Path(sys.argv[4]).write_text(json.dumps(one(sys.argv[2], sys.argv[3])))
        return
    out = Path(sys.argv[1])
    rows = {}
    for run in sys.argv[2].split(","):
        variant, fmt = run.split(":")
        part = out.with_suffix(f".{variant}.{fmt}.json")
        done = subprocess.run([sys.executable, __file__, "--one", variant, fmt, str(part)], capture_output=True, text=True)
        print(done.stdout, end="", flush=True)
        rows[run] = json.loads(part.read_text()) if part.exists() else {"error": (done.stdout + done.stderr)[-3000:]}
        if "error" in rows[run]:
            print(run, rows[run]["error"][-1500:], flush=True)
        out.write_text(json.dumps({"device": torch.cuda.get_device_name() if G.CUDA else "cpu",
                                   "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
