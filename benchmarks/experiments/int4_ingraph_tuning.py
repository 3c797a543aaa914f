# Pins private parts of nbtrt (may break when they change): kernels.cuda_int4._compiled.
"""nbtrt's INT4 kernel on the 8B config's decode shapes as a step runs them: for each shape, 32
distinct weights (one a layer) multiplied back to back inside one CUDA graph, for every warps-a-block
and loop-unroll choice; microseconds a call (median of 20 replays), the shipped choice marked.

    PYTHONPATH=. python benchmarks/experiments/int4_ingraph_tuning.py [out.json]
"""
import itertools
import json
import sys

import torch

from benchmarks.experiments.int4_gate_up_probe import CALLS, graph_us
from nbtrt.kernels import cuda_int4, nvrtc

SHAPES = {"qkv": (6144, 4096, 0), "o": (4096, 4096, 0), "gate_up": (28672, 4096, 1), "down": (4096, 14336, 0)}
LAYERS, GROUP = CALLS, 128  # a graph of CALLS calls takes each layer's weight once


def main(out):
    R = {"device": torch.cuda.get_device_name(), "layers": LAYERS}
    for name, (N, K, act) in SHAPES.items():
        words = [torch.randint(-2**31, 2**31 - 1, (N * K // 8,), dtype=torch.int32, device="cuda") for _ in range(LAYERS)]
        scales = [(torch.rand(K // GROUP, N, device="cuda") / 50).bfloat16() for _ in range(LAYERS)]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, N // 2 if act else N, device="cuda", dtype=torch.bfloat16)
        shipped = cuda_int4.warps_for(N, K, GROUP), cuda_int4.UNROLL
        row = {"bytes_per_call": N * K // 2 + K // GROUP * N * 2, "shipped": list(shipped)}
        for warps in cuda_int4.WARP_CHOICES:
            if K % (warps * GROUP):
                continue
            for unroll in (1, 2, 4, 8):
                kernel = cuda_int4._compiled(warps, GROUP, unroll, act=act)
                launches = [lambda w=w, s=s: nvrtc.launch(kernel, N // 16, warps * 32, w, s, x, y, 1, N, K)
                            for w, s in zip(words, scales)]
                turn = itertools.cycle(launches)
                row[f"w{warps}_u{unroll}_us"] = graph_us(lambda: next(turn)())
        best = min((v, k) for k, v in row.items() if k.endswith("_us"))
        row["best"] = best[1]
        row["shipped_us"] = row[f"w{shipped[0]}_u{shipped[1]}_us"]
        row["best_tb_s"] = row["bytes_per_call"] / best[0] / 1e6
        row["shipped_tb_s"] = row["bytes_per_call"] / row["shipped_us"] / 1e6
        print(name, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        R[name] = row
        del words, scales
    if out:
        json.dump(R, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
