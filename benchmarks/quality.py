"""The quality table: every quantization format of a zoo model, incl. GPTQ — size, held-out perplexity,
KL and top-1 agreement against fp32, and ROUGE-L of a CPU engine's greedy outputs against HF's.

    python benchmarks/quality.py                                  # smollm2-135m-instruct
    python benchmarks/quality.py --model qwen2.5-coder-0.5b-instruct

Steps 1-3 are benchmarks/quant_ppl.py (conversion, one calibration pass, every format, the
report on held-out King James chapters); this script runs it and adds step 4: each checkpoint
is built into a torch engine (CPU, float32 arithmetic) and :func:`nbtrt.eval` continues
``--eval-docs`` held-out chapters greedily with it and with the HF model, giving ROUGE-1/2/L
against HF, exact-match rate and the engine's perplexity on HF's continuations.
Writes benchmarks/results/quality_<model>.json (device, date, load average included).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import quant_ppl  # noqa: E402  (steps 1-3)

import nbtrt  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--work", default=None)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-docs", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--formats", nargs="*", default=list(quant_ppl.FORMATS))
    a = p.parse_args(argv)
    work = Path(a.work or f"work/bench-quality-{a.model}")
    out = Path(f"benchmarks/results/quality_{a.model}.json")
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    result = quant_ppl.main(["--model", a.model, "--work", str(work), "--calib-samples", str(a.calib_samples),
                             "--seq-len", str(a.seq_len), "--eval-tokens", str(a.eval_tokens),
                             "--out", str(out), "--formats", *a.formats])
    hf = nbtrt.zoo.get(a.model)
    checkpoints = {"fp32": work / "fp32", "fp16": work / "fp16", **{f: work / f for f in a.formats}}
    evals = {}
    for label, ckpt in checkpoints.items():
        t = time.perf_counter()
        try:
            engine = nbtrt.build(ckpt, work / f"engine-{label}", backend="torch", dtype="float32", max_batch_size=1,
                                 max_input_len=128, max_seq_len=192, overwrite=True)
            r = nbtrt.eval(engine, hf, "kjv", num_docs=a.eval_docs, max_new_tokens=a.max_new_tokens)
        except (ValueError, RuntimeError) as e:  # record it and go on: the other formats' figures still count
            evals[label] = {"error": f"{type(e).__name__}: {e}"}
            print(f"eval {label}: {evals[label]['error']}", flush=True)
            continue
        evals[label] = {k: v for k, v in r.to_dict().items() if k != "documents"}
        evals[label]["documents"] = [{k: d[k] for k in ("doc_id", "rougeL", "exact_match", "first_diff", "output")}
                                     for d in r.to_dict()["documents"]]
        evals[label]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"eval {label}: ROUGE-L {r.rougeL:.1f}  exact {r.exact_match:.0%}  ppl engine "
              f"{r.perplexity_engine:.3f} (HF {r.perplexity_hf:.3f})", flush=True)
    rows = {row["name"]: row for row in result["rows"]}
    for label, e in evals.items():
        if label in rows and "rougeL" in e:
            rows[label]["rougeL_vs_hf"] = e["rougeL"]
            rows[label]["exact_match_vs_hf"] = e["exact_match"]
    ppl = {k: rows[k]["perplexity"] for k in rows}
    if {"int4_gptq", "int4_wo", "int4_awq"} <= set(ppl):
        best = min(ppl.get("int4_gptq", 1e9), ppl.get("int4_gptq_act_order", 1e9))
        result["checks"].update({"int4_gptq_below_int4_wo": best < ppl["int4_wo"],
                                 "int4_gptq_at_or_below_int4_awq": best <= ppl["int4_awq"]})
    result.update({
        "benchmark": "quality", "date": started, "device": "CPU (" + result["machine"]["platform"] + ")",
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "eval": {"source": "kjv held-out chapters", "docs": a.eval_docs, "prompt_tokens": 96,
                 "max_new_tokens": a.max_new_tokens, "reference": "HF transformers fp32 (trust_remote_code=False)",
                 "engine": "torch backend, CPU, float32 arithmetic", "results": evals},
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"{'format':>22} {'MB':>7} {'ppl':>8} {'KL':>7} {'top1':>6} {'ROUGE-L':>8}")
    for row in result["rows"]:
        print(f"{row['name']:>22} {row['size_mb']:7.1f} {row['perplexity']:8.3f} {row['kl']:7.4f} "
              f"{row['top1_agreement']:6.3f} {row.get('rougeL_vs_hf', float('nan')):8.1f}")
    print(json.dumps(result["checks"]))
    return result


if __name__ == "__main__":
    main()
