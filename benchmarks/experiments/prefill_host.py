# Pins private parts of nbtrt (may break when they change): runtimes.torch_engine._LIMIT_KEY; TorchEngine._prefill_fns, _kv.
"""Where the 8B config's 128-token prefill (the first token's time) goes, GPU (bf16, INT8, INT4
weight-only engines over the same random weights): its host-clock time, the GPU's time from the
first kernel to the last (CUDA events) and the kernels' own time (profiler), and the host time of
the engine's pieces (prelude, each layer's compiled block, head); each format also with the
prefill compiled by Inductor's C++ wrapper (``cpp_wrapper``) in place of its Python one.

    PYTHONPATH=. python benchmarks/experiments/prefill_host.py [out.json]
"""
import json
import statistics
import sys
import time

import torch

from benchmarks.gpu import DEV, free, llama8b_random, profile_kernels, shared_copy, sync
from nbtrt.runtimes.torch_engine import _LIMIT_KEY, DYNAMO_RECOMPILE_LIMIT, TorchEngine

PROMPT, CALLS = 128, 7
VARIANTS = [(None, {}), (None, {"cpp_wrapper": True}), ("int4_wo", {}), ("int4_wo", {"cpp_wrapper": True}),
            ("int8_wo", {}), ("int8_wo", {"cpp_wrapper": True})]


def host_profile(fn) -> list[dict]:
    """The host's ops in one call of ``fn``, by self time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    rows = [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r["self_cpu_ms"])[:25]


def host_and_gpu_ms(fn, calls: int) -> tuple[list[float], list[float]]:
    """Milliseconds of each of ``calls`` calls of ``fn``, synchronised: by the host's clock, and
    the GPU's span (CUDA events around it)."""
    host, gpu = [], []
    for _ in range(calls):
        sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter()
        start.record()
        fn()
        end.record()
        sync()
        host.append((time.perf_counter() - t) * 1e3)
        gpu.append(start.elapsed_time(end))
    return host, gpu


def piece_host_ms(eng, ids) -> dict[str, list[float]]:
    """Host milliseconds of each prefill piece (prelude, every layer's block, head) over 3 prefills:
    a piece returns once its kernels are queued."""
    prelude, block, head = eng._prefill_fns
    pieces = {"prelude": [], "block": [], "head": []}

    def timed(piece, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        pieces[piece].append((time.perf_counter() - t) * 1e3)
        return out

    with torch.inference_mode(), torch._dynamo.config.patch(**{_LIMIT_KEY: DYNAMO_RECOMPILE_LIMIT}):
        # made here: tensors from outside inference mode would compile the pieces again
        position, mask = torch.arange(0, PROMPT, device=DEV), torch.ones_like(ids)
        for _ in range(3):
            eng.begin(1)
            sync()
            x, rope, am = timed("prelude", prelude, eng.model, ids, mask, position, True)
            for layer, (k, v) in zip(eng.model.layers, eng._kv):
                x = timed("block", block, layer, x, rope, am, k, v, position)
            timed("head", head, eng.model, x)
            sync()
    return pieces


def main(out):
    R = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "prompt": PROMPT}
    model = llama8b_random(quick=False)
    ids = torch.randint(0, model.cfg.vocab_size, (1, PROMPT), device=DEV)
    for quant, options in VARIANTS:
        name = (quant or "bf16") + ("+" + "+".join(options) if options else "")
        m = model if quant is None else shared_copy(model)
        eng = TorchEngine.from_decoder(m, max_batch_size=1, max_seq_len=PROMPT + 256, compile=True, quant=quant,
                                       warmup=False)
        if options:  # the engine's prefill pieces compiled with other Inductor options
            eng._prefill_fns = tuple(torch.compile(f._torchdynamo_orig_callable, dynamic=True, fullgraph=True,
                                                   options=options) for f in eng._prefill_fns)
        t = time.perf_counter()
        eng.warmup()
        compile_s = time.perf_counter() - t

        def prefill():
            eng.begin(1)
            return eng.step(ids, torch.ones_like(ids))

        host, gpu = host_and_gpu_ms(prefill, CALLS)
        pieces = piece_host_ms(eng, ids)
        prof = profile_kernels(prefill, 1, top=8)
        cpu = host_profile(prefill)
        row = {"compile_s": compile_s, "host_top_ops": cpu, "host_ms": host, "gpu_ms": gpu,
               "host_ms_median": statistics.median(host), "gpu_ms_median": statistics.median(gpu),
               "kernels_ms": prof[0]["total_us"] / 1e3, "kernel_count": prof[0]["kernels"], "top_kernels": prof[1:],
               "piece_host_ms_median": {k: statistics.median(v) for k, v in pieces.items()},
               "block_host_ms_sum": sum(pieces["block"]) / 3}
        print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                     if k not in ("top_kernels", "host_ms", "gpu_ms", "host_top_ops")}, flush=True)
        print("   host:", [(o["op"][:50], round(o["self_cpu_ms"], 2), o["calls"]) for o in cpu[:12]], flush=True)
        R[name] = row
        del eng, m
        free()
    if out:
        json.dump(R, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
