"""Benchmarks: HuggingFace vs nbtrt engines on fixed-shape sweeps and a ShareGPT-like request mix.

Every runner is measured the same way: requests run in static batches (all rows start
together, each stops at its own output length), one host synchronisation per generated
token (what a streaming client needs), warm-up first, then repeats. Per runner and workload:

- ``ttft_s``     time to first token (batch start -> first token on the host), P50 / P95 / mean
- ``tpot_s``     time per output token after the first, per request
- ``latency_s``  end-to-end latency per request (batch start -> its last token)
- ``tokens_per_s``   generated tokens / wall time, context phase included (median over repeats)
- ``requests_per_s`` requests / wall time (median over repeats)
- ``peak_memory_bytes``  CUDA allocator peak on GPU; peak resident set size on CPU

A runner that cannot run here is listed with ``status: "skipped"`` and the reason; one whose
build or load raised, with ``status: "failed"`` and the error.

>>> result = bench("smollm2-135m-instruct", runners=["hf-eager", "nbtrt-torch"],
...                workloads=[fixed(batch=1, input_len=32, output_len=16)])  # doctest: +SKIP
>>> print(table(result))  # doctest: +SKIP
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .generate import GenerationState, SamplingParams, generate_tokens


SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # the precision labels of results


# ------------------------------------------------------------------------------ statistics
def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks (numpy's)."""
    if not values:
        raise ValueError("percentile of no values")
    return float(np.percentile(values, q))


def summarize(values: list[float]) -> dict:
    """P50, P95, mean, min, max and count of a list of timings."""
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "mean": sum(values) / len(values),
            "min": min(values), "max": max(values), "n": len(values)}


def request_metrics(start: float, step_times: list[float], lengths: list[int]) -> list[dict]:
    """Per-request TTFT / TPOT / latency from one static batch: row b's k-th token arrived at step k."""
    out = []
    for n in lengths:
        first, last = step_times[0] - start, step_times[n - 1] - start
        out.append({"ttft": first, "latency": last, "tpot": (last - first) / (n - 1) if n > 1 else None})
    return out


# ------------------------------------------------------------------------------ workloads
@dataclass(frozen=True)
class Workload:
    """A list of requests: (prompt length, output length) pairs; prompt tokens are drawn at run time."""

    name: str
    lengths: tuple[tuple[int, int], ...]
    batch_size: int | None = None  # None: the runner's max batch size (static batching)
    repeats: int = 3
    seed: int = 0

    def prompts(self, vocab_size: int) -> list[list[int]]:
        g = np.random.default_rng(self.seed)
        return [g.integers(0, vocab_size, n).tolist() for n, _ in self.lengths]


def fixed(batch: int, input_len: int, output_len: int, repeats: int = 3) -> Workload:
    """``batch`` identical-shape requests run as one batch."""
    return Workload(f"fixed b{batch} in{input_len} out{output_len}", ((input_len, output_len),) * batch,
                    batch_size=batch, repeats=repeats)


# ShareGPT as summarised by the vLLM paper (Kwon et al., SOSP 2023, Fig. 11): mean prompt 161.31
# tokens, mean output 337.99 tokens, both long-tailed. We draw log-normal lengths with those
# means; the spreads (sigma) are our assumption, chosen to give medians near 100 and 250.
SHAREGPT_SHAPE = {"input_mean": 161.31, "input_sigma": 1.0, "output_mean": 337.99, "output_sigma": 0.8}


def sharegpt_like(num_prompts: int = 100, seed: int = 0, scale: float = 1.0, max_input_len: int = 1024,
                  max_output_len: int = 1024, batch_size: int | None = None) -> Workload:
    """A ShareGPT-shaped request mix (no dataset download). ``scale`` shrinks both lengths (e.g. 0.125
    for a CPU run); lengths are clipped to [4, max_input_len] and [2, max_output_len].

    >>> w = sharegpt_like(100, seed=0)
    >>> len(w.lengths), w.lengths == sharegpt_like(100, seed=0).lengths
    (100, True)
    """
    g = np.random.default_rng(seed)

    def draw(mean: float, sigma: float, lo: int, hi: int) -> np.ndarray:
        mu = math.log(mean * scale) - sigma ** 2 / 2  # so that the mean is mean * scale
        return np.clip(np.round(g.lognormal(mu, sigma, num_prompts)), lo, hi).astype(int)

    s = SHAREGPT_SHAPE
    ins = draw(s["input_mean"], s["input_sigma"], 4, max_input_len)
    outs = draw(s["output_mean"], s["output_sigma"], 2, max_output_len)
    return Workload(f"sharegpt-like n{num_prompts} seed{seed} scale{scale:g}",
                    tuple(zip(ins.tolist(), outs.tolist())), batch_size=batch_size, repeats=1, seed=seed)


