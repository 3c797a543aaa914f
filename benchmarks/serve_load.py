"""Load on `nbtrt serve` over loopback: N streaming clients at once, a few hundred greedy
requests through the official openai client; client-side TTFT percentiles and throughput.

    python benchmarks/serve_load.py                                  # tiny random-weight Llama, CPU
    python benchmarks/serve_load.py --model smollm2-135m-instruct --requests 128 --concurrency 32
    python benchmarks/serve_load.py --model llama-3.1-8b --out benchmarks/results/serve_load_h100.json

Writes benchmarks/results/serve_load_cpu.json (or --out): the machine (device, date, load
average before and after), the settings, TTFT p50/p90/p99, end-to-end latency percentiles,
requests/s and generated tokens/s. tests/test_serve.py checks the same load for correctness;
this script only measures.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nbtrt  # noqa: E402
from nbtrt._io import copy_tokenizer_files, write_json  # noqa: E402
from nbtrt.bench import machine  # noqa: E402
from nbtrt.testing import tiny_hf_model  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Hello, my name is",
           "In 1492, Columbus", "The quick brown fox", "KV caches store", "Explain in-flight batching:"]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def drive(url: str, model: str, requests: list[tuple[str, int]], concurrency: int) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str, max_tokens: int) -> dict:
        async with gate:
            t0 = time.perf_counter()
            first, usage = None, None
            stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
            async for c in stream:
                if c.choices and c.choices[0].text and first is None:
                    first = time.perf_counter() - t0
                usage = c.usage or usage
            return {"ttft": first, "latency": time.perf_counter() - t0, "tokens": usage.completion_tokens}

    try:
        return await asyncio.gather(*(one(p, n) for p, n in requests))
    finally:
        await client.close()


@contextlib.contextmanager
def server_process(model, args):
    """`nbtrt serve` in its own process (as deployed: the clients here do not share its GIL); yields the base URL."""
    cmd = [sys.executable, "-m", "nbtrt.cli", "serve", str(model), "--port", "0", "--served-model-name", "bench",
           "--max-batch-size", str(args.max_batch_size), "--max-seq-len", "512", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        while " at http" not in (line := p.stdout.readline()):
            if not line and p.poll() is not None:
                raise RuntimeError(f"nbtrt serve exited with {p.returncode}")
        yield line.split(" at ")[1].split()[0]
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)


def metrics(url: str) -> dict:
    import httpx

    from nbtrt.server.metrics import parse

    return parse(httpx.get(url.removesuffix("/v1") + "/metrics").text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="zoo name or model dir (default: a tiny random-weight Llama)")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16, help="requests ask for 4..max-tokens new tokens")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load_cpu.json"))
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = tiny_hf_model("LlamaForCausalLM", Path(tmp) / "tiny", vocab_size=49152)
            copy_tokenizer_files(nbtrt.zoo.get("smollm2-135m-instruct"), model)
        requests = [(PROMPTS[i % len(PROMPTS)], 4 + i % (args.max_tokens - 3)) for i in range(args.requests)]
        before = os.getloadavg()
        with server_process(model, args) as url:
            asyncio.run(drive(url, "bench", requests[:args.concurrency], args.concurrency))  # warm-up
            steps0 = metrics(url)["nbtrt_engine_steps_total"]
            t0 = time.perf_counter()
            results = asyncio.run(drive(url, "bench", requests, args.concurrency))
            wall = time.perf_counter() - t0
            after = metrics(url)
            stats = {"steps": int(after["nbtrt_engine_steps_total"] - steps0),
                     "preemptions": int(after["nbtrt_preemptions_total"])}
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    latency = [r["latency"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    m = machine()
    out = {
        "machine": {**m, "device": m["gpu"] or f"cpu ({m['cpu_count']} cores)",
                    "load_average_before_1_5_15": [round(v, 2) for v in before]},
        "settings": {"model": args.model or "tiny random-weight LlamaForCausalLM (hidden 64, SmolLM2 tokenizer)",
                     "requests": args.requests, "concurrency": args.concurrency, "max_tokens": f"4..{args.max_tokens}",
                     "max_batch_size": args.max_batch_size, "streaming": True, "greedy": True,
                     "transport": "loopback HTTP; the server is `nbtrt serve` in its own process"},
        "wall_s": round(wall, 3), "requests_per_s": round(len(results) / wall, 2),
        "generated_tokens": tokens, "generated_tokens_per_s": round(tokens / wall, 1),
        "ttft_s": {"p50": round(percentile(ttft, 0.5), 4), "p90": round(percentile(ttft, 0.9), 4),
                   "p99": round(percentile(ttft, 0.99), 4), "mean": round(statistics.fmean(ttft), 4)},
        "latency_s": {"p50": round(percentile(latency, 0.5), 4), "p99": round(percentile(latency, 0.99), 4)},
        "engine": {"steps": stats["steps"], "preemptions": stats["preemptions"]},
    }
    write_json(args.out, out)
    print(f"{len(results)} requests in {wall:.1f} s: {out['requests_per_s']} req/s, {out['generated_tokens_per_s']} tok/s, "
          f"TTFT p50 {out['ttft_s']['p50'] * 1e3:.0f} ms p99 {out['ttft_s']['p99'] * 1e3:.0f} ms -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
