# Pins private parts of nbtrt (may break when they change): runtimes.torch_linears._pack_for_tinygemm, kernels.cuda_int4._compiled.
"""Probe (GPU): the NVRTC INT4 kernel (nbtrt.kernels.cuda_int4) against tinygemm on the 8B shapes:
correctness against the dequantized weight, then kernel time (kernel_ms) per variant.

    PYTHONPATH=. python benchmarks/experiments/int4_gemv_probe.py $OUT
"""
import json, os, sys, time, traceback
import torch
from nbtrt.kernels import cuda_int4 as ci
from nbtrt.kernels.inductor_timing import kernel_ms
from nbtrt.runtimes.torch_linears import _pack_for_tinygemm

out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "shapes": {}}
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate": (14336, 4096), "up": (14336, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}
G = 128
torch.manual_seed(0)
for name, (N, K) in SHAPES.items():
    u = torch.randint(0, 16, (N, K), device="cuda", dtype=torch.int32)
    s = (torch.rand(N, K // G, device="cuda") * 0.02 + 0.001).to(torch.bfloat16)
    words = ci.pack(u)
    assert torch.equal(ci.unpack(words, N, K), u), "pack/unpack"
    st = s.t().contiguous()
    w = ((u - 8).float() * s.float().repeat_interleave(G, 1)).to(torch.bfloat16)
    rec = {}
    for M in (1, 2, 8):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w.float().t()
        try:
            y = torch.ops.nbtrt.int4_mm(x, words, st, G)
            torch.cuda.synchronize()
            rec[f"rel_l2_M{M}"] = ((y.float() - ref).norm() / ref.norm()).item()
        except Exception as e:
            rec[f"error_M{M}"] = repr(e)[:500]; traceback.print_exc()
    tiny = _pack_for_tinygemm(u, 8)
    sz = torch.stack([s.float(), torch.zeros_like(s, dtype=torch.float32)], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    x1 = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    rec["tinygemm_us"] = 1000 * kernel_ms(lambda: torch.ops.aten._weight_int4pack_mm(x1, tiny, G, sz))
    y1 = x1.new_empty(1, N)
    for warps in (16, 8, 4, 2):
        if K % (warps * G):
            continue
        for unroll in (2, 4, 8):
            kern = ci._compiled(warps, G, unroll)
            launch = lambda: kern(grid=(N // 16, 1, 1), block=(warps * 32, 1, 1), args=[words, st, x1, y1, 1, N, K])
            rec[f"w{warps}_u{unroll}_us"] = 1000 * kernel_ms(launch)
    rec["chosen_warps"] = ci.warps_for(N, K, G)
    rec["op_us"] = 1000 * kernel_ms(lambda: torch.ops.nbtrt.int4_mm(x1, words, st, G))
    x8 = torch.randn(8, K, device="cuda", dtype=torch.bfloat16)
    rec["op_M8_us"] = 1000 * kernel_ms(lambda: torch.ops.nbtrt.int4_mm(x8, words, st, G))
    rec["tinygemm_M8_us"] = 1000 * kernel_ms(lambda: torch.ops.aten._weight_int4pack_mm(x8, tiny, G, sz))
    rec["bytes"] = N * K // 2 + N * K // G * 2
    out["shapes"][name] = rec
    print(name, json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
    del u, w, words, tiny
# per-step totals (32 layers): tinygemm vs best variant per shape
step = {"tinygemm": 0.0, "best": 0.0, "op": 0.0}
for name, rec in out["shapes"].items():
    mult = 32 if name != "lm_head" else 1
    step["tinygemm"] += mult * rec["tinygemm_us"]
    step["best"] += mult * min(v for k, v in rec.items() if k.startswith("w") and k.endswith("_us"))
    step["op"] += mult * rec["op_us"]
out["step_us"] = step
print("STEP", step)
# CUDA graph capture of the kernel
x1 = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
u = torch.randint(0, 16, (4096, 4096), device="cuda", dtype=torch.int32); words = ci.pack(u)
st = torch.full((32, 4096), 0.01, device="cuda", dtype=torch.bfloat16)
try:
    yy = torch.ops.nbtrt.int4_mm(x1, words, st, G)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = torch.ops.nbtrt.int4_mm(x1, words, st, G)
    g.replay(); torch.cuda.synchronize()
    out["graph_replay_equal"] = bool(torch.equal(yg, yy))
except Exception as e:
    out["graph_error"] = repr(e)[:500]; traceback.print_exc()
print("GRAPH", out.get("graph_replay_equal"), out.get("graph_error"))
json.dump(out, open(os.path.join(sys.argv[1], "int4_gemv_probe.json"), "w"), indent=1)
