"""Experiment (GPU): the 8B config's engines with graphed prefills (TorchEngine.graph_prefill) on
and off, each in a process of its own as gpu.py runs them: the first token, the decode step and
tokens/s (batch 1, 128-token prompt, 256 new tokens). Modes: "off" (every prefill at its own
length, as before graphed prefills), "on" (the default), "decode-first" (on, but warm-up runs with
it off, so the decode graph is captured before any prefill graph). JSON to argv[1].

    PYTHONPATH=. python benchmarks/experiments/prefill_graphs.py $OUT/prefill_graphs.json bf16:off,bf16:on,int4_wo:off,int4_wo:on
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu as G  # noqa: E402

from nbtrt.runtimes.torch_engine import TorchEngine  # noqa: E402


def one(fmt: str, mode: str) -> dict:
    warmup = TorchEngine.warmup

    def patched(self, batch_size: int = 1) -> float:
        self.graph_prefill = mode == "on"
        seconds = warmup(self, batch_size)
        self.graph_prefill = mode != "off"
        return seconds

    TorchEngine.warmup = patched
    row = G.llama8b_part(fmt, quick=bool(os.environ.get("QUICK")))  # QUICK=1: a shrunk config, to try on a CPU
    row.pop("config", None)
    row.pop("decode_profile", None)
    return row


def main() -> None:
    if sys.argv[1] == "--one":
        fmt, mode, out = sys.argv[2:5]
        Path(out).write_text(json.dumps(one(fmt, mode), default=str))
        return
    out = Path(sys.argv[1])
    rows = {}
    for run in sys.argv[2].split(","):
        fmt, mode = run.split(":")
        part = out.with_suffix(f".{fmt}.{mode}.json")
        t = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--one", fmt, mode, str(part)], capture_output=True, text=True)
        rows[run] = json.loads(part.read_text()) if part.exists() else {"error": (done.stdout + done.stderr)[-2000:]}
        r = rows[run]
        print(f"{run:18s} step {r.get('decode_step_s', 0) * 1e3:.3f} ms  tpot {r.get('tpot_s', 0) * 1e3:.3f} ms  "
              f"ttft {r.get('ttft_s', 0) * 1e3:.1f} ms  {r.get('tokens_per_s', 0):.1f} tok/s  "
              f"({time.perf_counter() - t:.0f} s) {r.get('error', '')[:300]}", flush=True)
        out.write_text(json.dumps({"device": G.torch.cuda.get_device_name() if G.CUDA else "cpu", "date": time.strftime("%Y-%m-%d"),
                                   "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
