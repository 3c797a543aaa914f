#!/usr/bin/env python
"""Engine build cost and ONNX Runtime decode speed on the CPU.

    .venv/bin/python benchmarks/cpu_build.py            # -> benchmarks/results/cpu_build.json
    .venv/bin/python benchmarks/cpu_build.py --quick    # a rehearsal: fewer tokens and repeats

1. Build: ``nbtrt.build(ckpt, backend="onnxruntime")`` for both zoo models, each in its own
   process: wall time and peak resident memory (the kernel's high-water mark, ru_maxrss;
   the process's RSS after imports, before the build, is recorded beside it).
2. Decode: batch 1, a 32-token prompt, 64 new tokens (EOS ignored), on smollm2-135m-instruct:
   ``transformers`` generate (fp32, eager, dynamic cache) against the ONNX Runtime engine in
   fp32 (with and without IO binding) and on the int8 / int4 weight-only checkpoints
   (accuracy_level 1: fp32 compute, the graph's own function; 4: ONNX Runtime's int8-activation
   kernels). Measured with nbtrt.bench (warm-up, then repeats): tokens/s = 1 / median time per
   output token after the first. Both sides use the same number of compute threads (default 1:
   on a shared 2-core machine, multi-threaded runs measure the neighbours more than the model).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")
LIMITS = dict(max_batch_size=4, max_input_len=512, max_seq_len=1024)


def child_build(ckpt: str, out: str) -> None:
    """Runs in its own process so that peak memory is the build's."""
    import nbtrt

    before = _rss_bytes()
    t0 = time.perf_counter()
    nbtrt.build(ckpt, out, backend="onnxruntime", overwrite=True, **LIMITS)
    seconds = time.perf_counter() - t0
    files = {p.name: p.stat().st_size for p in sorted(Path(out).iterdir())}
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "rss_before_build_bytes": before, "files": files}))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_build(ckpt: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child-build", str(ckpt), str(out)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise RuntimeError(f"build of {ckpt} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def decode(ckpt: Path, engine_dir: Path, hf_dir: Path, work: Path, new_tokens: int, repeats: int,
           threads: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    import nbtrt
    import nbtrt.quantize as nq
    from nbtrt import bench as B

    torch.set_num_threads(threads)
    load = B.fixed(batch=1, input_len=32, output_len=new_tokens, repeats=repeats)
    runners = [lambda: B.hf_runner(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()),
               lambda: B.engine_runner(nbtrt.load(engine_dir, threads=threads), "ort", "fp32"),
               lambda: B.engine_runner(nbtrt.load(engine_dir, threads=threads, io_binding=False),
                                       "ort-no-iobinding", "fp32")]
    for fmt in ("int8_wo", "int4_wo"):
        q = nq.quantize(ckpt, work / f"ckpt-{fmt}", fmt, overwrite=True)
        edir = nbtrt.build(q, work / f"engine-{fmt}", backend="onnxruntime", overwrite=True, **LIMITS)
        for level in (1, 4):
            runners.append(lambda e=edir, f=fmt, lv=level: B.engine_runner(
                nbtrt.load(e, threads=threads, accuracy_level=lv), f"ort-accuracy{lv}", f))
    vocab = nbtrt.load(engine_dir).config.vocab_size
    results = []
    for make in runners:
        runner = make()  # one model in memory at a time
        r = B.measure(runner, load, vocab)
        r["decode_tokens_per_s"] = 1.0 / r["tpot_s"]["p50"]
        results.append(r)
        print(f"{r['runner']:>20} {r['precision']:>8}: {r['decode_tokens_per_s']:7.1f} tok/s decode, "
              f"{r['tokens_per_s']:7.1f} tok/s end to end", flush=True)
        del runner
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child-build", nargs=2, metavar=("CKPT", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="compute threads for torch and ONNX Runtime alike (1: least disturbed by other load)")
    ap.add_argument("--skip-build", action="store_true", help="reuse the engines of an earlier run")
    ap.add_argument("--work", default="work/cpu_build")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_build.json"))
    a = ap.parse_args(argv)
    if a.child_build:
        child_build(*a.child_build)
        return 0
    import nbtrt
    from nbtrt import bench as B
    from nbtrt._io import write_json

    work = Path(a.work)
    result = {"machine": {**B.machine(), "load_average_at_start": os.getloadavg()}, "limits": LIMITS, "build": {}}
    for model in MODELS if not a.skip_build else ():
        hf_dir = nbtrt.zoo.get(model)
        ckpt = work / model / "ckpt"
        if not ckpt.exists():
            nbtrt.convert(hf_dir, ckpt)
        result["build"][model] = measure_build(ckpt, work / model / "engine")
        b = result["build"][model]
        print(f"{model}: build {b['seconds']:.1f} s, peak RSS {b['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    result["machine"]["load_average_after_builds"] = os.getloadavg()
    model = MODELS[0]
    new, repeats = (16, 2) if a.quick else (64, 5)
    runs = decode(work / model / "ckpt", work / model / "engine", nbtrt.zoo.get(model), work / model, new, repeats,
                  a.threads)
    hf = next(r for r in runs if r["runner"] == "hf-eager")["decode_tokens_per_s"]
    result["decode"] = {"model": model, "batch_size": 1, "prompt_tokens": 32, "new_tokens": new, "repeats": repeats,
                        "threads": a.threads,
                        "runs": runs,
                        "speedup_vs_hf": {f"{r['runner']} {r['precision']}": r["decode_tokens_per_s"] / hf
                                          for r in runs if r["runner"] != "hf-eager"}}
    result["machine"]["load_average_at_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, result)
    print(json.dumps(result["decode"]["speedup_vs_hf"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
