#!/usr/bin/env python
"""Peak memory of ``nbtrt.debug.compare`` with the HF reference and the converted candidate
both resident, capturing every block, against the model's float32 weight size.

    .venv/bin/python benchmarks/debug_rss.py                       # qwen2.5-coder-0.5b-instruct, 256 tokens
    .venv/bin/python benchmarks/debug_rss.py --out benchmarks/results/debug_rss.json

The candidate checkpoint is converted first in a separate process, so the figure measures
the comparison only (python + torch + both models + captures + metrics). Peak RSS is the
kernel's high-water mark for this process (getrusage ru_maxrss).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def fp32_weight_bytes(ckpt: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(ckpt / "rank0.safetensors"), framework="pt") as f:
        n = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    return 4 * n


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--ckpt", default=None, help="converted checkpoint (default: work/debug-rss-<model>, made if missing)")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    a = p.parse_args(argv)
    ckpt = Path(a.ckpt or f"work/debug-rss-{a.model}")
    if not (ckpt / "config.json").is_file():
        subprocess.run([sys.executable, "-c", f"import nbtrt; nbtrt.convert({a.model!r}, {str(ckpt)!r}, overwrite=True)"],
                       check=True)

    import torch
    from transformers import AutoTokenizer

    import nbtrt
    from nbtrt.debug import compare

    src = nbtrt.zoo.get(a.model)
    text = inspect.getsource(json) + inspect.getsource(inspect)  # real text nobody here wrote
    ids = AutoTokenizer.from_pretrained(src)(text)["input_ids"][: a.tokens]
    start = time.perf_counter()
    report = compare(src, ckpt, input_ids=[ids])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    weights = fp32_weight_bytes(ckpt)
    result = {
        "model": a.model, "tokens": len(ids), "tensors_compared": len(report.tensors),
        "layers": report.num_layers, "fp32_weight_bytes": weights, "peak_rss_bytes": peak,
        "ratio": round(peak / weights, 3), "limit_ratio": 2.5, "compare_seconds": round(seconds, 1),
        "first_divergence": str(report.first_divergence) if report.first_divergence else None,
        "argmax_agreement": report.logits["argmax_agreement"], "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