# ------------------------------------------------------------------------------ runners
@dataclass
class Runner:
    """Something that generates for a batch of prompts: ``run(prompts, lengths, tick)`` generates
    ``lengths[b]`` tokens for row b, calls ``tick()`` once per decoding step as its tokens reach the
    host, and returns the number of tokens each row produced."""

    name: str
    precision: str
    device: str
    max_batch_size: int
    run: Callable[[list[list[int]], list[int], Callable[[], None]], list[int]] | None = None
    skipped: str | None = None  # the reason this runner cannot run here
    failed: str | None = None  # the error its build or load raised
    mixed_skipped: str | None = None  # the reason it does not run request mixes (varying shapes)
    info: dict = field(default_factory=dict)


def engine_runner(engine, name: str | None = None, precision: str | None = None) -> Runner:
    """A runner over any nbtrt Engine, through the one generation loop."""

    def run(prompts, lengths, tick):
        params = SamplingParams(max_new_tokens=max(lengths), stop_token_ids=())  # greedy, no EOS stop
        state = GenerationState(prompts)
        for _ in generate_tokens(engine, prompts, params, state=state):
            tick()
            for b, toks in enumerate(state.tokens):
                if len(toks) >= lengths[b]:
                    state.finished[b] = True
        return [len(t) for t in state.tokens]

    dtype = str(getattr(engine, "dtype", engine.config.dtype)).replace("torch.", "")
    prec = precision or getattr(engine, "quant", None) or SHORT_DTYPE.get(dtype, dtype)
    label = name or f"nbtrt-{engine.backend}" + ("-compiled" if getattr(engine, "compiled", False) else "")
    return Runner(label, prec, str(engine.device), engine.limits.max_batch_size, run,
                  info={"compile_seconds": getattr(engine, "compile_seconds", None)})


def hf_runner(model, compile: bool = False, max_batch_size: int = 64, pad_token_id: int = 0) -> Runner:
    """``transformers`` generate: eager (dynamic cache), or the peer a user would pick — the static
    cache, which makes generate compile the decoding step (torch.compile, mode reduce-overhead)."""
    from transformers import StoppingCriteria
    from transformers.generation.streamers import BaseStreamer

    class Ticks(BaseStreamer):
        def __init__(self, tick):
            self.tick, self.calls = tick, 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:  # the first call carries the prompt
                self.tick()

        def end(self):
            pass

    class Lengths(StoppingCriteria):  # each row is done at its own length
        def __init__(self, lengths, width):
            self.lengths, self.width = lengths, width

        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids.shape[1] - self.width) >= self.lengths

    device = model.device

    def run(prompts, lengths, tick):
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        # min_new_tokens keeps EOS from ending a row early: every runner makes exactly `lengths` tokens
        extra = {"min_new_tokens": max(lengths)}
        if compile:
            from transformers import CompileConfig

            cc = CompileConfig()
            cc._compile_all_devices = device.type != "cuda"  # transformers compiles on CUDA only by default
            extra.update(cache_implementation="static", compile_config=cc)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lengths), do_sample=False,
                                 streamer=Ticks(tick), pad_token_id=pad_token_id,
                                 stopping_criteria=[Lengths(torch.tensor(lengths, device=device), width)], **extra)
        steps = out.shape[1] - width
        return [min(n, steps) for n in lengths]

    dtype = SHORT_DTYPE[str(next(model.parameters()).dtype).replace("torch.", "")]
    why = ("transformers recompiles its static-cache graph for every new batch shape, and a request mix "
           "has a new one per batch; measured on fixed shapes") if compile else None
    return Runner("hf-compile" if compile else "hf-eager", dtype, str(device), max_batch_size, run, mixed_skipped=why)


def skipped(name: str, precision: str, reason: str) -> Runner:
    return Runner(name, precision, "-", 0, skipped=reason)


