"""One tensor-parallel rank, started by :func:`nbtrt.parallel.run_tensor_parallel` as
``python -m nbtrt.parallel.worker --rank R --world N --dir JOB_DIR``."""
from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from .layers import load_rank_decoder
from .rank_engine import RankEngine, generate_greedy, prefill_logits


def _worker(rank: int, world: int, tmp: Path) -> None:
    """One rank: join the group, run each job in step with the others; rank 0 writes the results."""
    job = json.loads((tmp / "job.json").read_text())
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group(job["backend"], init_method=(tmp / "store").resolve().as_uri(), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=job["timeout_s"]))
    try:
        for run in job["runs"]:
            model = load_rank_decoder(run["checkpoint"], rank, world)
            prompts, n = run["input_ids"], run["max_new_tokens"]
            logits = prefill_logits(model, prompts)
            tokens = torch.tensor(generate_greedy(RankEngine(model, max(map(len, prompts)) + n), prompts, n))
            if rank == 0:
                out = Path(run["out"])
                save_file({"logits": logits.contiguous(), "tokens": tokens.contiguous()}, out.with_suffix(".tmp"))
                os.replace(out.with_suffix(".tmp"), out)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one tensor-parallel rank (started by run_tensor_parallel)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True, help="the job's directory (job.json, store, outputs)")
    args = parser.parse_args(argv)
    _worker(args.rank, args.world, args.dir)


if __name__ == "__main__":
    main()
