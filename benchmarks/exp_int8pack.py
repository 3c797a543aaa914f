"""Experiment: does aten._weight_int8pack_mm run on CUDA here, and how fast at 1 and 8 rows (8B shapes x 32)?"""
import json
import os
import time
from pathlib import Path

import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


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


out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": {}}
try:
    for m in (1, 8):
        tot = {"int8pack": 0.0, "dequant_mm": 0.0}
        for n, k in SHAPES.values():
            w = torch.randint(-127, 127, (n, k), device="cuda", dtype=torch.int8)
            s = torch.rand(n, device="cuda", dtype=torch.bfloat16) / 100
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            got = torch.ops.aten._weight_int8pack_mm(x, w, s)
            ref = x @ (w.to(x.dtype) * s[:, None]).t()
            out.setdefault("rel", []).append(((got.float() - ref.float()).norm() / ref.float().norm()).item())
            tot["int8pack"] += 32 * timed(lambda: torch.ops.aten._weight_int8pack_mm(x, w, s))
            tot["dequant_mm"] += 32 * timed(lambda: x @ (w.to(x.dtype) * s[:, None]).t())
        out["rows"][m] = tot
        print(m, {k: f"{v * 1e3:.2f} ms" for k, v in tot.items()}, flush=True)
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"[:500]
    print(out["error"])
Path(os.environ.get("OUT", "/tmp"), "exp_int8pack.json").write_text(json.dumps(out, indent=1))
