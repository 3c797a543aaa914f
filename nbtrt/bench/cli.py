"""``nbtrt bench``: the command line of :func:`nbtrt.bench.bench`."""
from __future__ import annotations

from .suite import RUNNERS, bench
from .report import table
from .workloads import fixed, sharegpt_like


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
        try:
            batches = [int(b) for b in a.batch.split(",") if b.strip()]
        except ValueError:
            raise ValueError(f"--batch {a.batch!r}: comma-separated batch sizes, e.g. 1,8,32") from None
        loads = [fixed(b, a.input_len, a.output_len, a.repeats) for b in batches]
        if a.sharegpt:
            loads.append(sharegpt_like(a.sharegpt, scale=a.scale, max_input_len=1024, max_output_len=1024))
        result = bench(a.model, [r for r in a.runners.split(",") if r], loads, device=a.device, dtype=a.dtype,
                       precisions=tuple(q for q in a.precisions.split(",") if q), max_batch_size=a.max_batch_size,
                       work_dir=a.work, out=a.out)
        print(table(result))

    p.set_defaults(run=run)
