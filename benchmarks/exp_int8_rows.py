"""Experiment: the INT8 weight-only linear with many rows (prefill, batched decode), 8B shapes x 32
layers: cuBLAS on a weight dequantized eagerly outside the graph (the old path) against the weight
dequantized and scaled inside the compiled graph (one fused pass), then cuBLAS."""
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nbtrt.backends.torch import Int8WeightOnlyLinear  # noqa: E402
from exp_int4_prefill import SHAPES, timed  # noqa: E402

out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "rows": {}}
mods = {}
for name, (n, k) in SHAPES.items():
    w = torch.randn(n, k, device="cuda") * 0.02
    s = w.abs().amax(1) / 127
    q = (w / s[:, None]).round().clamp(-127, 127).to(torch.int8)
    lin = Int8WeightOnlyLinear(q, s, None, torch.bfloat16)
    mods[name] = (lin, torch.compile(lin, dynamic=True))
with torch.no_grad():
    for m in (8, 128, 2048):
        row = {}
        for name, (lin, compiled) in mods.items():
            x = torch.randn(1, m, lin.weight.shape[1], device="cuda", dtype=torch.bfloat16)
            old = lambda: torch.mm(x[0], lin.weight.to(x.dtype).t()) * lin.scale  # noqa: E731
            row[name] = {"old_eager_dequant": timed(old), "in_graph": timed(lambda: compiled(x))}
            ref = old().float()
            row[name]["rel_diff"] = ((compiled(x)[0].float() - ref).norm() / ref.norm()).item()
        row["model_total_s"] = {k: 32 * sum(row[s][k] for s in SHAPES) for k in ("old_eager_dequant", "in_graph")}
        out["rows"][m] = row
        print(m, {k: f"{v * 1e3:.2f} ms" for k, v in row["model_total_s"].items()},
              max(row[s]["rel_diff"] for s in SHAPES), flush=True)
Path(os.environ.get("OUT", "/tmp"), "exp_int8_rows.json").write_text(json.dumps(out, indent=1))