# ------------------------------------------------------------------------------ memory
class _PeakMemory:
    """CUDA allocator peak, or the peak resident set size sampled on CPU (a background thread)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._stop = threading.Event()
            self.peak = _rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())

    @property
    def kind(self) -> str:
        return "cuda_allocator_peak" if self.cuda else "cpu_peak_rss"


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the process-lifetime peak is the best there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------ measuring
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(runner: Runner, workload: Workload, vocab_size: int, warmup: int = 1) -> dict:
    """Run ``workload`` on ``runner``: warm-up, then ``workload.repeats`` timed passes."""
    base = {"runner": runner.name, "precision": runner.precision, "workload": workload.name, "device": runner.device}
    if runner.skipped or runner.failed:
        return {**base, "status": "skipped" if runner.skipped else "failed", "reason": runner.skipped or runner.failed}
    if runner.mixed_skipped and len(set(workload.lengths)) > 1:
        return {**base, "status": "skipped", "reason": runner.mixed_skipped}
    prompts = workload.prompts(vocab_size)
    outs = [n for _, n in workload.lengths]
    bs = workload.batch_size or runner.max_batch_size
    if bs > runner.max_batch_size:
        return {**base, "status": "skipped", "reason": f"batch {bs} exceeds the runner's max batch size {runner.max_batch_size}"}
    batches = [(prompts[i:i + bs], outs[i:i + bs]) for i in range(0, len(prompts), bs)]
    for _ in range(warmup):  # compile, allocate, autotune: the first batch at full shape
        runner.run(*batches[0], lambda: None)
    _sync(runner.device)
    walls, per_request, produced = [], [], []
    with _PeakMemory(runner.device) as mem:
        for _ in range(workload.repeats):
            t_all = time.perf_counter()
            made = []
            for p, n in batches:
                steps: list[float] = []
                _sync(runner.device)
                t0 = time.perf_counter()
                got = runner.run(p, n, lambda: steps.append(time.perf_counter()))
                if got != n:
                    raise RuntimeError(f"{runner.name}: asked for {n} tokens per request, got {got}")
                per_request += request_metrics(t0, steps, n)
                made += got
            walls.append(time.perf_counter() - t_all)
            produced.append(sum(made))
    tpots = [r["tpot"] for r in per_request if r["tpot"] is not None]
    return {
        **base, "status": "ok", "batch_size": bs, "num_requests": len(prompts), "repeats": workload.repeats,
        "prompt_tokens": sum(len(p) for p in prompts), "generated_tokens": produced[0],
        "tokens_per_s": float(np.median([t / w for t, w in zip(produced, walls)])),
        "requests_per_s": float(np.median([len(prompts) / w for w in walls])),
        "wall_s": summarize(walls),
        "ttft_s": summarize([r["ttft"] for r in per_request]),
        "tpot_s": summarize(tpots) if tpots else None,
        "latency_s": summarize([r["latency"] for r in per_request]),
        "peak_memory_bytes": mem.peak, "memory_kind": mem.kind, **({"info": runner.info} if runner.info else {}),
    }


def machine() -> dict:
    """Where a result was measured: machine, GPU, versions, date."""
    import transformers

    from . import __version__

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "nbtrt": __version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    if hasattr(os, "getloadavg"):  # CPU timings on a shared machine are only as good as its idleness
        info["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def run_all(runners: list[Runner], workloads: list[Workload], vocab_size: int, *, model: str = "",
            warmup: int = 1, progress: bool = True) -> dict:
    """Measure every runner on every workload; skipped and failed runners are kept with their reason."""
    from tqdm.auto import tqdm

    results = []
    jobs = [(r, w) for r in runners for w in workloads]
    for r, w in tqdm(jobs, desc="bench", disable=not progress):
        results.append(measure(r, w, vocab_size, warmup=warmup))
    return {"model": model, "machine": machine(), "workloads": [{"name": w.name, "batch_size": w.batch_size,
            "repeats": w.repeats, "lengths": w.lengths} for w in workloads], "results": results}


# ------------------------------------------------------------------------------ building runners
RUNNERS = ("hf-eager", "hf-compile", "nbtrt-torch", "nbtrt-torch-compiled", "nbtrt-onnxruntime", "nbtrt-tensorrt")


def make_runners(src: str | Path, names: list[str] | tuple[str, ...] = RUNNERS, *, device: str | None = None,
                 dtype: str = "float32", precisions: list[str] | tuple[str, ...] = (),
                 quantized_runners: list[str] | tuple[str, ...] | None = None, skip: dict[str, str] | None = None,
                 max_batch_size: int = 8, max_input_len: int = 512, max_seq_len: int = 1024,
                 work_dir: str | Path = "work/bench") -> list[Runner]:
    """Runners for a HF model (zoo name or directory): HF itself, and every listed nbtrt backend built
    from the converted checkpoint in ``dtype`` and from each quantized checkpoint in ``precisions``
    (``nbtrt.quantize`` formats, e.g. "int8_wo", "int4_wo"), for the runners in ``quantized_runners``
    (default: every nbtrt runner). Unavailable ones come back skipped, and so do those in ``skip``
    (runner -> the reason it is not run); one whose build or load raises comes back failed."""
    from . import build, convert, load
    from ._io import load_hf_model
    from .convert import resolve_source
    from .engine import BACKENDS, _ensure_backends
    from .model import TORCH_DTYPES

    _ensure_backends()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    src = resolve_source(src)
    work = Path(work_dir)
    unknown = sorted(set(names) - set(RUNNERS))
    if unknown:
        raise ValueError(f"unknown runners {unknown}; known: {list(RUNNERS)}")
    short = SHORT_DTYPE[dtype]
    ckpts: dict[str, Path] = {}

    def checkpoint(prec: str) -> Path:  # converted once, quantized once per format
        if prec not in ckpts:
            if prec == short:
                ckpts[prec] = convert(src, work / f"ckpt-{short}", dtype=dtype, overwrite=True)
            else:
                from .quantize import quantize

                ckpts[prec] = quantize(checkpoint(short), work / f"ckpt-{prec}", prec, overwrite=True)
        return ckpts[prec]

    runners: list[Runner] = []
    hf = None
    for name in names:
        if skip and name in skip:
            runners.append(skipped(name, short, skip[name]))
            continue
        if name.startswith("hf-"):
            hf = hf or load_hf_model(src, dtype=TORCH_DTYPES[dtype]).to(device).eval()
            runners.append(hf_runner(hf, compile=name == "hf-compile", max_batch_size=max_batch_size,
                                     pad_token_id=_pad_id(hf)))
            continue
        backend = name.removeprefix("nbtrt-").removesuffix("-compiled")
        cls = BACKENDS.get(backend)
        reason = "backend not registered in this nbtrt" if cls is None else cls.available()
        quantized = quantized_runners is None or name in quantized_runners
        for prec in (short, *(precisions if quantized else ())):
            if reason:
                runners.append(skipped(name, prec, reason))
                continue
            opts = {"compile": name.endswith("-compiled")} if backend == "torch" else {}
            try:
                edir = build(checkpoint(prec), work / f"engine-{name}-{prec}", backend=backend,
                             max_batch_size=max_batch_size, max_input_len=max_input_len, max_seq_len=max_seq_len,
                             overwrite=True, **opts)
                engine = load(edir, **({"device": device} if backend == "torch" else {}))
            except (RuntimeError, ValueError, NotImplementedError) as e:  # e.g. a format this backend lacks
                runners.append(Runner(name, prec, "-", 0, failed=f"{type(e).__name__}: {e}"))
                continue
            runners.append(engine_runner(engine, name=name, precision=prec))
    return runners


def _pad_id(model) -> int:
    gen = getattr(model, "generation_config", None)
    for v in (getattr(gen, "pad_token_id", None), getattr(gen, "eos_token_id", None)):
        if v is not None:
            return int(v[0] if isinstance(v, list) else v)
    return 0


def bench(src: str | Path, runners: list[str] | tuple[str, ...] = RUNNERS, workloads: list[Workload] | None = None,
          *, device: str | None = None, dtype: str = "float32", precisions: tuple[str, ...] = (),
          quantized_runners: tuple[str, ...] | None = None, skip: dict[str, str] | None = None,
          max_batch_size: int = 8, work_dir: str | Path = "work/bench", out: str | Path | None = None,
          warmup: int = 1) -> dict:
    """Build the runners for ``src`` and measure them; write JSON to ``out`` when given. Engines are
    built with the limits the workloads need (max batch, longest prompt + output).

    >>> r = bench("smollm2-135m-instruct", ["hf-eager", "nbtrt-torch"], [fixed(1, 32, 16)])  # doctest: +SKIP
    """
    from ._io import write_json
    from .convert import resolve_source

    workloads = workloads or [fixed(1, 128, 64)]
    max_batch_size = max([max_batch_size] + [w.batch_size or 0 for w in workloads])
    max_input = max(n for w in workloads for n, _ in w.lengths)
    # static batches pad prompts to the longest and run to the longest output
    max_seq_len = max_input + max(m for w in workloads for _, m in w.lengths)
    built = make_runners(src, runners, device=device, dtype=dtype, precisions=precisions,
                         quantized_runners=quantized_runners, skip=skip, max_batch_size=max_batch_size,
                         max_input_len=max_input, max_seq_len=max_seq_len, work_dir=work_dir)
    from .convert import hf_config

    vocab = int(hf_config(resolve_source(src))["vocab_size"])
    result = run_all(built, workloads, vocab, model=str(src), warmup=warmup)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(out, result)
    return result


# ------------------------------------------------------------------------------ reporting
def rows(result: dict) -> list[dict]:
    """One flat row per (runner, precision, workload) with speedups over hf-eager on the same workload."""
    base = {r["workload"]: r["tokens_per_s"] for r in result["results"]
            if r["status"] == "ok" and r["runner"] == "hf-eager"}
    out = []
    for r in result["results"]:
        row = {"runner": r["runner"], "precision": r["precision"], "workload": r["workload"], "status": r["status"]}
        if r["status"] == "ok":
            row.update(tokens_per_s=r["tokens_per_s"], requests_per_s=r["requests_per_s"],
                       ttft_p50_ms=1e3 * r["ttft_s"]["p50"], tpot_p50_ms=1e3 * r["tpot_s"]["p50"] if r["tpot_s"] else None,
                       latency_p50_s=r["latency_s"]["p50"], latency_p95_s=r["latency_s"]["p95"],
                       peak_mem_mib=r["peak_memory_bytes"] / 2 ** 20,
                       speedup_vs_hf_eager=r["tokens_per_s"] / base[r["workload"]] if r["workload"] in base else None)
        else:
            row["reason"] = r.get("reason", "")
        out.append(row)
    return out


def table(result: dict) -> str:
    """A fixed-width text table of :func:`rows`."""
    lines = [f"{'runner':24} {'prec':8} {'workload':38} {'tok/s':>9} {'req/s':>7} {'TTFT ms':>8} {'TPOT ms':>8} "
             f"{'p50 s':>7} {'p95 s':>7} {'MiB':>7} {'x HF':>6}"]
    for r in rows(result):
        if r["status"] != "ok":
            lines.append(f"{r['runner']:24} {r['precision']:8} {r['workload']:38} {r['status']}: {r['reason']}")
            continue
        f = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        lines.append(f"{r['runner']:24} {r['precision']:8} {r['workload']:38} {r['tokens_per_s']:9.1f} "
                     f"{r['requests_per_s']:7.2f} {r['ttft_p50_ms']:8.1f} {f(r['tpot_p50_ms'], '8.2f')} "
                     f"{r['latency_p50_s']:7.2f} {r['latency_p95_s']:7.2f} {r['peak_mem_mib']:7.0f} "
                     f"{f(r['speedup_vs_hf_eager'], '6.2f')}")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """A markdown table of :func:`rows`, one line per runner and precision, one column per
    workload: tokens/s and the speedup over HF eager on that workload. Skipped and failed runners
    are listed underneath with their reasons. The README's performance tables are made of it."""
    table_rows = rows(result)
    workloads = list(dict.fromkeys(r["workload"] for r in table_rows))
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for r in table_rows:
        if r["status"] == "ok":
            x = r["speedup_vs_hf_eager"]
            cells.setdefault((r["runner"], r["precision"]), {})[r["workload"]] = (
                f"{r['tokens_per_s']:.1f}" + (f" ({x:.2f}×)" if x is not None else ""))
    lines = ["| runner | precision | " + " | ".join(workloads) + " |", "|---|---|" + "---|" * len(workloads)]
    lines += [f"| {name} | {prec} | " + " | ".join(c.get(w, "-") for w in workloads) + " |"
              for (name, prec), c in cells.items()]
    reasons = sorted({(r["status"], r["runner"], r["reason"]) for r in table_rows if r["status"] != "ok"})
    if reasons:
        lines += [""] + [f"{status.capitalize()}: `{name}`: {reason}" for status, name, reason in reasons]
    return "\n".join(lines)


