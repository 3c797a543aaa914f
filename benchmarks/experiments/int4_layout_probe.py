"""Why nbtrt's INT4 kernel reads the 8B decode shapes at 1.5-2.2 TB/s when a copy runs at 3.0:
the order its weight words lie in memory, and the cache hint of its weight loads.

For each 8B shape (32 distinct weights, one a layer, back to back in one CUDA graph; median of 20
replays), microseconds a call of:

- ``gemv_<layout>_<hint>_w<warps>``: the kernel as shipped until this probe (2b542d6; see
  ``variant_source``), its weight pointer rewritten for the layout:
  ``tile`` (shipped: a 16-row tile's chunks contiguous) or ``chunk`` (chunk c of every tile
  contiguous, so the grid's warps sweep memory together as a copy does); ``hint`` = plain load,
  ``nc`` (``ld.global.nc``), ``cs`` (evict-first) or ``na`` (``ld.global.nc.L1::no_allocate.L2::256B``);
- ``read_<layout>_<hint>_w<warps>``: the same grid and loads with no arithmetic, the read ceiling.

The words are random: timing does not depend on the values.

    PYTHONPATH=. python benchmarks/experiments/int4_layout_probe.py [out.json]
"""
import itertools
import json
import sys

import torch

from benchmarks.experiments.int4_gate_up_probe import CALLS, graph_us
from nbtrt.kernels import cuda_int4, nvrtc

SHAPES = {"qkv": (6144, 4096, 0), "o": (4096, 4096, 0), "gate_up": (28672, 4096, 1), "down": (4096, 14336, 0)}
GROUP = 128

LOADS = r"""
#ifndef BOUNDS
#define BOUNDS WARPS * 32
#endif
__device__ __forceinline__ uint4 load_na(const uint4* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
#if HINT == 0
#define LOADW(p) (*(p))
#elif HINT == 1
#define LOADW(p) __ldg(p)
#elif HINT == 2
#define LOADW(p) __ldcs(p)
#else
#define LOADW(p) load_na(p)
#endif
#if LAYOUT == 0
#define WBASE(tile, first, chunks, tiles) (((size_t)(tile) * (chunks) + (first)) * 32)
#define WSTEP(chunks, tiles) ((size_t)32)
#else
#define WBASE(tile, first, chunks, tiles) (((size_t)(first) * (tiles) + (tile)) * 32)
#define WSTEP(chunks, tiles) ((size_t)(tiles) * 32)
#endif
"""

READ = r"""
extern "C" __global__ void __launch_bounds__(WARPS * 32)
read_only(const uint4* __restrict__ w, unsigned* __restrict__ out, int N, int K) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tile = blockIdx.x;
    const int chunks = K / 64, tiles = N / 16, per_warp = chunks / WARPS, first = warp * per_warp;
    const uint4* wp = w + WBASE(tile, first, chunks, tiles) + lane;
    const size_t step = WSTEP(chunks, tiles);
    unsigned acc = 0;
    #pragma unroll 8
    for (int c = 0; c < per_warp; ++c) {
        const uint4 q = LOADW(wp + c * step);
        acc ^= q.x ^ q.y ^ q.z ^ q.w;
    }
    if (acc == 0x9E3779B9u) out[blockIdx.x] = acc;  // keeps the loads; practically never true
}
"""


def variant_source() -> str:
    """The kernel as shipped before this probe's findings (launch bounds of the thread count alone,
    plain weight loads, ``UNROLL`` 4 passed by the caller), with the layout (``LAYOUT``), the weight
    loads' hint (``HINT``) and the bounds (``BOUNDS``) made defines, plus the read-only kernel."""
    shipped = {"const uint4* wp = w + ((size_t)tile * chunks + first) * 32 + lane;":
               "const uint4* wp = w + WBASE(tile, first, chunks, N / 16) + lane;"
               " const size_t wstep = WSTEP(chunks, N / 16);",
               "const uint4 q = LOAD_WEIGHT(wp + (c + i) * 32);": "const uint4 q = LOADW(wp + (c + i) * wstep);",
               "__launch_bounds__(WARPS * 32, 1)\nint4_gemv": "__launch_bounds__(BOUNDS)\nint4_gemv",
               "typedef unsigned short u16;": "typedef unsigned short u16;\n" + LOADS}
    source = cuda_int4.SOURCE
    for before, after in shipped.items():
        assert before in source, f"the shipped kernel changed: {before!r}"
        source = source.replace(before, after, 1)
    return source + READ


def random_int4(N: int, K: int, copies: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``copies`` random packed [N, K] weights and their scales, on the GPU."""
    words = [torch.randint(-2**31, 2**31 - 1, (N * K // 8,), dtype=torch.int32, device="cuda")
             for _ in range(copies)]
    scales = [(torch.rand(K // GROUP, N, device="cuda") / 50).bfloat16() for _ in range(copies)]
    return words, scales


def print_row(name: str, row: dict) -> None:
    print(name, json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


def write_json(R: dict, out: str | None) -> None:
    if out:
        with open(out, "w") as f:
            json.dump(R, f, indent=1)


def main(out):
    source = variant_source()
    R = {"device": torch.cuda.get_device_name(), "calls_per_graph": CALLS, "rows": 1}
    for name, (N, K, act) in SHAPES.items():
        words, scales = random_int4(N, K, CALLS)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, N // 2 if act else N, device="cuda", dtype=torch.bfloat16)
        sink = torch.zeros(N // 16, dtype=torch.int32, device="cuda")
        shipped_warps = cuda_int4.warps_for(N, K, GROUP)
        row = {"bytes_per_call": N * K // 2 + K // GROUP * N * 2, "shipped_warps": shipped_warps}
        for layout, hint, warps in itertools.product((0, 1), (0, 1, 2, 3), sorted({4, 8, 16, shipped_warps})):
            if K % (warps * GROUP):
                continue
            tag = f"{('tile', 'chunk')[layout]}_{('plain', 'nc', 'cs', 'na')[hint]}_w{warps}"
            defines = dict(WARPS=warps, GROUP=GROUP, UNROLL=4, ACT=act, LAYOUT=layout, HINT=hint)
            gemv = nvrtc.compile_kernel(source, "int4_gemv", **defines)
            read = nvrtc.compile_kernel(source, "read_only", **defines)
            calls = itertools.cycle(zip(words, scales))

            def gemv_call():
                w, s = next(calls)
                nvrtc.launch(gemv, N // 16, warps * 32, w, s, x, y, 1, N, K)

            def read_call():
                w, _ = next(calls)
                nvrtc.launch(read, N // 16, warps * 32, w, sink, N, K)

            row[f"gemv_{tag}_us"] = graph_us(gemv_call)
            row[f"read_{tag}_us"] = graph_us(read_call)
        gemv_best = min((v, k) for k, v in row.items() if k.startswith("gemv_"))
        read_best = min((v, k) for k, v in row.items() if k.startswith("read_"))
        row["shipped_us"] = row[f"gemv_tile_plain_w{shipped_warps}_us"]
        row["gemv_best"], row["read_best"] = gemv_best[1], read_best[1]
        row["shipped_tb_s"] = row["bytes_per_call"] / row["shipped_us"] / 1e6
        row["gemv_best_tb_s"] = row["bytes_per_call"] / gemv_best[0] / 1e6
        row["read_best_tb_s"] = N * K / 2 / read_best[0] / 1e6
        print_row(name, row)
        R[name] = row
        del words, scales
        torch.cuda.empty_cache()
    write_json(R, out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
