"""Experiment: the compiled INT4 prefill linear's kernels (profile + Inductor's code)."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nbtrt.backends.torch import Int4WeightOnlyLinear  # noqa: E402
from nbtrt.quantize.formats import quantize_int4  # noqa: E402

torch.manual_seed(0)
w = torch.randn(14336, 4096, device="cuda") * 0.02
packed, scale = quantize_int4(w, 128)
lin = Int4WeightOnlyLinear(packed, scale, 128, None, torch.bfloat16)
f = torch.compile(lin, dynamic=True)
x = torch.randn(1, 128, 4096, device="cuda", dtype=torch.bfloat16)
with torch.no_grad():
    f(x)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            f(x)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=70))
