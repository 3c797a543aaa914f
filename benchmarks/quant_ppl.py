"""Held-out perplexity of every quantization format on a real model, with checkpoint sizes.

    python benchmarks/quant_ppl.py                      # smollm2-135m-instruct, writes benchmarks/results/quant_ppl.json

What it does, all on the CPU in float32 arithmetic (a format's effect is the rounding of
what it stores):

1. converts the model to an fp32 checkpoint (the reference) and an fp16 one (the baseline
   the formats are quantized from, so every checkpoint keeps embeddings/norms in fp16);
2. runs one calibration pass on the fp16 checkpoint (``--calib-samples`` windows of
   ``--seq-len`` tokens of the King James Bible's calibration part; TensorRT-LLM's default
   is 512 x 512, reduced here to keep the run near ten minutes on 2 cores) and quantizes
   every format from it;
3. evaluates all of them with :func:`nbtrt.quantize.report` on ``--eval-tokens`` held-out
   tokens (chapters the calibration never saw): perplexity, KL and top-1 agreement against
   fp32, size, per-layer error.

Targets checked and recorded: int4_awq beats int4_wo; int8_wo within 1 % of fp16.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import nbtrt
import nbtrt.quantize as nq

# label -> quantize() keyword arguments (fmt first); every weight format, the static SmoothQuant
# variant, and the KV-cache formats on their own
FORMATS: dict[str, dict] = {
    "int8_wo": {"fmt": "int8_wo"},
    "int4_wo": {"fmt": "int4_wo"},
    "int4_awq": {"fmt": "int4_awq"},
    "int4_gptq": {"fmt": "int4_gptq"},
    "int4_gptq_act_order": {"fmt": "int4_gptq", "act_order": True},
    "int8_gptq": {"fmt": "int8_gptq"},
    "int8_sq": {"fmt": "int8_sq"},
    "int8_sq_per_tensor": {"fmt": "int8_sq", "activation_scheme": "per_tensor"},
    "fp8": {"fmt": "fp8"},
    "fp16+kv_int8": {"fmt": None, "kv_cache": "int8"},
    "fp16+kv_fp8": {"fmt": None, "kv_cache": "fp8"},
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--work", default="work/bench-quant")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--formats", nargs="*", default=list(FORMATS))
    p.add_argument("--out", default="benchmarks/results/quant_ppl.json")
    a = p.parse_args(argv)
    work = Path(a.work)
    timings: dict[str, float] = {}
    load_start = os.getloadavg()  # timings are only comparable on an otherwise idle machine

    def timed(label, fn, *args, **kw):
        t = time.perf_counter()
        result = fn(*args, **kw)
        timings[label] = round(time.perf_counter() - t, 1)
        print(f"{label}: {timings[label]} s", flush=True)
        return result

    ref = timed("convert fp32", nbtrt.convert, a.model, work / "fp32", overwrite=True)
    base = timed("convert fp16", nbtrt.convert, a.model, work / "fp16", dtype="float16", overwrite=True)
    cal = timed("calibrate", nq.calibrate, base, "kjv", num_samples=a.calib_samples, seq_len=a.seq_len)
    candidates = {"fp16": base}
    for label in a.formats:
        kw = dict(FORMATS[label])
        candidates[label] = timed(f"quantize {label}", nq.quantize, base, work / label, kw.pop("fmt"), cal,
                                  overwrite=True, **kw)
    r = timed("report", nq.report, ref, candidates, num_tokens=a.eval_tokens, seq_len=a.seq_len)
    rows = {row["name"]: row for row in r.rows}
    checks = {}
    if "int4_awq" in rows and "int4_wo" in rows:
        checks["int4_awq_beats_int4_wo"] = rows["int4_awq"]["perplexity"] < rows["int4_wo"]["perplexity"]
    if "int8_wo" in rows:
        gap = rows["int8_wo"]["perplexity"] / rows["fp16"]["perplexity"] - 1
        checks["int8_wo_vs_fp16_perplexity_gap"] = gap
        checks["int8_wo_within_1pct_of_fp16"] = abs(gap) <= 0.01
    result = {
        "benchmark": "quant_ppl", "model": a.model,
        "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0],
                    "load_average_1min": {"start": load_start[0], "end": os.getloadavg()[0]}},
        "settings": {"calibration": cal.summary(), "eval_tokens": r.evaluation["tokens"], "seq_len": a.seq_len,
                     "evaluation": r.evaluation, "arithmetic": "float32 on CPU",
                     "quantized_from": "fp16 checkpoint", "reference": "fp32 checkpoint",
                     "formats": {k: FORMATS[k] for k in a.formats}},
        "rows": r.rows, "checks": checks, "layer_error": r.layer_error, "timings_s": timings,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    for row in r.rows:
        print(f"{row['name']:>20}  {row['size_mb']:8.1f} MB  ppl {row['perplexity']:8.3f}  "
              f"KL {row['kl']:.4f}  top1 {row['top1_agreement']:.3f}")
    print(json.dumps(checks))
    return result


if __name__ == "__main__":
    main()