def add_cli(sub) -> None:
    p = sub.add_parser("bench", help="measure HF and nbtrt engines: TTFT, TPOT, latency P50/P95, tokens/s, memory")
    p.add_argument("model", help="a zoo name or a HF model directory")
    p.add_argument("--runners", default="hf-eager,nbtrt-torch", help=f"comma-separated, from {','.join(RUNNERS)}")
    p.add_argument("--precisions", default="", help="also quantized checkpoints (nbtrt.quantize formats), e.g. int8_wo,int4_wo")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch", default="1", help="fixed-shape batch sizes, comma-separated")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sharegpt", type=int, default=0, help="also run a ShareGPT-like mix of this many requests")
    p.add_argument("--scale", type=float, default=1.0, help="ShareGPT-like length scale (e.g. 0.125 on CPU)")
    p.add_argument("--max-batch-size", type=int, default=8, help="static batch size of the ShareGPT-like mix")
    p.add_argument("--work", default="work/bench")
    p.add_argument("--out", default=None, help="write the JSON here")

    def run(a):
        loads = [fixed(int(b), a.input_len, a.output_len, a.repeats) for b in a.batch.split(",") if b]
        if a.sharegpt:
            loads.append(sharegpt_like(a.sharegpt, scale=a.scale, max_input_len=1024, max_output_len=1024))
        result = bench(a.model, [r for r in a.runners.split(",") if r], loads, device=a.device, dtype=a.dtype,
                       precisions=tuple(q for q in a.precisions.split(",") if q), max_batch_size=a.max_batch_size,
                       work_dir=a.work, out=a.out)
        print(table(result))

    p.set_defaults(run=run)


