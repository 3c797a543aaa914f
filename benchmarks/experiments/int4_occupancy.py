# Pins private parts of nbtrt (may break when they change): kernels.nvrtc._libcuda.
"""Registers, occupancy and (under Nsight Compute) stall reasons of nbtrt's INT4 kernel against the
read-only kernel of int4_layout_probe on the 8B gate/up and down shapes: each launched eagerly
three times on distinct weights.

    PYTHONPATH=. python benchmarks/experiments/int4_occupancy.py
    ncu --section LaunchStats --section Occupancy --section WarpStateStats -k regex:"int4_gemv|read_only" \
        python benchmarks/experiments/int4_occupancy.py
"""
import ctypes

import torch

from benchmarks.experiments.int4_layout_probe import GROUP, SHAPES, variant_source
from nbtrt.kernels import cuda_int4, nvrtc

CU_FUNC_ATTRIBUTE_NUM_REGS, CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES = 4, 3


def attribute(kernel, which: int) -> int:
    value = ctypes.c_int()
    nvrtc._libcuda().cuFuncGetAttribute(ctypes.byref(value), which, kernel.func)
    return value.value


def blocks_per_sm(kernel, threads: int) -> int:
    value = ctypes.c_int()
    nvrtc._libcuda().cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(value), kernel.func, threads, 0)
    return value.value


def main():
    source = variant_source()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name in ("gate_up", "down", "qkv"):
        N, K, act = SHAPES[name]
        warps = cuda_int4.warps_for(N, K, GROUP)
        defines = dict(WARPS=warps, GROUP=GROUP, UNROLL=4, ACT=act, LAYOUT=0, HINT=0)  # as shipped before
        words = [torch.randint(-2**31, 2**31 - 1, (N * K // 8,), dtype=torch.int32, device="cuda") for _ in range(3)]
        scales = (torch.rand(K // GROUP, N, device="cuda") / 50).bfloat16()
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, N // 2 if act else N, device="cuda", dtype=torch.bfloat16)
        sink = torch.zeros(N // 16, dtype=torch.int32, device="cuda")
        for kname in ("int4_gemv", "read_only"):
            kernel = nvrtc.compile_kernel(source, kname, **defines)
            per_sm = blocks_per_sm(kernel, warps * 32)
            print(f"{name} {kname} warps={warps} regs={attribute(kernel, CU_FUNC_ATTRIBUTE_NUM_REGS)} "
                  f"local={attribute(kernel, CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)} blocks/SM={per_sm} "
                  f"grid={N // 16} waves={N // 16 / (per_sm * sms):.2f}", flush=True)
            for w in words:
                if kname == "int4_gemv":
                    nvrtc.launch(kernel, N // 16, warps * 32, w, scales, x, y, 1, N, K)
                else:
                    nvrtc.launch(kernel, N // 16, warps * 32, w, sink, N, K)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
