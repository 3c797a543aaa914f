"""The quality table: every quantization format of a zoo model, incl. GPTQ — size, held-out perplexity,
KL and top-1 agreement against fp32, and ROUGE-L of a CPU engine's greedy outputs against HF's.

    python benchmarks/quality.py                                  # smollm2-135m-instruct
    python benchmarks/quality.py --model qwen2.5-coder-0.5b-instruct --formats int4_wo int4_awq int4_gptq

The same measurement as benchmarks/quant_ppl.py (conversion to fp32 and fp16 checkpoints, one
calibration pass, every format quantized from the fp16 one, :func:`nbtrt.quantize.report` on
``--eval-tokens`` held-out King James tokens), plus step 4: each checkpoint is built into a torch
engine (CPU, float32 arithmetic) and :func:`nbtrt.eval` continues ``--eval-docs`` held-out chapters
greedily with it and with the HF model, giving ROUGE-1/2/L against HF, exact-match rate and the
engine's perplexity on HF's continuations.

Unlike quant_ppl.py, formats are measured one at a time, in the order ``--formats`` gives, and
benchmarks/results/quality_<model>.json is rewritten after each one: on a slow machine list the
formats that matter first and stop the run when time is up — what was measured is kept, and
``formats_not_run`` says what was not. (A candidate's figures depend only on its own logits and
the fp32 reference's, so measuring one at a time gives the same numbers as all at once, and only
two fp32 models are ever in memory: all of a 0.5B model's would not fit in 24 GiB.)

``--reuse`` keeps the checkpoints already in ``--work``: a stopped run resumes, and a second process
with the same settings, ``--work`` and ``--reuse`` can quantize the slow GPTQ formats while the first
measures the others (the calibration pass runs only when a format that reads it is quantized; GPTQ
runs its own pass on the same calibration windows).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import quant_ppl  # noqa: E402  (the format table)

import torch  # noqa: E402

import nbtrt  # noqa: E402
import nbtrt.quantize as nq  # noqa: E402
from nbtrt.layouts import FORMATS as LAYOUT_FORMATS  # noqa: E402
from nbtrt.quantize.gptq import LAYOUTS as GPTQ_FORMATS  # noqa: E402


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _engine_eval(label: str, ckpt: Path, hf: Path, work: Path, a) -> dict:
    """Build ``ckpt`` into a CPU torch engine and compare its greedy continuations with HF's."""
    t = time.perf_counter()
    try:
        engine = nbtrt.build(ckpt, work / f"engine-{label}", backend="torch", dtype="float32", max_batch_size=1,
                             max_input_len=128, max_seq_len=192, overwrite=True)
        r = nbtrt.eval(engine, hf, "kjv", num_docs=a.eval_docs, max_new_tokens=a.max_new_tokens)
    except (ValueError, RuntimeError) as e:  # record it and go on: the other formats' figures still count
        print(f"eval {label}: {type(e).__name__}: {e}", flush=True)
        return {"error": f"{type(e).__name__}: {e}"}
    d = r.to_dict()
    result = {k: v for k, v in d.items() if k != "documents"}
    result["documents"] = [{k: doc[k] for k in ("doc_id", "rougeL", "exact_match", "first_diff", "output")}
                           for doc in d["documents"]]
    result["seconds"] = round(time.perf_counter() - t, 1)
    print(f"eval {label}: ROUGE-L {r.rougeL:.1f}  exact {r.exact_match:.0%}  ppl engine "
          f"{r.perplexity_engine:.3f} (HF {r.perplexity_hf:.3f})", flush=True)
    return result


def _attach_evals(rows: dict, evals: dict) -> None:
    """Copy each engine eval's ROUGE-L and exact match onto its row (the fp32 engine's onto the float32 row)."""
    for label, e in evals.items():
        row = rows.get("float32" if label == "fp32" else label)
        if row is not None and "rougeL" in e:
            row["rougeL_vs_hf"] = e["rougeL"]
            row["exact_match_vs_hf"] = e["exact_match"]


