"""One quantized checkpoint's perplexity on the held-out KJV windows, exactly as
``benchmarks/gpu_real_weights.py``'s formats section measures it (the torch runtime's kernel-backed
linears, bf16 arithmetic, 4 windows x 512 tokens, seed 0), without the bf16 model around it: to run
the *same checkpoint bytes* on two machines (issue 32's "GPU within 2% of the CPU" for a format whose
quantization itself differs between machines, e.g. GPTQ).

    python benchmarks/experiments/checkpoint_ppl.py CKPT_DIR [--device cuda] [--site DIR] [--out FILE]

``--site``: a directory appended to ``sys.path`` (the KJV text's package, as scripts/split_model.py
carries it). Prints and writes JSON: the checkpoint's sha256, perplexity, device and date.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--device", default=None)
    ap.add_argument("--site", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.site:
        sys.path.append(a.site)
    import torch

    import nbtrt
    from gpu_real_weights import nll_top1  # the same measure, not a second copy of it
    from nbtrt.checkpoint import checkpoint_hash
    from nbtrt import bench as B
    from nbtrt._io import load_tokenizer
    from nbtrt.quantize.calib import windows

    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = False  # as gpu_real_weights.py
    ckpt = Path(a.checkpoint)
    tok = load_tokenizer(ckpt)
    ids = windows(tok, "kjv", "eval", 4, 512, seed=0).to(dev)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nbtrt-ppl-") as tmp:
        edir = nbtrt.build(ckpt, Path(tmp) / "engine", backend="torch", dtype="bfloat16", max_batch_size=8,
                           max_input_len=512, max_seq_len=520)
        engine = nbtrt.load(edir, device=str(dev), compile=False)
        nll = tokens = 0.0
        with torch.inference_mode():
            for w in range(ids.shape[0]):
                got = nll_top1(engine.model(ids[w:w + 1])[0, :-1].float(), ids[w, 1:])
                nll, tokens = nll + got["nll"], tokens + got["tokens"]
    r = {"checkpoint": str(ckpt), "checkpoint_sha256": checkpoint_hash(ckpt), "device": str(dev),
         "perplexity": math.exp(nll / tokens), "tokens": tokens, "seconds": round(time.perf_counter() - t, 1),
         "machine": B.machine()}
    print(json.dumps({k: v for k, v in r.items() if k != "machine"}), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
