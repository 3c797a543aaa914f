"""How many registers nbtrt's INT4 kernel should have. Nsight Compute on an H100: at 54 registers
9 blocks of 4 warps fit an SM, so the gate/up grid ran in 1.51 waves at 44 % achieved occupancy,
its warps stalled on their loads. Holding it to fewer registers (``__launch_bounds__(threads, 10-16)``)
was slower (its first run, in the results file); giving it more was faster. Swept here:
``__launch_bounds__(threads)`` (m0, as shipped until then) or ``(threads, 1)`` (m1, which lets the
compiler schedule for latency), loop unrolls, warps a block, plain or evict-first (cs) weight loads;
the 8B decode shapes and the lm_head in CUDA graphs as in int4_layout_probe. Prints registers,
spilled bytes, blocks an SM and microseconds a call.

    PYTHONPATH=. python benchmarks/experiments/int4_regs_probe.py [out.json]
"""
import itertools
import sys

import torch

from benchmarks.experiments.int4_gate_up_probe import CALLS, graph_us
from benchmarks.experiments.int4_layout_probe import GROUP, SHAPES, print_row, random_int4, variant_source, write_json
from benchmarks.experiments.int4_occupancy import (CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, CU_FUNC_ATTRIBUTE_NUM_REGS,
                                                   attribute, blocks_per_sm)
from nbtrt.kernels import nvrtc

SHAPES = {**SHAPES, "lm_head": (128256, 4096, 0)}
CALLS_OF = {"lm_head": 4}  # 4 distinct lm_head weights (1 GB) already leave the L2 behind


def main(out):
    source = variant_source()
    R = {"device": torch.cuda.get_device_name(), "calls_per_graph": CALLS, "rows": 1, "layout": "tile"}
    for name, (N, K, act) in SHAPES.items():
        copies = CALLS_OF.get(name, CALLS)
        words, scales = random_int4(N, K, copies)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, N // 2 if act else N, device="cuda", dtype=torch.bfloat16)
        row = {"bytes_per_call": N * K // 2 + K // GROUP * N * 2}
        for warps, unroll, minb, hint in itertools.product((4, 8, 16), (1, 2, 4, 8), (0, 1), (0, 2)):
            if K % (warps * GROUP):
                continue
            bounds = "WARPS * 32" if minb == 0 else f"WARPS * 32, {minb}"
            kernel = nvrtc.compile_kernel(source, "int4_gemv", WARPS=warps, GROUP=GROUP, UNROLL=unroll, ACT=act,
                                          LAYOUT=0, HINT=hint, BOUNDS=bounds)
            calls = itertools.cycle(zip(words, scales))

            def call():
                w, s = next(calls)
                nvrtc.launch(kernel, N // 16, warps * 32, w, s, x, y, 1, N, K)

            row[f"w{warps}_u{unroll}_m{minb}_{('plain', 'nc', 'cs')[hint]}"] = {
                "regs": attribute(kernel, CU_FUNC_ATTRIBUTE_NUM_REGS),
                "local": attribute(kernel, CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES),
                "blocks_per_sm": blocks_per_sm(kernel, warps * 32), "us": round(graph_us(call), 2)}
        best = min((v["us"], k) for k, v in row.items() if isinstance(v, dict))
        row["best"], row["best_tb_s"] = best[1], row["bytes_per_call"] / best[0] / 1e6
        print_row(name, row)
        R[name] = row
        del words, scales
        torch.cuda.empty_cache()
    write_json(R, out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