def _needs_calibration(kw: dict) -> bool:
    """Whether quantize() reads the shared calibration pass (GPTQ reads only its windows: its own pass)."""
    fmt = kw["fmt"]
    return bool(kw.get("kv_cache")) or (fmt not in GPTQ_FORMATS and fmt is not None
                                         and LAYOUT_FORMATS[fmt].needs_calibration)


def _checks(rows: dict) -> dict:
    """The targets quant_ppl.py records, and issue 32's GPTQ ones (on whichever formats were measured)."""
    ppl = {k: r["perplexity"] for k, r in rows.items()}
    checks = {}
    if {"int4_awq", "int4_wo"} <= set(ppl):
        checks["int4_awq_beats_int4_wo"] = ppl["int4_awq"] < ppl["int4_wo"]
    if {"int8_wo", "fp16"} <= set(ppl):
        gap = ppl["int8_wo"] / ppl["fp16"] - 1
        checks["int8_wo_vs_fp16_perplexity_gap"] = gap
        checks["int8_wo_within_1pct_of_fp16"] = abs(gap) <= 0.01
    gptq = [ppl[k] for k in ("int4_gptq", "int4_gptq_act_order") if k in ppl]
    if gptq and "int4_wo" in ppl:
        checks["int4_gptq_below_int4_wo"] = min(gptq) < ppl["int4_wo"]
    if gptq and "int4_awq" in ppl:
        checks["int4_gptq_at_or_below_int4_awq"] = min(gptq) <= ppl["int4_awq"]
    return checks


