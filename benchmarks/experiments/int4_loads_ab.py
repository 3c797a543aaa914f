# Pins private parts of nbtrt (may break when they change): kernels.cuda_int4._compiled.
"""nbtrt's INT4 kernel before and after int4_regs_probe's findings (launch bounds of one block an
SM, evict-first weight loads, no unroll of the group loop) on the 8B decode shapes and the lm_head,
1 and 8 rows, in CUDA graphs as in int4_layout_probe: microseconds a call, registers, and whether
the two write the same bits. "After" is the shipped kernel, launched plainly (since the decode's
dependent launches it also holds their no-op-when-plain ``griddepcontrol`` and L2 prefetch).

    PYTHONPATH=. python benchmarks/experiments/int4_loads_ab.py [out.json]
"""
import itertools
import sys

import torch

from benchmarks.experiments.int4_gate_up_probe import CALLS, graph_us
from benchmarks.experiments.int4_layout_probe import GROUP, print_row, random_int4, variant_source, write_json
from benchmarks.experiments.int4_occupancy import CU_FUNC_ATTRIBUTE_NUM_REGS, attribute
from benchmarks.experiments.int4_regs_probe import CALLS_OF, SHAPES
from nbtrt.kernels import cuda_int4, nvrtc


def main(out):
    before_source = variant_source()
    R = {"device": torch.cuda.get_device_name(), "calls_per_graph": CALLS}
    for name, (N, K, act) in SHAPES.items():
        copies = CALLS_OF.get(name, CALLS)
        words, scales = random_int4(N, K, copies)
        warps = cuda_int4.warps_for(N, K, GROUP)
        kernels = {"before": nvrtc.compile_kernel(before_source, "int4_gemv", WARPS=warps, GROUP=GROUP, UNROLL=4,
                                                  ACT=act, LAYOUT=0, HINT=0),
                   "after": cuda_int4._compiled(warps, GROUP, act=act)}
        row = {"bytes_per_call": N * K // 2 + K // GROUP * N * 2, "warps": warps,
               **{f"{k}_regs": attribute(v, CU_FUNC_ATTRIBUTE_NUM_REGS) for k, v in kernels.items()}}
        for rows in (1, 8):
            x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
            ys = {k: torch.empty(rows, N // 2 if act else N, device="cuda", dtype=torch.bfloat16) for k in kernels}
            for tag, kernel in kernels.items():
                nvrtc.launch(kernel, N // 16, warps * 32, words[0], scales[0], x, ys[tag], rows, N, K)
                calls = itertools.cycle(zip(words, scales))

                def call(kernel=kernel, y=ys[tag]):
                    w, s = next(calls)
                    nvrtc.launch(kernel, N // 16, warps * 32, w, s, x, y, rows, N, K)

                row[f"{tag}_M{rows}_us"] = graph_us(call)
            row[f"same_bits_M{rows}"] = bool(torch.equal(ys["before"], ys["after"]))
        print_row(name, row)
        R[name] = row
        del words, scales
        torch.cuda.empty_cache()
    write_json(R, out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
