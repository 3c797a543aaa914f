"""The serving benchmark: static batching against in-flight batching, same engine, same requests.

Two ways requests arrive:

- **all at once** (max throughput): every request is queued at t=0;
- **Poisson arrivals** at a sweep of rates (online serving): exponential gaps between requests.

Both servers are :class:`nbtrt.LLM` over the same engine: ``batching="static"`` takes the oldest
waiting requests as one static batch through ``Engine``'s generation loop (what nbtrt did before
in-flight batching: each batch waits for its longest request, newcomers wait for the batch),
``batching="inflight"`` the paged KV cache and the scheduler. Every request is greedy, ignores
end tokens and generates exactly its output length. Per run: output tokens/s, requests/s, TTFT,
TPOT and inter-token latency (ITL) P50/P95/P99, KV blocks in use (peak, mean).

>>> result = bench_serving("smollm2-135m-instruct", sharegpt_like(16, scale=0.05), rates=[2.0])  # doctest: +SKIP
>>> print(table(result))  # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import numbers
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import is_whole
from ..generate import SamplingParams
from .report import results_dir
from .runners import machine
from .workloads import Workload, sharegpt_like


def percentiles(values: list[float]) -> dict | None:
    """P50 / P95 / P99 and mean of ``values`` (None when empty)."""
    if not values:
        return None
    p50, p95, p99 = np.percentile(values, [50, 95, 99]).tolist()
    return {"p50": p50, "p95": p95, "p99": p99, "mean": float(np.mean(values)), "n": len(values)}


def run_requests(llm, prompts: list[list[int]], output_lens: list[int], arrivals: list[float] | None = None,
                 progress: bool = True, desc: str = "requests") -> dict:
    """Send the requests to ``llm`` (at ``arrivals`` seconds after the start, or all at once), wait
    for all of them, and measure."""
    from tqdm.auto import tqdm

    n = len(prompts)
    token_times: list[list[float]] = [[] for _ in range(n)]
    sent = [0.0] * n
    done = threading.Semaphore(0)
    blocks: list[int] = []
    running = True
    bar = tqdm(total=n, desc=desc, disable=not progress, leave=False)

    def on_output(i):
        def record(out):
            if out.delta_token_ids:
                token_times[i].append(time.perf_counter())
            if out.finished:
                bar.update(1)
                done.release()
        return record

    def monitor():
        while running:
            blocks.append(llm.stats()["kv_blocks_used"])
            time.sleep(0.01)

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    start = time.perf_counter()
    try:
        for i, (prompt, m) in enumerate(zip(prompts, output_lens)):
            if arrivals is not None:
                time.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
            sent[i] = time.perf_counter()
            llm.submit(prompt, SamplingParams(max_new_tokens=m), on_output=on_output(i))
        for _ in range(n):
            done.acquire()
    finally:
        running = False
        watcher.join()
        bar.close()
    wall = max(t[-1] for t in token_times if t) - start
    made = sum(len(t) for t in token_times)
    if made != sum(output_lens):
        raise RuntimeError(f"asked for {sum(output_lens)} tokens, got {made}")
    ttft = [t[0] - s for t, s in zip(token_times, sent)]
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in token_times if len(t) > 1]
    itl = [b - a for t in token_times for a, b in zip(t, t[1:])]
    latency = [t[-1] - s for t, s in zip(token_times, sent)]
    total = llm.stats()["kv_blocks_total"]
    return {"num_requests": n, "prompt_tokens": sum(map(len, prompts)), "generated_tokens": made, "wall_s": wall,
            "output_tokens_per_s": made / wall, "requests_per_s": n / wall,
            "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot), "itl_s": percentiles(itl),
            "latency_s": percentiles(latency),
            "kv_blocks": {"peak": max(blocks, default=0), "mean": float(np.mean(blocks)) if blocks else 0.0,
                          "total": total}}


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Arrival times (seconds) of ``n`` requests at ``rate`` requests/s on average."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    return np.concatenate([[0.0], np.cumsum(gaps[1:])]).tolist()


def bench_serving(model, workload: Workload | None = None, rates: list[float] | tuple[float, ...] = (), *,
                  static_batch_size: int = 8, max_batch_size: int = 64, max_num_tokens: int = 2048,
                  warmup_requests: int = 4, out: str | Path | None = None, progress: bool = True,
                  **llm_options) -> dict:
    """Static vs in-flight batching on ``workload`` (default: a ShareGPT-like mix of 16): all at once,
    then Poisson arrivals at each of ``rates`` (requests/s). ``model``: anything :class:`nbtrt.LLM`
    takes (a loaded torch engine is shared by both servers). Writes JSON to ``out`` when given.

    >>> result = bench_serving("smollm2-135m-instruct", sharegpt_like(16, scale=0.05), rates=[1.0])  # doctest: +SKIP
    """
    from ..serving.artifacts import release_static_cache, resolve_engine
    from ..serving.llm import LLM

    workload = workload or sharegpt_like(16, seed=0, scale=0.05)
    if not workload.lengths:
        raise ValueError(f"workload {workload.name!r} has no requests; give it at least one")
    if not is_whole(static_batch_size, 1):
        raise ValueError(f"static_batch_size={static_batch_size!r} must be an integer >= 1")
    bad = [r for r in rates if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 < r < math.inf]
    if bad:
        raise ValueError(f"rates {bad} are not arrival rates: each is a number of requests/s > 0")
    opts = {k: llm_options.pop(k) for k in ("device", "dtype", "work_dir") if k in llm_options}
    engine = resolve_engine(model, "torch", max_batch_size=max(static_batch_size, max_batch_size),
                            max_input_len=max(n for n, _ in workload.lengths),
                            max_seq_len=max(a + b for a, b in workload.lengths), **opts)
    prompts = workload.prompts(engine.config.vocab_size)
    outs = [n for _, n in workload.lengths]
    seq_len = max(len(p) + n for p, n in zip(prompts, outs))
    runs = []
    # the same prompts run once per rate (and the first few as warm-up): a prefix cache would serve
    # the repeats from memory, which no real mix allows and static batching cannot; off unless asked
    llm_options.setdefault("prefix_caching", False)
    servers = [("static", dict(batching="static", max_batch_size=static_batch_size)),
               ("inflight", dict(batching="inflight", max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
                                 **llm_options))]
    for batching, options in servers:
        with LLM(engine, max_seq_len=seq_len, max_input_len=seq_len, verbose=progress, **options) as llm:
            k = min(warmup_requests, len(prompts))  # compile, capture, allocate: not timed
            run_requests(llm, prompts[:k], outs[:k], progress=False)
            for rate in (None, *rates):
                arrivals = None if rate is None else poisson_arrivals(len(prompts), rate, seed=workload.seed)
                label = "all at once" if rate is None else f"poisson {rate:g} req/s"
                r = run_requests(llm, prompts, outs, arrivals, progress, desc=f"{batching}, {label}")
                runs.append({"batching": batching, "arrival": label, "rate": rate, **r,
                             "max_batch_size": llm.limits.max_batch_size,
                             "preemptions": llm.stats()["preemptions"]})
        release_static_cache(engine)
    result = {"model": str(getattr(engine, "engine_dir", model)), "workload": {"name": workload.name,
              "lengths": workload.lengths}, "machine": machine(), "runs": runs,
              "settings": {"static_batch_size": static_batch_size, "max_batch_size": max_batch_size,
                           "max_num_tokens": max_num_tokens, "device": str(engine.device),
                           "dtype": str(engine.dtype).replace("torch.", "")}}
    if out is not None:
        from .._io import write_json

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(out), result)
    return result


def rows(result: dict) -> list[dict]:
    """One flat row per run (for a table or a DataFrame)."""
    ms = lambda d, q="p50": None if d is None else round(1e3 * d[q], 1)  # noqa: E731
    return [{"batching": r["batching"], "arrival": r["arrival"], "requests/s": round(r["requests_per_s"], 2),
             "output tokens/s": round(r["output_tokens_per_s"], 1),
             "TTFT P50 ms": ms(r["ttft_s"]), "TTFT P99 ms": ms(r["ttft_s"], "p99"),
             "TPOT P50 ms": ms(r["tpot_s"]), "ITL P99 ms": ms(r["itl_s"], "p99"),
             "KV blocks peak": r["kv_blocks"]["peak"]} for r in result["runs"]]


def table(result: dict) -> str:
    """The runs as a markdown table."""
    data = rows(result)
    head = list(data[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join("" if row[h] is None else str(row[h]) for h in head) + " |" for row in data]
    return "\n".join(lines)


def figure(result: dict):
    """Requests/s and TTFT P50 of static vs in-flight batching, per arrival pattern (plotly)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("throughput (requests/s)", "time to first token P50 (s)"))
    for batching in ("static", "inflight"):
        runs = [r for r in result["runs"] if r["batching"] == batching]
        x = [r["arrival"] for r in runs]
        fig.add_bar(x=x, y=[r["requests_per_s"] for r in runs], name=batching, legendgroup=batching, row=1, col=1)
        fig.add_bar(x=x, y=[r["ttft_s"]["p50"] for r in runs], name=batching, legendgroup=batching,
                    showlegend=False, row=1, col=2)
    fig.update_layout(title="Static vs in-flight batching", barmode="group", height=380)
    return fig


