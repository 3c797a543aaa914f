"""Experiment: why the batch-1 decode step of the same engine varies between compiles.

Each trial compiles a short llama-3.1-8b-shaped model (8B layers, fewer of them) in a fresh
process with a fresh Inductor cache, then records the decode step, the time of every kernel in
the captured graph, and Inductor's coordinate-descent log (each config it benchmarked, with the
kernel's name). Comparing trials shows which GEMV kernels change and whether their isolated
benchmark agrees with their time inside the graph.

    python benchmarks/exp_gemv_tuning.py --out $OUT --trials int8_wo,int8_wo,int8_wo
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(fmt: str, layers: int, tweak: str, out: Path) -> None:
    import contextlib
    import io

    t0 = time.perf_counter()
    import torch

    sys.path.insert(0, str(HERE))
    import gpu  # noqa: E402  (the GPU run's helpers)
    from nbtrt.backends.torch import TorchEngine, decode_weight_bytes
    from nbtrt.mapping import architecture_for
    from nbtrt.model import Decoder

    log_text = io.StringIO()
    handler = logging.StreamHandler(log_text)
    for name in ("torch._inductor.runtime.coordinate_descent_tuner", "torch._inductor.runtime.triton_heuristics"):
        lg = logging.getLogger(name)
        lg.setLevel(logging.DEBUG)
        lg.addHandler(handler)
    cfg_hf = gpu.real_config("llama-3.1-8b", False).to_dict()
    cfg_hf["num_hidden_layers"] = layers
    cfg = architecture_for(cfg_hf).config_from_hf(cfg_hf, "bfloat16")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Decoder(cfg).eval()
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    from nbtrt.backends import inductor_timing

    calls = []
    timed = inductor_timing.kernel_ms
    inductor_timing.kernel_ms = lambda fn, **kw: calls.append(1) or timed(fn, **kw)
    if tweak == "inductor":  # Inductor's own kernel timing, as before
        inductor_timing.kernel_timing = contextlib.nullcontext
    init_s = time.perf_counter() - t0
    t = time.perf_counter()
    with torch._inductor.config.patch(gpu.INDUCTOR_TWEAKS.get(tweak, {})):
        eng = TorchEngine.from_decoder(model, max_batch_size=1, max_seq_len=512, compile=True,
                                       quant=None if fmt == "bf16" else fmt, warmup=False)
        step = gpu.decode_step_seconds(eng, 1, 128, repeats=100)  # compiles prefill and decode
        compile_s = time.perf_counter() - t
        steps = [gpu.decode_step_seconds(eng, 1, 128, repeats=100) for _ in range(2)]
    prof = gpu.profile_kernels(eng._static[1].graph.replay, 10, top=40)
    lines = [ln for ln in log_text.getvalue().splitlines() if "triton_" in ln or "COORDESC" in ln]
    res = {"format": fmt, "tweak": tweak, "layers": layers, "compile_s": compile_s, "decode_step_s": step,
           "decode_step_repeats_s": steps, "weight_bytes": decode_weight_bytes(eng.model), "profile": prof,
           "coordesc_log": lines[-4000:], "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "kernel_ms_calls": len(calls), "init_s": init_s}
    out.write_text(json.dumps(res, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/exp_gemv_tuning")
    ap.add_argument("--trials", default="int8_wo,int8_wo,int8_wo")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--child", nargs=3)
    a = ap.parse_args()
    out = Path(a.out)
    if a.child:
        fmt, tweak, path = a.child
        child(fmt, a.layers, "" if tweak == "-" else tweak, Path(path))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, trial in enumerate(a.trials.split(",")):
        fmt, _, tweak = trial.partition(":")
        path = out / f"trial{i}.json"
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"/tmp/inductor-trial{i}", PYTHONUNBUFFERED="1")
        t = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--layers", str(a.layers), "--child", fmt, tweak or "-",
                            str(path)], env=env, capture_output=True, text=True)
        if r.returncode:
            print(trial, "failed:", r.stderr[-3000:], flush=True)
            continue
        res = json.loads(path.read_text())
        results.append(res)
        top = res["profile"][1:6]
        print(f"trial {i} {trial}: {res['kernel_ms_calls']} timed by kernel_ms, init {res['init_s']:.0f} s, step {res['decode_step_s'] * 1e3:.3f} ms "
              f"({', '.join(f'{s * 1e3:.3f}' for s in res['decode_step_repeats_s'])}), "
              f"compile {res['compile_s']:.0f} s, wall {time.perf_counter() - t:.0f} s")
        sys.stdout.flush()
        (out / "exp_gemv_tuning.json").write_text(json.dumps(results, indent=1))
        for row in top:
            print(f"    {row['us_per_call_total']:8.1f} us {row['calls']:3d}x {row['kernel'][:70]}", flush=True)
    (out / "exp_gemv_tuning.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
