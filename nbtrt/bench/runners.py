"""Runners (HF or an nbtrt engine, generating for a batch of prompts) and how one is measured:
wall time, TTFT / TPOT / latency per request, peak memory."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .._version import __version__
from ..generate import GenerationState, SamplingParams, generate_tokens
from .stats import request_metrics, summarize
from .workloads import Workload

SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # the precision labels of results


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
        # each repeat's own figure: how far they disagree tells whether the machine was quiet
        "tokens_per_s_repeats": [t / w for t, w in zip(produced, walls)],
        **({"load_average_1m": round(os.getloadavg()[0], 2)} if hasattr(os, "getloadavg") else {}),
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
