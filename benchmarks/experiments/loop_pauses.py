# Pins private parts of nbtrt (may break when they change): TorchEngine._decode, _static, _pool; generate._copy_to_host.
"""Experiment (GPU): why an 8B engine decoded slower after other engines in the same process. The
8B config (batch 1, 128-token prompt, 256 new tokens, as gpu.py); engines are built in the order
given, each measured through ``generate_tokens`` three times with Python's cycle collector as it
is and three times with it off (every collection inside a timed loop is recorded), once more with
the host's time per decode call and per wait for a token and CUDA events around each decode call
(``where_host_goes``), and by its decode graph replayed back to back. "churn" in the list allocates
and frees what an INT8 engine's weights take, with no engine. Options (environment): RESET=1,
dynamo reset before each engine; RECAPTURE=1, each engine's decode graph captured again and
measured again; RECAPTURE=relocate, its large tensors moved to fresh device memory first;
QUICK=1, a shrunk config to try the script on a CPU. JSON to argv[1]/loop_pauses_<formats>.json.

    python benchmarks/experiments/loop_pauses.py $OUT bf16,int8_wo,int4_wo
"""
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu as G  # noqa: E402

from nbtrt.runtimes.torch_engine import TorchEngine  # noqa: E402
from nbtrt.generate import SamplingParams, generate_tokens  # noqa: E402

QUICK = bool(os.environ.get("QUICK"))  # a shrunk config and short loop, to try the script on a CPU
PROMPT, NEW, REPEATS = (16, 8, 1) if QUICK else (128, 256, 3)
FORMATS = sys.argv[2].split(",") if len(sys.argv) > 2 else ["bf16", "int8_wo", "int4_wo"]

collections: list[list] = []  # [generation, start, seconds] of each collection while recording
recording = False


def on_gc(phase, info):
    if not recording:
        return
    if phase == "start":
        collections.append([info["generation"], time.perf_counter(), None])
    elif collections and collections[-1][2] is None:
        collections[-1][2] = time.perf_counter() - collections[-1][1]


def one_loop(engine, prompt, collector_on: bool) -> dict:
    global recording
    params = SamplingParams(max_new_tokens=NEW, stop_token_ids=())
    G.sync()
    collections.clear()
    was = gc.isenabled()
    if not collector_on:
        gc.disable()
    recording = True
    t0 = time.perf_counter()
    ticks = [time.perf_counter() for _ in generate_tokens(engine, [prompt], params)]
    recording = False
    if was:
        gc.enable()
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    return {"ttft_ms": (ticks[0] - t0) * 1e3, "tpot_ms": (ticks[-1] - ticks[0]) / (NEW - 1) * 1e3,
            "gap_median_ms": statistics.median(gaps) * 1e3, "gap_max_ms": max(gaps) * 1e3,
            "collections": [(g, round((s or 0.0) * 1e3, 3)) for g, _, s in collections]}


def where_host_goes(engine, prompt) -> dict:
    """One loop, collector off, with the host's time in each decode call and in each wait for a
    token timed, and CUDA events around each decode call: whether the device waits for the host."""
    import nbtrt.generate as gen

    waits, decode_host, events = [], [], []
    copy_to_host, decode = gen._copy_to_host, engine._decode

    def timed_copy(token):
        wait = copy_to_host(token)

        def timed_wait():
            t = time.perf_counter()
            out = wait()
            waits.append(time.perf_counter() - t)
            return out
        return timed_wait

    def timed_decode(ids, mask):
        t = time.perf_counter()
        if not G.CUDA:
            out = decode(ids, mask)
            decode_host.append(time.perf_counter() - t)
            return out
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = decode(ids, mask)
        b.record()
        decode_host.append(time.perf_counter() - t)
        events.append((a, b))
        return out

    gen._copy_to_host, engine._decode = timed_copy, timed_decode
    try:
        row = one_loop(engine, prompt, False)
    finally:
        gen._copy_to_host = copy_to_host
        del engine._decode
    G.sync()
    ms = lambda xs: round(statistics.median(xs) * 1e3, 4)  # noqa: E731
    row.update(wait_ms_median=ms(waits), decode_host_ms_median=ms(decode_host))
    if not G.CUDA:
        return row
    inside = [a.elapsed_time(b) for a, b in events]
    between = [b.elapsed_time(a2) for (_, b), (a2, _) in zip(events, events[1:])]
    row.update(device_decode_ms_median=round(statistics.median(inside), 4),
               device_between_decodes_ms_median=round(statistics.median(between), 4))
    return row


