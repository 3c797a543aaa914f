"""Experiment: where INT4's 65 ms prefill of 128 tokens goes, and what would be faster.

For one Llama-3.1-8B layer's linears (x 32 layers), at M rows: tinygemm in one call, tinygemm in
16-row chunks, a bf16 cuBLAS matmul on a weight dequantized on the fly from nbtrt's nibble
layout (compiled dequant; first run), and the shipped path (tinygemm's tiles dequantized, compiled). Writes $OUT/exp_int4_prefill.json.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nbtrt.backends.torch import Int4WeightOnlyLinear  # noqa: E402
from nbtrt.quantize.formats import quantize_int4  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
G = 128


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return sorted(ts)[len(ts) // 2]


@torch.compile(dynamic=False)
def dequant(packed, scale):
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    q = torch.stack([lo, hi], -1).view(packed.shape[0], -1)
    q = torch.where(q > 7, q - 16, q).to(torch.bfloat16)
    return (q.view(q.shape[0], -1, G) * scale.to(torch.bfloat16)[..., None]).view(q.shape[0], -1)


def main():
    torch.manual_seed(0)
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "shapes": SHAPES, "layers": 32, "rows": {}}
    mods = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, scale = quantize_int4(w, G)
        mods[name] = (Int4WeightOnlyLinear(packed, scale, G, None, torch.bfloat16), packed, scale, w)
    shipped = {name: torch.compile(mods[name][0], dynamic=True) for name in SHAPES}
    for m in (1, 16, 32, 64, 128, 256, 2048):
        row = {}
        for name, (lin, packed, scale, w) in mods.items():
            x = torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16)
            r = {"tinygemm": timed(lambda: lin(x))}
            if m > 1:  # the shipped prefill path: tinygemm's tiles dequantized, one cuBLAS matmul
                r["shipped_compiled"] = timed(lambda: shipped[name](x[None]))
            r["bf16_mm"] = timed(lambda: x @ w.t())
            row[name] = r
        totals = {k: 32 * sum(row[s][k] for s in SHAPES) for k in row["qkv"] if not k.endswith("err")}
        row["model_total_s"] = totals
        out["rows"][m] = row
        print(m, {k: f"{v * 1e3:.2f} ms" for k, v in totals.items()}, flush=True)
    Path(os.environ.get("OUT", "/tmp")).mkdir(parents=True, exist_ok=True)
    Path(os.environ.get("OUT", "/tmp"), os.environ.get("EXP_NAME", "exp_int4_prefill.json")).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
