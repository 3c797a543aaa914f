# Pins private parts of nbtrt (may break when they change): TorchEngine.model (the decoder with the
# runtime's kernel-backed linears) for full-window perplexity.
"""Issue 32 part 3 (and issue 29's agreement figure): the GPU runtime on REAL weights.

    python scripts/split_model.py --join carry --out /tmp/smollm2          # there: reassemble the carried model
    python benchmarks/gpu_real_weights.py --model-dir /tmp/smollm2 --out $OUT          # GPU, ~5 minutes
    python benchmarks/gpu_real_weights.py --model-dir /tmp/smollm2 --device cpu --out work/real-cpu
    python benchmarks/gpu_real_weights.py --compare GPU.json CPU.json      # the format table side by side

``--model-dir``: a HF directory in bf16 (scripts/split_model.py writes one from the zoo). If
``<model-dir>.site`` exists (the join puts the KJV text and carried wheels there) it is appended
to ``sys.path``: what the machine has installed wins.

Sections (each timed; a failure is recorded and the run goes on; past ``--budget`` seconds the
remaining ones are skipped and say so):

  agree    the bf16 torch engine (compiled on CUDA, as benchmarks/gpu.py builds it) vs HF bf16
           eager from the same directory: top-1 agreement and perplexity over the held-out KJV
           positions (a 32-token prefill, then teacher-forced decode steps: >= 256 positions), and
           greedy generations of 8 chat prompts, batch 1, token for token (HF generate vs engine.generate).
  serve    issue 29: nbtrt.LLM in-flight greedy outputs vs the static engine's (batches of 8) on 48
           chat prompts, ``--new-tokens`` each, no stop tokens: % of tokens agreeing, identical requests,
           mean first divergence; and the same for the first 8 prompts run alone (batch 1).
  formats  every quantized format, quantized HERE from the bf16 checkpoint (one calibration pass,
           ``--calib-samples`` x 512 KJV tokens; GPTQ its own pass of the same size), loaded by the
           torch runtime (kernel-backed linears) in bf16: perplexity, KL and top-1 vs the bf16 engine
           on the held-out windows benchmarks/quality.py uses (first ``--eval-windows`` x 512 tokens
           of the KJV eval part, seed 0) by full-window forwards, plus ``--decode-positions`` teacher-
           forced decode steps through the engine itself. The same script with ``--device cpu`` gives
           the CPU's figures from the same bf16 source; ``--compare`` shows both. Tolerance: the
           GPU's perplexity within 2 % (relative) of the CPU's for every format (bf16 arithmetic on
           both; bf16 accumulation order alone moves a 135M model's perplexity by a few tenths of a %).
  eval     nbtrt.eval (KJV, ``--eval-docs`` documents, 32 new tokens) on the bf16 engine and each
           format's engine; needs the rouge-score package (carried wheels), else skipped and said so.

JSON goes to ``<out>/gpu_real_weights.json`` after every section (device, date, versions); a
one-screen summary is printed last. ``--quick``: short windows, few prompts, no compile on CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPTQ = ("int4_gptq", "int8_gptq")
DEFAULT_FORMATS = ("int8_wo", "int4_wo", "int4_awq", "int8_sq", "fp8", "int4_gptq", "int8_gptq")  # slowest last
GPTQ_SECONDS = 90  # a GPTQ format is not started with less time than this left (its pass runs on the CPU)
TOLERANCE = 0.02  # relative perplexity difference GPU vs CPU, per format
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for learning Python.",
    "What is 17 times 23?",
    "Translate 'good morning, my friend' into Spanish.",
    "Summarize the story of Noah's ark in one sentence.",
    "Write a short polite email declining a meeting.",
]
TOPICS = ["gravity", "photosynthesis", "the Roman empire", "prime numbers", "volcanoes", "the internet",
          "bees", "chess", "the moon", "rainbows", "electricity", "bread baking", "whales", "democracy",
          "the printing press", "glaciers"]
STYLES = ["Explain {} to a ten-year-old.", "Write a short poem about {}.", "List three facts about {}."]


def serve_prompts(n: int) -> list[str]:
    """``n`` chat prompts: the 8 above, then topic x style combinations (48 in all)."""
    more = [s.format(t) for t in TOPICS for s in STYLES]
    return (CHAT_PROMPTS + more)[:n]


# ------------------------------------------------------------------------------ helpers
class Ctx:
    """What the sections share: the device, the bf16 checkpoint, the tokenizer, the held-out windows."""

    def __init__(self, a):
        import torch

        import nbtrt
        from nbtrt._io import load_tokenizer
        from nbtrt.quantize.calib import windows

        self.a, self.torch = a, torch
        self.dev = torch.device(a.device)
        self.work = Path(a.work)
        self.model_dir = Path(a.model_dir)
        self.tok = load_tokenizer(self.model_dir)
        self.ckpt = nbtrt.convert(self.model_dir, self.work / "ckpt-bf16", dtype="bfloat16", overwrite=True)
        self.windows = windows(self.tok, "kjv", "eval", a.eval_windows, a.seq_len, seed=0)  # quality.py's windows
        self.compile = {"auto": self.dev.type == "cuda", "on": True, "off": False}[a.compile]
        self.max_seq_len = max(a.seq_len, 256 + a.new_tokens) + 8
        self.engine = None  # the bf16 engine, built by the first section that needs it
        self.ref_logprobs = None  # the bf16 engine's log-probs on the windows (formats' KL / top-1)

    def build(self, ckpt, name: str, compile: bool):
        import nbtrt

        edir = nbtrt.build(ckpt, self.work / f"engine-{name}", backend="torch", dtype="bfloat16",
                           max_batch_size=8, max_input_len=self.max_seq_len - 8, max_seq_len=self.max_seq_len,
                           overwrite=True)
        return nbtrt.load(edir, device=str(self.dev), compile=compile)

    def bf16_engine(self):
        if self.engine is None:
            t = time.perf_counter()
            self.engine = self.build(self.ckpt, "bf16", self.compile)
            self.engine_seconds = time.perf_counter() - t
        return self.engine


def sync(torch, dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def teacher_forced(engine, ids, prompt_len: int):
    """Logits [T - prompt_len, V] for positions prompt_len..T-1 of ``ids`` [1, T]: one prefill of
    ``prompt_len`` tokens, then one decode step a token (the engine's own path: compiled, graphed)."""
    import torch

    dev = engine.device
    ids = ids.to(dev)
    engine.begin(1)
    mask = torch.ones(1, prompt_len, dtype=torch.long, device=dev)
    rows = [engine.step(ids[:, :prompt_len], mask)[0].float()]
    for t in range(prompt_len, ids.shape[1] - 1):
        mask = torch.ones(1, t + 1, dtype=torch.long, device=dev)
        rows.append(engine.step(ids[:, t:t + 1], mask)[0].float())
    return torch.stack(rows)


def nll_top1(logits, targets, ref_logits=None) -> dict:
    """Sums over positions: NLL of ``targets``; top-1 matches and KL against ``ref_logits`` if given."""
    import torch.nn.functional as F

    lp = F.log_softmax(logits.float(), -1)
    out = {"nll": float(-lp.gather(-1, targets[:, None]).sum()), "tokens": int(targets.numel())}
    if ref_logits is not None:
        ref = F.log_softmax(ref_logits.float(), -1)
        out["top1"] = int((ref.argmax(-1) == lp.argmax(-1)).sum())
        out["kl"] = float((ref.exp() * (ref - lp)).sum())
    return out


def trim(ids: list[int], stop: set[int]) -> list[int]:
    """Tokens before the first end token (HF includes it, the engine may not)."""
    for i, t in enumerate(ids):
        if t in stop:
            return ids[:i]
    return ids


def first_diff(a: list[int], b: list[int]) -> int | None:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return i if i is not None or len(a) == len(b) else min(len(a), len(b))


def token_agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    total = sum(len(r) for r in b)
    diffs = [first_diff(ra, rb) for ra, rb in zip(a, b)]
    return {"tokens_agreeing": same, "tokens": total, "agreement": same / max(1, total),
            "identical_requests": sum(d is None for d in diffs), "requests": len(b),
            "first_divergence": diffs,
            "mean_first_divergence": statistics.fmean(len(rb) if d is None else d for d, rb in zip(diffs, b))}


# ------------------------------------------------------------------------------ sections
def sec_agree(c: Ctx, R: dict) -> None:
    torch, a = c.torch, c.a
    from nbtrt._io import load_hf_model
    from nbtrt.chat_template import apply_chat_template

    engine = c.bf16_engine()
    hf = load_hf_model(c.model_dir, dtype=torch.bfloat16).to(c.dev).eval()
    out = {"engine": {"backend": "torch", "dtype": "bfloat16", "compiled": engine.compiled,
                      "load_compile_seconds": round(c.engine_seconds, 1)},
           "reference": "HF transformers bf16 eager, same directory, trust_remote_code=False"}
    # top-1 over held-out positions
    sums = {"engine": {"nll": 0.0, "tokens": 0, "top1": 0, "kl": 0.0}, "hf": {"nll": 0.0, "tokens": 0}}
    margins = []  # HF's top-1 minus top-2 logit where the two disagree: near-ties flip under bf16 rounding
    P = a.prompt_len
    for w in range(a.agree_windows):
        ids = c.windows[w:w + 1]
        ours = teacher_forced(engine, ids, P)
        with torch.inference_mode():
            ref = hf(input_ids=ids.to(c.dev)).logits[0, P - 1:-1].float()
        targets = ids[0, P:].to(c.dev)
        for k, v in nll_top1(ours, targets, ref).items():
            sums["engine"][k] += v
        for k, v in nll_top1(ref, targets).items():
            sums["hf"][k] += v
        top2 = ref.topk(2, -1).values
        differ = ref.argmax(-1) != ours.argmax(-1)
        margins += (top2[differ, 0] - top2[differ, 1]).tolist()
    n = sums["engine"]["tokens"]
    out["positions"] = {
        "source": "kjv held-out windows (nbtrt.quantize.calib.windows, seed 0)", "windows": a.agree_windows,
        "prefill_tokens": P, "positions": n, "top1_agreement": sums["engine"]["top1"] / n,
        "kl_hf_to_engine": sums["engine"]["kl"] / n, "perplexity_engine": math.exp(sums["engine"]["nll"] / n),
        "perplexity_hf": math.exp(sums["hf"]["nll"] / n), "disagreements": len(margins),
        "hf_top1_top2_logit_gap_at_disagreements": sorted(round(m, 4) for m in margins)}
    # greedy generations of chat prompts, batch 1
    stop = set(engine.end_token_ids)
    rows = []
    for prompt in CHAT_PROMPTS[:a.chat_prompts]:
        ids = apply_chat_template(c.tok, [{"role": "user", "content": prompt}])
        with torch.inference_mode():
            ref = hf.generate(input_ids=torch.tensor([ids], device=c.dev), attention_mask=torch.ones(
                1, len(ids), dtype=torch.long, device=c.dev), max_new_tokens=a.chat_new_tokens, do_sample=False,
                temperature=None, top_p=None, top_k=None, repetition_penalty=1.0,
                pad_token_id=engine.pad_token_id)[0, len(ids):].tolist()
        got = engine.generate(input_ids=[ids], max_new_tokens=a.chat_new_tokens, do_sample=False,
                              repetition_penalty=1.0)[0]
        ref, got = trim(ref, stop), trim(got, stop)
        d = first_diff(got, ref)
        rows.append({"prompt": prompt, "hf_tokens": len(ref), "engine_tokens": len(got), "identical": d is None,
                     "matching_prefix": len(ref) if d is None else d, "hf_text": c.tok.decode(ref),
                     "engine_text": c.tok.decode(got)})
    out["chat"] = {"prompts": len(rows), "max_new_tokens": a.chat_new_tokens,
                   "identical": sum(r["identical"] for r in rows),
                   "matching_tokens": sum(r["matching_prefix"] for r in rows),
                   "hf_tokens": sum(r["hf_tokens"] for r in rows), "rows": rows}
    del hf
    R["agree"] = out


def sec_serve(c: Ctx, R: dict) -> None:
    torch, a = c.torch, c.a
    from nbtrt.chat_template import apply_chat_template
    from nbtrt.generate import SamplingParams
    from nbtrt.serving.artifacts import release_static_cache
    from nbtrt.serving.llm import LLM

    engine = c.bf16_engine()
    prompts = [apply_chat_template(c.tok, [{"role": "user", "content": p}]) for p in serve_prompts(a.serve_prompts)]
    new = a.new_tokens
    t = time.perf_counter()
    static = [toks for i in range(0, len(prompts), 8) for toks in engine.generate(
        input_ids=prompts[i:i + 8], max_new_tokens=new, do_sample=False, repetition_penalty=1.0, stop_token_ids=())]
    static_s = time.perf_counter() - t
    alone = [engine.generate(input_ids=[p], max_new_tokens=new, do_sample=False, repetition_penalty=1.0,
                             stop_token_ids=())[0] for p in prompts[:8]]
    release_static_cache(engine)
    if c.dev.type == "cuda":
        torch.cuda.empty_cache()
    seq_len = max(len(p) for p in prompts) + new + 1
    blocks = len(prompts) * -(-seq_len // 16) + 8  # every request at full length at once: no preemption
    t = time.perf_counter()
    with LLM(engine, max_batch_size=len(prompts), max_num_tokens=1024, max_seq_len=c.max_seq_len,
             max_input_len=c.max_seq_len - 8, num_blocks=blocks) as llm:
        setup_s = time.perf_counter() - t
        t = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(max_new_tokens=new, stop_token_ids=()), use_tqdm=False)
        inflight_s = time.perf_counter() - t
        inflight = [list(o.token_ids) for o in outs]
        stats = llm.stats()
    R["serve"] = {
        "prompts": len(prompts), "new_tokens": new, "stop_tokens": "none (every request runs its new_tokens)",
        "static_batch_size": 8, "static_seconds": round(static_s, 2), "llm_setup_seconds": round(setup_s, 2),
        "inflight_seconds": round(inflight_s, 2), "llm_stats": stats,
        "inflight_vs_static": token_agreement(inflight, static),
        "inflight_vs_alone_first8": token_agreement(inflight[:8], alone),
        "static_vs_alone_first8": token_agreement(static[:8], alone),
        "random_weights_h100_figure": 0.0967,
    }


def sec_formats(c: Ctx, R: dict, deadline: float) -> None:
    torch, a = c.torch, c.a
    import nbtrt
    import nbtrt.quantize as nq
    from nbtrt.checkpoint import checkpoint_hash

    out = R.setdefault("formats", {"settings": {
        "quantized_from": "bf16 checkpoint (nbtrt.convert of --model-dir)", "calib_samples": a.calib_samples,
        "calib_seq_len": 512, "eval": f"kjv held-out, first {a.eval_windows} windows x {a.seq_len} tokens, seed 0",
        "arithmetic": "bfloat16", "device": str(c.dev), "decode_positions": a.decode_positions,
        "compiled_format_engines": a.compile_formats}, "rows": {}})
    rows = out["rows"]
    windows = c.windows.to(c.dev)

    def forward_metrics(model, ref=None) -> dict:
        sums: dict = {}
        with torch.inference_mode():
            for w in range(windows.shape[0]):
                logits = model(windows[w:w + 1])[0, :-1].float()
                got = nll_top1(logits, windows[w, 1:], None if ref is None else ref[w])
                for k, v in got.items():
                    sums[k] = sums.get(k, 0) + v
        n = sums["tokens"]
        row = {"perplexity": math.exp(sums["nll"] / n), "tokens": n}
        if ref is not None:
            row.update(kl_vs_bf16=sums["kl"] / n, top1_vs_bf16=sums["top1"] / n)
        return row

    def decode_ppl(engine) -> dict:
        if a.decode_positions <= 0:
            return {}
        ids = c.windows[:1, :a.prompt_len + a.decode_positions + 1]
        logits = teacher_forced(engine, ids, a.prompt_len)
        got = nll_top1(logits, ids[0, a.prompt_len:].to(c.dev))
        return {"decode_perplexity": math.exp(got["nll"] / got["tokens"]), "decode_positions": got["tokens"]}

    if "bf16" not in rows:
        t = time.perf_counter()
        eng = c.bf16_engine()
        with torch.inference_mode():
            c.ref_logprobs = [eng.model(windows[w:w + 1])[0, :-1].float() for w in range(windows.shape[0])]
        rows["bf16"] = {**forward_metrics(eng.model), **decode_ppl(eng), "checkpoint_sha256": checkpoint_hash(c.ckpt),
                        "seconds": round(time.perf_counter() - t, 1)}
    cal = None
    for fmt in a.formats:
        if fmt in rows:
            continue
        if deadline - time.perf_counter() < (GPTQ_SECONDS if fmt in GPTQ else 0):
            rows[fmt] = {"skipped": "past the time budget (--budget)"}
            continue
        row = rows[fmt] = {}
        try:
            t = time.perf_counter()
            if cal is None and fmt not in GPTQ and fmt not in ("int8_wo", "int4_wo"):
                cal = nq.calibrate(c.ckpt, "kjv", num_samples=a.calib_samples, seq_len=512)
                row["calibrate_seconds"] = round(time.perf_counter() - t, 1)
                t = time.perf_counter()
            q = nq.quantize(c.ckpt, c.work / f"ckpt-{fmt}", fmt, cal if cal is not None else "kjv",
                            num_samples=a.calib_samples, seq_len=512, overwrite=True)
            row["quantize_seconds"] = round(time.perf_counter() - t, 1)
            row["checkpoint_sha256"] = checkpoint_hash(q)
            t = time.perf_counter()
            eng = c.build(q, fmt, a.compile_formats and c.compile)
            row["load_seconds"] = round(time.perf_counter() - t, 1)
            row["kernels"] = eng.quant_report
            row.update(forward_metrics(eng.model, c.ref_logprobs))
            row.update(decode_ppl(eng))
            del eng
        except Exception as e:  # one format must not hide the others
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()[-2000:]
            print(f"!! format {fmt}: {row['error']}", flush=True)
        if c.dev.type == "cuda":
            torch.cuda.empty_cache()
        _save(R)
    # nbtrt eval on each format's engine last: the perplexities above are the figures that must fit the budget
    for fmt, row in rows.items():
        if fmt == "bf16" or "perplexity" not in row or "eval" in row or not a.eval_docs:
            continue
        if deadline - time.perf_counter() < 20:
            row["eval"] = {"skipped": "past the time budget (--budget)"}
            continue
        try:
            row["eval"] = run_eval(c, nbtrt.load(c.work / f"engine-{fmt}", device=str(c.dev), compile=False))
        except Exception as e:
            row["eval"] = {"error": f"{type(e).__name__}: {e}"}
        _save(R)


def run_eval(c: Ctx, engine) -> dict:
    """nbtrt.eval on ``engine`` vs HF (fp32, CPU: nbtrt.eval's reference), or why it was skipped."""
    try:
        import rouge_score  # noqa: F401
    except ImportError:
        return {"skipped": "rouge-score is not installed (carry its wheels: scripts/split_model.py --wheels)"}
    import nbtrt

    t = time.perf_counter()
    r = nbtrt.eval(engine, c.model_dir, "kjv", num_docs=c.a.eval_docs, max_new_tokens=32)
    d = r.to_dict()
    return {**{k: v for k, v in d.items() if k != "documents"}, "seconds": round(time.perf_counter() - t, 1),
            "documents": [{k: doc[k] for k in ("doc_id", "rougeL", "exact_match", "first_diff")}
                          for doc in d["documents"]]}


def sec_eval(c: Ctx, R: dict) -> None:
    R["eval_bf16"] = run_eval(c, c.bf16_engine()) if c.a.eval_docs else {"skipped": "--eval-docs 0"}


# ------------------------------------------------------------------------------ output
OUT_PATH: Path | None = None


def _save(R: dict) -> None:
    if OUT_PATH is not None:
        OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
        tmp = OUT_PATH.with_suffix(".tmp")
        tmp.write_text(json.dumps(R, indent=1, default=str))
        os.replace(tmp, OUT_PATH)


def compare(gpu: dict, cpu: dict) -> list[str]:
    """The formats' perplexity on both devices, and whether each is within TOLERANCE."""
    g, c = gpu.get("formats", {}).get("rows", {}), cpu.get("formats", {}).get("rows", {})
    same_run = ("calib_samples", "calib_seq_len", "eval", "decode_positions")
    gs, cs = gpu.get("formats", {}).get("settings", {}), cpu.get("formats", {}).get("settings", {})
    differ = [k for k in same_run if gs.get(k) != cs.get(k)] + (["quick"] if gpu.get("quick") != cpu.get("quick") else [])
    lines = [f"!! the two runs differ in {differ}: their figures are not comparable"] if differ else []
    lines += [f"{'format':10} {'ppl ' + _dev(gpu):>16} {'ppl ' + _dev(cpu):>16} {'rel diff':>9}  within {TOLERANCE:.0%}"
             "   same checkpoint bytes"]
    for fmt in [f for f in g if f in c]:
        a, b = g[fmt].get("perplexity"), c[fmt].get("perplexity")
        if a is None or b is None:
            lines.append(f"{fmt:10} {g[fmt].get('error') or g[fmt].get('skipped') or '':>16} "
                         f"{c[fmt].get('error') or c[fmt].get('skipped') or '':>16}")
            continue
        rel = a / b - 1
        same = g[fmt].get("checkpoint_sha256") == c[fmt].get("checkpoint_sha256")
        da, db = g[fmt].get("decode_perplexity"), c[fmt].get("decode_perplexity")
        dec = f"   decode ppl {da:.3f} vs {db:.3f} ({da / db - 1:+.2%})" if da and db else ""
        lines.append(f"{fmt:10} {a:16.3f} {b:16.3f} {rel:+9.2%}  {'yes' if abs(rel) <= TOLERANCE else 'NO':>9}"
                     f"   {'yes' if same else 'no':>3}{dec}")
    return lines


def _dev(R: dict) -> str:
    return (R.get("machine", {}).get("gpu") if R.get("device") == "cuda" else None) or R.get("device", "?")


def summary(R: dict) -> str:
    lines = [f"device: {_dev(R)}   date: {R['machine']['date']}   model: {R['model_dir']}   quick: {R['quick']}"]
    ag = R.get("agree")
    if ag:
        p, ch = ag["positions"], ag["chat"]
        lines.append(f"agree  engine (compiled={ag['engine']['compiled']}) vs HF bf16: top-1 {p['top1_agreement']:.2%} "
                     f"over {p['positions']} positions ({p['disagreements']} differ); ppl engine "
                     f"{p['perplexity_engine']:.3f} HF {p['perplexity_hf']:.3f}; KL {p['kl_hf_to_engine']:.2e}")
        lines.append(f"agree  chat greedy: {ch['identical']}/{ch['prompts']} identical, {ch['matching_tokens']}/"
                     f"{ch['hf_tokens']} HF tokens matched before the first difference")
    sv = R.get("serve")
    if sv:
        s = sv["inflight_vs_static"]
        lines.append(f"serve  in-flight vs static b8: {s['agreement']:.2%} of {s['tokens']} tokens, "
                     f"{s['identical_requests']}/{s['requests']} identical, mean first divergence "
                     f"{s['mean_first_divergence']:.1f}/{sv['new_tokens']} (random weights on H100: 9.67%)")
        lines.append(f"serve  in-flight vs alone (8): {sv['inflight_vs_alone_first8']['agreement']:.2%};  "
                     f"static b8 vs alone (8): {sv['static_vs_alone_first8']['agreement']:.2%}")
    fm = R.get("formats")
    if fm:
        lines.append(f"{'format':10} {'ppl':>8} {'KL vs bf16':>11} {'top1':>7} {'decode ppl':>11} {'eval ROUGE-L':>13}")
        for fmt, row in fm["rows"].items():
            if "perplexity" not in row:
                lines.append(f"{fmt:10} {row.get('skipped') or row.get('error', '')}"[:160])
                continue
            ev = row.get("eval", {})
            rl = f"{ev['rougeL']:.1f}" if "rougeL" in ev else ("skipped" if ev else "-")
            lines.append(f"{fmt:10} {row['perplexity']:8.3f} {row.get('kl_vs_bf16', 0):11.4f} "
                         f"{row.get('top1_vs_bf16', 1):7.3f} {row.get('decode_perplexity', float('nan')):11.3f}"
                         f" {rl:>13}")
    ev = R.get("eval_bf16")
    if ev:
        lines.append("eval   bf16 engine: " + (f"ROUGE-L {ev['rougeL']:.1f} exact {ev['exact_match']:.0%} ppl engine "
                     f"{ev['perplexity_engine']:.3f} HF {ev['perplexity_hf']:.3f}" if "rougeL" in ev else str(ev)))
    if R.get("compare_cpu"):
        lines += R["compare_cpu"]
    for k, v in R["section_seconds"].items():
        lines.append(f"time {k}: {v:.0f} s")
    for k, v in R["errors"].items():
        lines.append(f"!! {k}: {v.strip().splitlines()[-1]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global OUT_PATH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="bf16 HF directory (scripts/split_model.py --join)")
    ap.add_argument("--device", default=None, help="cuda (default where present) or cpu")
    ap.add_argument("--out", default=os.environ.get("OUT", "work/gpu-real-weights"))
    ap.add_argument("--work", default=None, help="checkpoints and engines (default: <out>/../gpu-real-work)")
    ap.add_argument("--quick", action="store_true", help="short windows, few prompts (a CPU smoke test)")
    ap.add_argument("--sections", default="agree,serve,eval,formats")
    ap.add_argument("--formats", default=",".join(DEFAULT_FORMATS))
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="the bf16 engine (auto: on CUDA)")
    ap.add_argument("--compile-formats", action="store_true", help="compile the formats' engines too (slower start)")
    ap.add_argument("--budget", type=float, default=330, help="seconds; sections and formats past it are skipped")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-docs", type=int, default=None, help="nbtrt eval documents (default 4, quick 1; 0: none)")
    ap.add_argument("--cpu-json", help="the --device cpu run's JSON: add the GPU-vs-CPU table")
    ap.add_argument("--compare", nargs=2, metavar=("GPU_JSON", "CPU_JSON"), help="only print the two runs' table")
    a = ap.parse_args(argv)
    if a.compare:
        g, c = (json.loads(Path(p).read_text()) for p in a.compare)
        print("\n".join(compare(g, c)))
        return 0
    if not a.model_dir or not (Path(a.model_dir) / "config.json").is_file():
        ap.error(f"--model-dir {a.model_dir!r} is not a HF directory with config.json (scripts/split_model.py --join)")
    site = Path(str(Path(a.model_dir)).rstrip("/") + ".site")
    if site.is_dir():
        sys.path.append(str(site))  # the carried KJV text / wheels; installed packages come first
    import torch

    from nbtrt import bench as B

    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    q = a.quick
    a.seq_len, a.eval_windows, a.agree_windows = (64, 2, 1) if q else (512, 4, 1)
    a.prompt_len = 16 if q else 32
    a.chat_prompts, a.chat_new_tokens = (2, 8) if q else (8, 48)
    a.serve_prompts, a.new_tokens = (8, 8) if q else (48, 32)
    a.decode_positions = 16 if q else 128
    a.eval_docs = (1 if q else 4) if a.eval_docs is None else a.eval_docs
    if q:
        a.calib_samples = min(a.calib_samples, 4)
    a.formats = [f for f in a.formats.split(",") if f]
    out_dir = Path(a.out)
    a.work = a.work or str(out_dir.parent / "gpu-real-work")
    OUT_PATH = out_dir / "gpu_real_weights.json"
    torch.backends.cuda.matmul.allow_tf32 = False
    R = {"benchmark": "gpu_real_weights", "machine": B.machine(), "device": a.device, "model_dir": a.model_dir,
         "quick": q, "argv": sys.argv[1:] if argv is None else argv,
         "site_appended": str(site) if site.is_dir() else None,
         "tolerance_relative_perplexity": TOLERANCE, "section_seconds": {}, "errors": {}}
    start = time.perf_counter()
    deadline = start + a.budget
    from nbtrt.quantize.calib import get_source

    try:
        R["text_source"] = get_source("kjv").description
    except Exception as e:  # the held-out text is every section's input
        sys.exit(f"error: the KJV text is not here ({e}); carry {site} (scripts/split_model.py --join writes it)")
    print(f"== setup: convert to a bf16 checkpoint, tokenize held-out windows ({a.device})", flush=True)
    c = Ctx(a)
    R["section_seconds"]["setup"] = time.perf_counter() - start
    for sec in a.sections.split(","):
        t = time.perf_counter()
        if t > deadline:
            R["errors"][sec] = f"skipped: past the {a.budget:.0f} s budget"
            continue
        print(f"== {sec} (t={t - start:.0f}s)", flush=True)
        try:
            if sec == "formats":
                sec_formats(c, R, deadline)
            else:
                globals()[f"sec_{sec}"](c, R)
        except Exception as e:
            R["errors"][sec] = traceback.format_exc()[-3000:]
            print(f"!! {sec} failed: {type(e).__name__}: {e}", flush=True)
        R["section_seconds"][sec] = time.perf_counter() - t
        R["total_seconds"] = time.perf_counter() - start
        _save(R)
    if a.cpu_json:
        R["compare_cpu"] = compare(R, json.loads(Path(a.cpu_json).read_text()))
        _save(R)
    print(summary(R))
    for sec, tb in R["errors"].items():
        print(f"--- {sec}:\n{tb[-1500:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
