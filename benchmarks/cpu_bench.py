"""The CPU benchmark of both zoo models: HF vs every nbtrt engine and precision that runs here.

    python benchmarks/cpu_bench.py                    # both models -> benchmarks/results/cpu_<model>_<date>.json
    python benchmarks/cpu_bench.py --models smollm2-135m-instruct --quick
    python benchmarks/cpu_bench.py --markdown          # the README's tables, from the committed JSON

Workloads: batch 1 and 4 with a 128-token prompt and 32 new tokens (2 repeats), and the ShareGPT-like mix
(100 requests, seed 0, lengths scaled by 1/32 for the CPU) in static batches of 8. Precisions:
the float32 checkpoint and nbtrt.quantize's weight-only int8 / int4 checkpoints (no calibration),
on the compiled torch engine and ONNX Runtime (the eager torch engine runs float32 only).
Timings on a shared 2-core machine are noisy; the JSON records the machine.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbtrt import bench as B  # noqa: E402

MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")
RUNNERS = ("hf-eager", "hf-compile", "nbtrt-torch", "nbtrt-torch-compiled", "nbtrt-onnxruntime", "nbtrt-tensorrt")
SKIP = {"hf-compile": "transformers compiles generate on CUDA only by default; measured against it on the GPU "
                      "(benchmarks/gpu.py)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--runners", default=",".join(RUNNERS))
    ap.add_argument("--precisions", default="int8_wo,int4_wo")
    ap.add_argument("--quantized-runners", default="nbtrt-torch-compiled,nbtrt-onnxruntime",
                    help="the runners that also run the quantized precisions")
    ap.add_argument("--quick", action="store_true", help="short lengths, 16 requests (a rehearsal)")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--work", default="work/cpu_bench")
    ap.add_argument("--markdown", action="store_true", help="print the latest committed results as markdown tables")
    a = ap.parse_args(argv)
    if a.markdown:
        for model in a.models.split(","):
            found = B.latest(f"cpu_{model}_", a.out_dir)
            if found:
                print(f"### {model} ({found[0].name})\n\n{B.markdown(found[1])}\n")
        return 0
    new, prompt, n = (8, 32, 16) if a.quick else (32, 128, 100)
    loads = [B.fixed(1, prompt, new, repeats=2), B.fixed(4, prompt, new, repeats=2),
             B.sharegpt_like(n, seed=0, scale=1 / 32, max_input_len=256, max_output_len=64)]
    date = _dt.date.today().isoformat()
    for model in a.models.split(","):
        out = Path(a.out_dir) / f"cpu_{model}_{date}{'_quick' if a.quick else ''}.json"
        result = B.bench(model, a.runners.split(","), loads, device="cpu", dtype="float32",
                         precisions=tuple(p for p in a.precisions.split(",") if p),
                         quantized_runners=tuple(a.quantized_runners.split(",")), skip=SKIP, max_batch_size=8,
                         work_dir=Path(a.work) / model, out=out)
        print(f"== {model} -> {out}\n{B.table(result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