def add_cli(sub) -> None:
    p = sub.add_parser("bench-serving", help="static vs in-flight batching: tokens/s, requests/s, TTFT/TPOT/ITL")
    p.add_argument("model", help="a zoo name, HF directory, checkpoint or engine directory")
    p.add_argument("--requests", type=int, default=16, help="ShareGPT-like requests")
    p.add_argument("--scale", type=float, default=0.05, help="ShareGPT-like length scale (1.0: the real lengths)")
    p.add_argument("--rates", default="", help="Poisson arrival rates to sweep (requests/s), comma-separated")
    p.add_argument("--static-batch-size", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=64, help="in-flight: sequences a step")
    p.add_argument("--max-num-tokens", type=int, default=2048, help="in-flight: tokens a step")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", default=None, help="write the JSON here (e.g. benchmarks/results/serving_cpu.json)")

    def run(a):
        try:
            rates = [float(r) for r in a.rates.split(",") if r.strip()]
        except ValueError:
            raise ValueError(f"--rates {a.rates!r}: comma-separated numbers (requests/s), e.g. 0.5,1,2") from None
        result = bench_serving(a.model, sharegpt_like(a.requests, seed=0, scale=a.scale),
                               rates, static_batch_size=a.static_batch_size,
                               max_batch_size=a.max_batch_size, max_num_tokens=a.max_num_tokens, device=a.device,
                               dtype=a.dtype, out=a.out)
        print(table(result))

    p.set_defaults(run=run)


