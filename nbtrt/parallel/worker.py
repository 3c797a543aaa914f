"""One tensor-parallel rank: ``python -m nbtrt.parallel.worker --rank R --world N --dir DIR``, started by
:func:`nbtrt.parallel.run_tensor_parallel` (``DIR/job.json``: jobs given up front) or, with ``--serve``, by
:class:`nbtrt.parallel.TensorParallelEngine` (``DIR/serve.json``; then it lives until its stdin closes).

The engine's channel, both ways: one JSON header line, then ``nbytes`` bytes of safetensors holding the
message's tensors. Every rank reads each command on its stdin; rank 0 answers on its stdout. Nothing is
pickled; a rank's own output (prints, warnings, a traceback) goes to its log, never into the channel.

    commands        begin {batch_size}  step {input_ids, attention_mask}  capture {input_ids; names}
    rank 0 answers  ready (once started)  begin  step {logits [B, vocab]}  capture {logits, one per name}
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import BinaryIO

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ..config import load_checkpoint_config
from ..model import capture_outputs
from .launch import pack, unpack
from .layers import load_rank_decoder
from .rank_engine import RankEngine, generate_greedy, prefill_logits
from .sharding import join_outputs, output_split


def init_group(backend: str, tmp: Path, rank: int, world: int, timeout_s: float) -> None:
    """Join the ranks' process group through a file store in ``tmp`` (``timeout_s`` bounds every collective)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group(backend, init_method=(tmp / "store").resolve().as_uri(), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def _worker(rank: int, world: int, tmp: Path) -> None:
    """One rank: join the group, run each job in step with the others; rank 0 writes the results."""
    job = json.loads((tmp / "job.json").read_text())
    init_group(job["backend"], tmp, rank, world, job["timeout_s"])
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


# ------------------------------------------------------------------------------ the engine's ranks
def _read_command(stream: BinaryIO) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The next command on stdin, or None when the parent closed it (or is gone): time to stop."""
    line = stream.readline()
    if not line:
        return None
    nbytes = json.loads(line)["nbytes"]
    payload = stream.read(nbytes)
    return unpack(line, payload) if len(payload) == nbytes else None


@torch.inference_mode()
def _capture(model, cfg, device: torch.device, input_ids: torch.Tensor, names: list[str],
             rank: int, world: int) -> dict[str, torch.Tensor]:
    """Prefill with the named modules' outputs captured (forward hooks, as the torch engine does);
    outputs split across ranks are gathered to rank 0 and joined (names and shapes as at TP=1)."""
    with capture_outputs(model, names, transform=lambda t: t.detach().float()) as captured:
        logits = model(input_ids.to(device))  # lm_head all-gathers: the whole vocabulary on every rank
    out = {"logits": logits.float()}
    for name in names:  # the same order on every rank: the gathers pair up
        t = captured[name].contiguous()
        if output_split(name) is None:
            out[name] = t
            continue
        parts = [torch.empty_like(t) for _ in range(world)] if rank == 0 else None
        dist.gather(t, parts, dst=0)
        if rank == 0:
            out[name] = join_outputs(cfg, name, parts)
    return out


def _serve(rank: int, world: int, tmp: Path) -> None:
    """One rank of a :class:`TensorParallelEngine`: run each command on stdin in step with the others."""
    spec = json.loads((tmp / "serve.json").read_text())
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # from here on, anything printed goes to the log: the channel holds messages only
    device = torch.device("cuda", rank) if spec["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_group(spec["backend"], tmp, rank, world, spec["timeout_s"])
    try:
        cfg, _ = load_checkpoint_config(spec["checkpoint"])
        model = load_rank_decoder(spec["checkpoint"], rank, world, dtype=spec["dtype"]).to(device)
        engine = RankEngine(model, spec["max_seq_len"])
        dist.barrier()  # every rank loaded and connected

        def answer(header: dict, tensors: dict | None = None) -> None:
            if rank == 0:
                channel.write(pack(header, tensors))
                channel.flush()

        answer({"answer": "ready"})
        while (command := _read_command(sys.stdin.buffer)) is not None:
            header, tensors = command
            cmd = header["cmd"]
            if cmd == "begin":
                engine.begin(header["batch_size"])
                answer({"answer": cmd})
            elif cmd == "step":
                logits = engine.step(tensors["input_ids"].to(device), tensors["attention_mask"].to(device))
                answer({"answer": cmd}, {"logits": logits.float()})
            elif cmd == "capture":
                answer({"answer": cmd}, _capture(model, cfg, device, tensors["input_ids"], header["names"], rank, world))
            else:
                raise ValueError(f"unknown command {cmd!r}")
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one tensor-parallel rank (started by run_tensor_parallel "
                                                 "or TensorParallelEngine)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True, help="the run's directory (job.json or serve.json, store)")
    parser.add_argument("--serve", action="store_true", help="serve an engine's commands on stdin until it closes")
    args = parser.parse_args(argv)
    (_serve if args.serve else _worker)(args.rank, args.world, args.dir)


if __name__ == "__main__":
    main()