# ------------------------------------------------------------------------------ committed results and figures
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"  # committed results (a source checkout)


def latest(prefix: str = "gpu_nvidia", directory: str | Path = RESULTS) -> tuple[Path, dict] | None:
    """The newest committed result whose file name starts with ``prefix`` (names end in the date).
    The default: the last full ``benchmarks/gpu.py`` run (``gpu_<device>_<date>.json``; other
    ``gpu_*`` files hold focused experiments).

    >>> path, gpu = latest("gpu_nvidia")  # doctest: +SKIP
    """
    import json

    found = sorted(p for p in Path(directory).glob(f"{prefix}*.json") if not p.stem.endswith("_quick"))
    return (found[-1], json.loads(found[-1].read_text())) if found else None


def gpu_runs(gpu: dict) -> list[dict]:
    """The measurements of a benchmarks/gpu.py result in the shape of :func:`run_all`'s, each with its model."""
    runs = [{**r, "model": model} for model, res in gpu.get("small", {}).items()
            for r in res.values() if isinstance(r, dict) and "runner" in r]
    for key in ("sweep", "mix"):
        section = gpu.get(key) or {}
        runs += [{**r, "model": section.get("model", "")} for r in section.get("results", [])]
    return runs


def llama8b_rows(gpu: dict) -> list[dict]:
    """The 8B decode table of a benchmarks/gpu.py result: step time against the bandwidth floor per precision."""
    rows = []
    for prec, v in gpu.get("llama8b", {}).get("variants", {}).items():
        if "tokens_per_s" in v:
            rows.append({"precision": prec, "weights_GB": v["weight_bytes"] / 1e9, "step_ms": 1e3 * v["decode_step_s"],
                         "floor_ms": 1e3 * v["bandwidth_floor_s"], "step_over_floor": v["step_over_floor"],
                         "achieved_TB_s": v["achieved_tb_s"], "tokens_per_s": v["tokens_per_s"],
                         "speedup_vs_bf16": v["speedup_vs_bf16"], "ttft_ms": 1e3 * v["ttft_s"]})
        else:
            rows.append({"precision": prec, "skipped": v.get("skipped") or v.get("error")})
    return rows