def merge(out: Path, parts: list[Path]) -> dict:
    """Fold the JSONs of a split run's other processes (same model and settings) into ``out``.

    Rows, layer errors, engine evals, timings and errors of formats ``out`` lacks are taken from
    each part; the rows are put in the format table's order and the checks recomputed.
    """
    result = json.loads(out.read_text())
    same = ("model",)
    for part_path in parts:
        part = json.loads(part_path.read_text())
        for key in same:
            if part[key] != result[key]:
                raise SystemExit(f"{part_path}: {key} {part[key]!r} differs from {out}'s {result[key]!r}")
        def same_settings(settings: dict) -> tuple:  # the reference's path is where --work was: not a setting
            return {k: v for k, v in settings["evaluation"].items() if k != "reference"}, settings["seq_len"]

        if same_settings(part["settings"]) != same_settings(result["settings"]):
            raise SystemExit(f"{part_path}: settings.evaluation or seq_len differ from {out}'s; not part of the same run")
        if {k: part["settings"]["calibration"][k] for k in ("source", "num_samples", "seq_len", "seed")} != \
                {k: result["settings"]["calibration"][k] for k in ("source", "num_samples", "seq_len", "seed")}:
            raise SystemExit(f"{part_path}: a different calibration from {out}'s; it is not part of the same run")
        if not result["eval"]["results"]:  # no engine eval ran yet: the part's settings become the run's
            result["eval"].update({k: v for k, v in part["eval"].items() if k != "results"})
        if part["eval"]["docs"] != result["eval"]["docs"] or \
                part["eval"]["max_new_tokens"] != result["eval"]["max_new_tokens"]:
            raise SystemExit(f"{part_path}: different engine-eval settings from {out}'s")
        if len(part["settings"]["calibration"]) > len(result["settings"]["calibration"]):
            result["settings"]["calibration"] = part["settings"]["calibration"]  # the full record of the pass
        rows = {r["name"]: r for r in result["rows"]}
        ref, part_ref = rows.get("float32"), next((r for r in part["rows"] if r["name"] == "float32"), None)
        if ref and part_ref and abs(part_ref["perplexity"] / ref["perplexity"] - 1) > 1e-6:
            raise SystemExit(f"{part_path}: the fp32 reference's perplexity {part_ref['perplexity']} differs from "
                             f"{out}'s {ref['perplexity']}: not the same reference or held-out tokens")
        new = [r for r in part["rows"] if r["name"] not in rows]
        names = [r["name"] for r in new]
        result["rows"] += new
        result["settings"]["formats"].update({k: v for k, v in part["settings"]["formats"].items() if k in names})
        result["layer_error"].update({k: v for k, v in part["layer_error"].items() if k in names})
        result["timings_s"].update({k: v for k, v in part["timings_s"].items()  # incl. a part's calibration pass
                                    if k.split(" ", 1)[-1] in names or k not in result["timings_s"]})
        result["eval"]["results"].update({k: v for k, v in part["eval"]["results"].items()
                                          if k not in result["eval"]["results"] or "error" in
                                          result["eval"]["results"][k]})
        result["errors"].update(part["errors"])
        result.setdefault("merged_from", []).append(
            {"file": part_path.name, "formats": names, "date": part["date"], "load_average": part["load_average"],
             "machine": part["machine"], "reused_checkpoints": part["reused_checkpoints"]})
    order = ["float32", "fp16", *quant_ppl.FORMATS]
    result["rows"].sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    rows = {r["name"]: r for r in result["rows"]}
    _attach_evals(rows, result["eval"]["results"])
    result["checks"] = _checks(rows)
    result["formats_not_run"] = [f for f in result["settings"]["formats"]
                                 if f not in rows and f not in result["errors"]]
    result["engine_evals_not_run"] = [f for f in [*result["settings"]["formats"], "fp32", "fp16"]
                                      if f not in result["eval"]["results"] and f not in result["errors"]]
    _write_json(out, result)
    print(f"merged {', '.join(map(str, parts))} into {out}: {len(result['rows'])} rows; not run: "
          f"{result['formats_not_run']}; engine evals not run: {result['engine_evals_not_run']}")
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--work", default=None)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-docs", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--reuse", action="store_true",
                   help="keep checkpoints already in --work (written whole or not at all) instead of remaking them: "
                        "to resume a stopped run, or to quantize slow formats in a second process with the same "
                        "settings and --work")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the fp16 row and the fp32/fp16 engine evals (a second process's part of a split run)")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="PART_JSON",
                   help="measure nothing: fold these JSONs of the same run (--no-baseline processes) into --out")
    p.add_argument("--out", default=None, help="default: benchmarks/results/quality_<model>.json")
    p.add_argument("--formats", nargs="*", default=list(quant_ppl.FORMATS),
                   help="measured in this order (put the ones that matter first); default: all of "
                        + ", ".join(quant_ppl.FORMATS))
    a = p.parse_args(argv)
    unknown = [f for f in a.formats if f not in quant_ppl.FORMATS]
    if unknown:
        p.error(f"unknown format(s) {unknown}; choose from {list(quant_ppl.FORMATS)}")
    work = Path(a.work or f"work/bench-quality-{a.model}")
    out = Path(a.out or f"benchmarks/results/quality_{a.model}.json")
    if a.merge:
        return merge(out, a.merge)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg()  # timings are only comparable on an otherwise idle machine
    timings: dict[str, float] = {}
    rows: dict[str, dict] = {}
    layer_error: dict[str, list[float]] = {}
    evals: dict[str, dict] = {}
    errors: dict[str, str] = {}
    evaluation: dict = {}

    def timed(label, fn, *args, **kw):
        t = time.perf_counter()
        result = fn(*args, **kw)
        timings[label] = round(time.perf_counter() - t, 1)
        print(f"{label}: {timings[label]} s", flush=True)
        return result

    def measure(label: str, ckpt: Path) -> None:
        """Report rows for one candidate (the fp32 reference's row comes with the first)."""
        r = timed(f"report {label}", nq.report, ref, {label: ckpt}, num_tokens=a.eval_tokens, seq_len=a.seq_len)
        evaluation.update(r.evaluation)
        for row in r.rows:
            rows.setdefault(row["name"], row)
        layer_error.update(r.layer_error)
        gc.collect()

    def write() -> dict:
        _attach_evals(rows, evals)
        measured = [f for f in a.formats if f in rows]
        result = {
            "benchmark": "quality", "model": a.model,
            "machine": {**machine, "load_average_1min": {"start": load_start[0], "end": os.getloadavg()[0]}},
            "settings": {"calibration": cal.summary() if cal else calib_record,
                         "eval_tokens": evaluation.get("tokens"), "seq_len": a.seq_len,
                         "evaluation": evaluation, "arithmetic": "float32 on CPU",
                         "quantized_from": "fp16 checkpoint", "reference": "fp32 checkpoint",
                         "formats": {k: quant_ppl.FORMATS[k] for k in a.formats}},
            "rows": list(rows.values()), "checks": _checks(rows), "layer_error": layer_error, "timings_s": timings,
            "formats_not_run": [f for f in a.formats if f not in measured and f not in errors],
            "engine_evals_not_run": [f for f in [*a.formats, *([] if a.no_baseline else ["fp32", "fp16"])]
                                     if f not in evals and f not in errors],
            "errors": errors, "reused_checkpoints": reused,
            "date": started, "device": "CPU (" + machine["platform"] + ")",
            "load_average": {"start": load_start, "end": os.getloadavg()},
            "eval": {"source": "kjv held-out chapters", "docs": a.eval_docs, "prompt_tokens": 96,
                     "max_new_tokens": a.max_new_tokens, "reference": "HF transformers fp32 (trust_remote_code=False)",
                     "engine": "torch backend, CPU, float32 arithmetic", "results": evals},
        }
        _write_json(out, result)
        print(f"wrote {out} ({len(measured)}/{len(a.formats)} formats)", flush=True)
        return result

    machine = {"platform": platform.platform(), "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "python": sys.version.split()[0]}
    hf = nbtrt.zoo.get(a.model)
    reused: list[str] = []

    def made(label: str, fn, *args, **kw) -> Path:
        """work/label: reused when --reuse and a checkpoint is there, else made by fn (timed)."""
        if a.reuse and (work / label / "config.json").is_file():
            reused.append(label)
            print(f"{label}: reusing {work / label}", flush=True)
            return work / label
        return timed(f"{'convert' if label in ('fp32', 'fp16') else 'quantize'} {label}", fn, *args, **kw)

    ref = made("fp32", nbtrt.convert, a.model, work / "fp32", overwrite=True)
    base = made("fp16", nbtrt.convert, a.model, work / "fp16", dtype="float16", overwrite=True)
    cal = None  # one calibration pass, run when the first format that reads it is quantized
    calib_record = {"source": "kjv", "num_samples": a.calib_samples, "seq_len": a.seq_len, "seed": 0}
    # perplexity, KL and top-1 of every format first (issue 32's checks need only these), then the engine evals
    # (slow: an int4 engine is several times slower than an fp16 one on the CPU), both in --formats order
    if not a.no_baseline:
        measure("fp16", base)
        write()
    checkpoints = {}
    for label in a.formats:
        kw = dict(quant_ppl.FORMATS[label])
        if cal is None and _needs_calibration(kw) and not (a.reuse and (work / label / "config.json").is_file()):
            cal = timed("calibrate", nq.calibrate, base, "kjv", num_samples=a.calib_samples, seq_len=a.seq_len)
        calib = cal or "kjv"  # GPTQ reads the same windows from the source name as from the Calibration
        fmt = kw.pop("fmt")
        try:
            checkpoints[label] = made(label, nq.quantize, base, work / label, fmt, calib, overwrite=True,
                                      num_samples=a.calib_samples, seq_len=a.seq_len, **kw)
        except (ValueError, RuntimeError) as e:  # QuantizationError included; the other formats still count
            errors[label] = f"{type(e).__name__}: {e}"
            print(f"quantize {label}: {errors[label]}", flush=True)
            continue
        gc.collect()
        measure(label, checkpoints[label])
        write()
    baselines = {} if a.no_baseline else {"fp32": ref, "fp16": base}
    for label, ckpt in {**checkpoints, **baselines}.items():
        evals[label] = _engine_eval(label, ckpt, hf, work, a)
        gc.collect()
        write()
    result = write()
    print(f"{'format':>22} {'MB':>7} {'ppl':>8} {'KL':>7} {'top1':>6} {'ROUGE-L':>8}")
    for row in result["rows"]:
        print(f"{row['name']:>22} {row['size_mb']:7.1f} {row['perplexity']:8.3f} {row['kl']:7.4f} "
              f"{row['top1_agreement']:6.3f} {row.get('rougeL_vs_hf', float('nan')):8.1f}")
    print(json.dumps(result["checks"]))
    return result


if __name__ == "__main__":
    main()
