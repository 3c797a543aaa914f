# Pins private parts of nbtrt (may break when they change): kernels.cuda_int4._compiled.
"""Probe (GPU): host time per launch of the INT4 kernel, through torch.cuda's kernel wrapper,
through nvrtc.launch (nbtrt's launcher), and as the custom op; printed.

    PYTHONPATH=. python benchmarks/experiments/int4_launch_probe.py
"""
import time, torch
from nbtrt.kernels import cuda_int4 as ci, nvrtc
u = torch.randint(0, 16, (4096, 4096), device="cuda", dtype=torch.int32); w = ci.pack(u)
st = torch.full((32, 4096), 0.01, device="cuda", dtype=torch.bfloat16); x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
k = ci._compiled(ci.warps_for(4096, 4096, 128), 128); y = x.new_empty(1, 4096)
def host_us(fn, n=2000):
    fn(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    d = time.perf_counter() - t; torch.cuda.synchronize(); return 1e6 * d / n
print("torch _CudaKernel call us", host_us(lambda: k(grid=(256, 1, 1), block=(512, 1, 1), args=[w, st, x, y, 1, 4096, 4096])))
print("nbtrt launch us", host_us(lambda: nvrtc.launch(k, 256, 512, w, st, x, y, 1, 4096, 4096)))
print("int4_mm op us", host_us(lambda: torch.ops.nbtrt.int4_mm(x, w, st, 128)))
print("equal", torch.equal(torch.ops.nbtrt.int4_mm(x, w, st, 128), (k(grid=(256,1,1), block=(512,1,1), args=[w, st, x, y, 1, 4096, 4096]), y)[1]))