def _label(r: dict) -> str:
    return f"{r['runner']} {r['precision']}"


def _bars(groups: dict[str, dict[str, float]], title: str, y_title: str, log_y: bool = False):
    """Grouped bars: {series: {category: value}}."""
    import plotly.graph_objects as go

    fig = go.Figure([go.Bar(name=name, x=list(vals), y=list(vals.values()), text=[f"{v:.3g}" for v in vals.values()],
                            textposition="outside") for name, vals in groups.items()])
    fig.update_layout(barmode="group", title=title, yaxis_title=y_title, template="plotly_white", height=420)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def fig_tokens_vs_batch(runs: list[dict], title: str = "Generation throughput vs batch size"):
    """Tokens/s (context phase included) against batch size, one line per runner and precision."""
    import plotly.graph_objects as go

    lines: dict[str, list[tuple[int, float]]] = {}
    for r in runs:
        if r["status"] == "ok" and r["workload"].startswith("fixed"):
            lines.setdefault(_label(r), []).append((r["batch_size"], r["tokens_per_s"]))
    fig = go.Figure([go.Scatter(x=[b for b, _ in sorted(v)], y=[t for _, t in sorted(v)], name=k, mode="lines+markers")
                     for k, v in lines.items()])
    fig.update_layout(title=title, xaxis_title="batch size", yaxis_title="tokens/s", template="plotly_white",
                      height=420, xaxis_type="log", yaxis_type="log")
    return fig


