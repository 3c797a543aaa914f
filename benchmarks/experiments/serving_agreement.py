"""Why did in-flight batching agree with the static engine on only 9.67% of greedy tokens on the
H100 (serving_gpu_nvidia-h100_2026-12-06.json)? The same comparison on the CPU, the 8B config
shrunk as ``benchmarks/serving_gpu.py --quick`` shrinks it (random N(0, 0.02) weights), 16
ShareGPT-like requests, 32 greedy tokens, in fp32 and in bf16.

    PYTHONPATH=. python benchmarks/experiments/serving_agreement.py --out benchmarks/results/serving_agreement_cpu.json

Pins no private name; imports gpu.py's model builder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpu import llama8b_random  # noqa: E402
from nbtrt import bench as B  # noqa: E402
from nbtrt.generate import SamplingParams  # noqa: E402
from nbtrt.serving.artifacts import engine_from_decoder  # noqa: E402
from nbtrt.serving.llm import LLM  # noqa: E402


def agreement(dtype: torch.dtype, n: int = 16, new_tokens: int = 32) -> dict:
    model = llama8b_random(True).to(dtype)
    mix = B.sharegpt_like(n, seed=0, max_input_len=64, max_output_len=64, batch_size=8)
    prompts = mix.prompts(model.cfg.vocab_size)[:n]
    engine = engine_from_decoder(model, max_batch_size=8, max_seq_len=200, compile=False)
    static = [t for i in range(0, n, 8) for t in engine.generate(input_ids=prompts[i:i + 8], max_new_tokens=new_tokens,
                                                                stop_token_ids=())]
    with LLM(engine, max_batch_size=n, max_num_tokens=512, max_seq_len=200, max_input_len=200) as llm:
        outs = llm.generate(prompts, SamplingParams(max_new_tokens=new_tokens), use_tqdm=False)
    same = sum(a == b for o, s in zip(outs, static) for a, b in zip(o.token_ids, s))
    total = sum(len(s) for s in static)
    return {"tokens_agreeing": same, "tokens": total, "agreement": same / total,
            "identical_requests": sum(o.token_ids == s for o, s in zip(outs, static)), "requests": n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    result = {"machine": B.machine(), "question": __doc__.split("\n\n")[0],
              "runs": {str(d).removeprefix("torch."): agreement(d) for d in (torch.float32, torch.bfloat16)}}
    for name, r in result["runs"].items():
        print(f"{name}: {r['tokens_agreeing']}/{r['tokens']} tokens agree ({r['agreement']:.3f}), "
              f"{r['identical_requests']}/{r['requests']} requests identical")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