def latest_gpu(directory: str | Path | None = None) -> dict | None:
    """The newest committed ``benchmarks/serving_gpu.py`` result (``serving_gpu*.json``) in
    :func:`results_dir` (``directory``), or None."""
    found = results_dir(directory)
    paths = sorted(found.glob("serving_gpu*.json")) if found is not None else []
    return json.loads(paths[-1].read_text()) if paths else None


def gpu_rows(R: dict) -> list[dict]:
    """Static vs in-flight rows of a ``benchmarks/serving_gpu.py`` result."""
    s, i = R["static"], R["inflight"]
    out = []
    for key in sorted(k for k in i if k.startswith("sharegpt")):
        st = s.get(key)
        out.append({"workload": f"ShareGPT-like {key[8:]} requests",
                    "static req/s": round(st["requests_per_s"], 2) if st else None,
                    "in-flight req/s": round(i[key]["requests_per_s"], 2),
                    "static tok/s": round(st["tokens_per_s"]) if st else None,
                    "in-flight tok/s": round(i[key]["output_tokens_per_s"]),
                    "in-flight TTFT P50 s": round(i[key]["ttft_s"]["p50"], 2)})
    f = i["fixed128_full_load"]
    out.append({"workload": f"fixed 128/128, {f['num_requests']} requests", "in-flight tok/s": round(f["output_tokens_per_s"])})
    out.append({"workload": "batch 1, 128/128",
                "static tok/s": round(s["batch1"]["tokens_per_s"], 1) if "batch1" in s else None,
                "in-flight tok/s": round(i["batch1"]["tokens_per_s"], 1)})
    if "greedy_agreement" in i:
        out.append({"workload": f"greedy agreement with the static engine: {100 * i['greedy_agreement']:.2f}% of tokens"})
    return out
