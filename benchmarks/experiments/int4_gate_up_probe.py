"""The 8B config's INT4 MLP input, timed on the GPU in CUDA graphs (32 calls a graph, as a decode
step makes them; median of 20 replays): gate, up and the activation apart (two launches of
nbtrt's INT4 kernel and an activation) against one launch of the fused kernel, over 4 weight pairs.

    PYTHONPATH=. python benchmarks/experiments/int4_gate_up_probe.py [out.json]
"""
import json
import statistics
import sys

import torch

from nbtrt.runtimes.torch_linears import Int4GatedInput, Int4WeightOnlyLinear
from nbtrt.model import ACTIVATIONS
from nbtrt.layouts import quantize_int4

CALLS = 32


def graph_us(fn) -> float:
    """Microseconds per call of ``fn`` replayed from one graph of CALLS calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return statistics.median(times)


def main(out: str | None) -> None:
    torch.manual_seed(0)
    R = {"device": torch.cuda.get_device_name(), "calls_per_graph": CALLS}
    I, K, group = 14336, 4096, 128
    pairs = [tuple(Int4WeightOnlyLinear(*quantize_int4(torch.randn(I, K, device="cuda") * 0.02, group), group, None,
                                        torch.bfloat16) for _ in range(2)) for _ in range(4)]
    fused = [Int4GatedInput(g, u, "silu") for g, u in pairs]
    x = torch.randn(1, 1, K, device="cuda", dtype=torch.bfloat16)
    turn = iter(range(10**9))
    with torch.no_grad():
        def apart():
            g, u = pairs[next(turn) % 4]
            return ACTIVATIONS["silu"](g(x)) * u(x)
        R["gate_up_apart_us"] = graph_us(apart)
        R["gate_up_fused_us"] = graph_us(lambda: fused[next(turn) % 4](x))
        g, u = pairs[0]
        R["gate_up_rel_l2"] = ((fused[0](x).float() - ACTIVATIONS["silu"](g(x)) * u(x)).norm()
                               / (ACTIVATIONS["silu"](g(x)) * u(x)).float().norm()).item()
    print(json.dumps(R, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump(R, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
