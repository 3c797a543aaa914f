# Pins private parts of nbtrt (may break when they change): kernels.cuda_int8._compiled.
"""nbtrt's INT8 kernel against Inductor's fused one-row GEMV (what INT8 decode ran before it) on
the 8B decode shapes and the lm_head, in CUDA graphs as in int4_layout_probe (rotating over
distinct weights so the L2 holds none): microseconds a call and GB/s for 1 row, the kernel's warps
and unroll swept, and 8 rows on the shipped choice; each result checked against the eager module.
Inductor here compiles the GEMV alone, untuned by the engine's kernel timing and unfused with the
norm before it; in the engine's decode step its one-row GEMVs ran faster than these figures.

    PYTHONPATH=. python benchmarks/experiments/int8_gemv_probe.py [out.json]
"""
import itertools
import sys

import torch
import torch.nn.functional as F

from benchmarks.experiments.int4_gate_up_probe import CALLS, graph_us
from benchmarks.experiments.int4_layout_probe import print_row, write_json
from benchmarks.experiments.int4_regs_probe import CALLS_OF, SHAPES
from nbtrt.kernels import cuda_int8, nvrtc
from nbtrt.model import ACTIVATIONS


def eager(x, weight, scale):
    return F.linear(x, weight.to(x.dtype)) * scale


def eager_gated(x, gate, gate_scale, up, up_scale):
    return ACTIVATIONS["silu"](eager(x, gate, gate_scale)) * eager(x, up, up_scale)


def rel_l2(want: torch.Tensor, got: torch.Tensor) -> float:
    return ((want.float() - got.float()).norm() / want.float().norm()).item()


def main(out):
    torch.manual_seed(0)
    R = {"device": torch.cuda.get_device_name(), "calls_per_graph": CALLS}
    options = {"coordinate_descent_tuning": True}
    for name, (N, K, act) in SHAPES.items():
        N = N // 2 if act else N  # gate_up: two [N / 2, K] weights
        copies = CALLS_OF.get(name, CALLS)
        weights = [[torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda"),
                    (torch.rand(N, device="cuda") / 100).bfloat16()] * (2 if act else 1) for _ in range(copies)]
        if act:
            for w in weights:
                w[2] = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
        row = {"bytes_per_call": N * K * (2 if act else 1), "rows": 1}
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        reference = eager_gated if act else eager
        want = reference(x, *weights[0])
        compiled = torch.compile(reference, fullgraph=True, options=options)
        turn = itertools.cycle(weights)
        row["inductor_us"] = graph_us(lambda: compiled(x, *next(turn)))
        row["inductor_rel_l2"] = rel_l2(want, compiled(x, *weights[0]))
        for warps, unroll in itertools.product((4, 8, 16), (1, 2, 4)):
            if K % (warps * cuda_int8.CHUNK):
                continue
            kernel = cuda_int8._compiled(warps, act, unroll=unroll, dependent=False)
            tiles = N // 8 if act else N // 16
            y = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)

            def call(kernel=kernel, y=y, warps=warps, tiles=tiles):
                w = next(turn)
                lo, hi, s_lo, s_hi = (w[0], w[2], w[1], w[3]) if act else (w[0], w[0][8:], w[1], w[1][8:])
                nvrtc.launch(kernel, tiles, warps * 32, lo, hi, s_lo, s_hi, x, y, 1, N, K)

            row[f"w{warps}_u{unroll}_us"] = graph_us(call)
            turn = itertools.cycle(weights)
            call()  # on weights[0]
            row[f"w{warps}_u{unroll}_rel_l2"] = rel_l2(want, y)
        ops = (lambda x, w: torch.ops.nbtrt.int8_gated_mm(x, *w, "silu")) if act else \
            (lambda x, w: torch.ops.nbtrt.int8_mm(x, *w))
        for rows in (1, 8):
            xs = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
            row[f"shipped_M{rows}_us"] = graph_us(lambda: ops(xs, next(turn)))
            row[f"shipped_M{rows}_rel_l2"] = rel_l2(reference(xs, *weights[0]), ops(xs, weights[0]))
        best = min(v for k, v in row.items() if k.endswith("_us") and k.startswith("w"))
        row["best_GBps"] = row["bytes_per_call"] / best / 1e3
        row["inductor_GBps"] = row["bytes_per_call"] / row["inductor_us"] / 1e3
        print_row(name, row)
        R[name] = row
        del weights
        torch.cuda.empty_cache()
    write_json(R, out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