def fig_latency(runs: list[dict], workload: str):
    """TTFT and end-to-end latency P50 / P95 per runner on one workload."""
    ok = [r for r in runs if r["status"] == "ok" and r["workload"] == workload]
    groups = {f"{m} {p.upper()}": {_label(r): r[key][p] for r in ok}
              for key, m in (("ttft_s", "TTFT"), ("latency_s", "latency")) for p in ("p50", "p95")}
    return _bars(groups, f"Latency percentiles: {workload}", "seconds", log_y=True)


def fig_speedup(runs: list[dict], baseline: str = "hf-eager"):
    """Tokens/s over the baseline runner's on the same model and workload."""
    base = {(r.get("model"), r["workload"]): r["tokens_per_s"] for r in runs
            if r["status"] == "ok" and r["runner"] == baseline}
    groups: dict[str, dict[str, float]] = {}
    for r in runs:
        key = (r.get("model"), r["workload"])
        if r["status"] == "ok" and r["runner"] != baseline and key in base:
            groups.setdefault(_label(r), {})[" ".join(str(k) for k in key if k)] = r["tokens_per_s"] / base[key]
    return _bars(groups, f"Speedup over {baseline} (tokens/s, context phase included)", f"x {baseline}")


def fig_memory(runs: list[dict]):
    """Peak memory per runner and workload (GPU allocator peak, or CPU resident set)."""
    groups: dict[str, dict[str, float]] = {}
    for r in runs:
        if r["status"] == "ok":
            groups.setdefault(_label(r), {})[r["workload"]] = r["peak_memory_bytes"] / 2 ** 30
    kind = next((r["memory_kind"] for r in runs if r["status"] == "ok"), "")
    return _bars(groups, f"Peak memory ({kind})", "GiB")


def quality_speed(runs: list[dict], quant_rows: list[dict], workload: str | None = None) -> list[dict]:
    """Join speed per precision (tokens/s of nbtrt runners) with the quantization report's
    perplexity per format (rows named as the precision; fp32 is the report's float32)."""
    ppl = {r["name"]: r["perplexity"] for r in quant_rows if r.get("name")}
    # report names of the same arithmetic (the engine's on-the-fly W8A8 is SmoothQuant's layout unsmoothed)
    alias = {"fp32": "float32", "w8a8": "int8_sq"}
    out = []
    for r in runs:
        if r["status"] != "ok" or not r["runner"].startswith("nbtrt") or (workload and r["workload"] != workload):
            continue
        p = ppl.get(alias.get(r["precision"], r["precision"]))
        if p is not None:
            out.append({"runner": r["runner"], "precision": r["precision"], "workload": r["workload"],
                        "tokens_per_s": r["tokens_per_s"], "perplexity": p})
    return out


def fig_quality_speed(points: list[dict]):
    """Perplexity against tokens/s per precision: the deployment trade-off in one picture."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for runner in dict.fromkeys(p["runner"] for p in points):
        pts = [p for p in points if p["runner"] == runner]
        fig.add_trace(go.Scatter(x=[p["tokens_per_s"] for p in pts], y=[p["perplexity"] for p in pts], name=runner,
                                 mode="markers+text", text=[p["precision"] for p in pts], textposition="top center"))
    fig.update_layout(title="Perplexity vs speed per precision", xaxis_title="tokens/s",
                      yaxis_title="perplexity (lower is better)", template="plotly_white", height=420)
    return fig