def relocate(engine) -> None:
    """Every large tensor of the engine's model to the host and back, the device copies freed
    first: the weights in fresh device memory, allocated one after another."""
    big = {}
    for mod in engine.model.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is not None and t.is_cuda and t.numel() > 1 << 20:
                    big.setdefault(id(t), [t.detach().cpu(), []])[1].append((store, name))
    for host, places in big.values():
        for store, name in places:
            if isinstance(store[name], torch.nn.Parameter):
                store[name].data = torch.empty(0, dtype=host.dtype, device="cuda")
            else:
                store[name] = None
    G.free()
    for host, places in big.values():
        dev = host.cuda()
        for store, name in places:
            if isinstance(store[name], torch.nn.Parameter):
                store[name].data = dev
            else:
                store[name] = dev


def queued_replays_ms(engine, replays: int = 50) -> float:
    """Device milliseconds per decode-graph replay, ``replays`` of them queued back to back."""
    if not G.CUDA:
        return float("nan")
    graph = engine._static[1].graph
    for _ in range(3):
        graph.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(replays):
        graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / replays


def main():
    gc.callbacks.append(on_gc)
    model = G.llama8b_random(QUICK)
    prompt = torch.randint(0, model.cfg.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    # a format given again: that engine's row is "<fmt>#<engines before it>"
    out = {"device": torch.cuda.get_device_name() if G.CUDA else "cpu", "date": time.strftime("%Y-%m-%d"),
           "python": sys.version.split()[0], "gc_threshold": gc.get_threshold(), "order": FORMATS, "engines": {}}
    for fmt in FORMATS:
        if fmt == "churn":  # what an INT8 engine leaves in device memory, without the engine
            churn = [torch.empty_like(lin.weight, dtype=torch.int8) for lin in model.modules()
                     if isinstance(lin, torch.nn.Linear)]
            print("churn", sum(t.numel() for t in churn) / 1e9, "GB", flush=True)
            del churn
            G.free()
            continue
        if os.environ.get("RESET"):  # each engine compiled as if first in the process (Inductor's disk cache stays)
            torch._dynamo.reset()
        m = model if fmt == "bf16" else G.shared_copy(model)
        eng = TorchEngine.from_decoder(m, max_batch_size=1, max_seq_len=PROMPT + NEW, compile=True,
                                       quant=None if fmt == "bf16" else fmt)
        one_loop(eng, prompt, True)  # warm-up: the loop's first decode captures the graph
        row = {"tracked_objects": len(gc.get_objects()), "gc_counts_before": gc.get_count()}
        row["loops_began"] = time.strftime("%H:%M:%S")  # to line up with a clock log (nvidia-smi -lms)
        row["collector_on"] = [one_loop(eng, prompt, True) for _ in range(REPEATS)]
        row["collector_off"] = [one_loop(eng, prompt, False) for _ in range(REPEATS)]
        row["where_host_goes"] = where_host_goes(eng, prompt)
        row["queued_replays_ms"] = queued_replays_ms(eng)
        if os.environ.get("RECAPTURE"):  # the same engine, its decode graph captured again (new pool)
            eng._static, eng._pool = {}, None
            if os.environ.get("RECAPTURE") == "relocate":
                relocate(eng)
            G.free()
            one_loop(eng, prompt, True)
            row["recaptured"] = {"loops": [one_loop(eng, prompt, True) for _ in range(REPEATS)],
                                 "queued_replays_ms": queued_replays_ms(eng)}
        print(fmt, {k: v for k, v in row["where_host_goes"].items() if k != "collections"}, flush=True)
        t = time.perf_counter()
        gc.collect()
        row["full_collection_ms"] = (time.perf_counter() - t) * 1e3
        out["engines"][fmt if fmt not in out["engines"] else f"{fmt}#{len(out['engines'])}"] = row
        for key in ("collector_on", "collector_off"):
            runs = row[key]
            print(fmt, key, "tpot", [round(r["tpot_ms"], 3) for r in runs],
                  "ttft", [round(r["ttft_ms"], 1) for r in runs], "gap_max", [round(r["gap_max_ms"], 1) for r in runs],
                  "gen2", [[s for g, s in r["collections"] if g == 2] for r in runs], flush=True)
        print(fmt, "objects", row["tracked_objects"], "full collection ms", round(row["full_collection_ms"], 1),
              flush=True)
        del eng, m
        G.free()
    name = "_".join(FORMATS)
    (Path(sys.argv[1]) / f"loop_pauses_{name}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
