"""Start one process per rank (``python -m nbtrt.parallel.worker``), never inside the caller's process:
process pools hang inside Jupyter kernels, and a fresh interpreter per rank is what torchrun does too.

The parent writes a job file (JSON), the ranks join a process group through a file store in a temporary
directory (Gloo on the CPU), run every job in step, and rank 0 writes each result as safetensors.
Nothing crosses a process boundary as pickle. Every wait has a deadline; on one, all ranks are stopped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from .sharding import check_checkpoint_size

DEFAULT_TIMEOUT_S = 300.0


def run_tensor_parallel(jobs: list[dict], tensor_parallel_size: int, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                        backend: str = "gloo") -> list[dict[str, torch.Tensor]]:
    """Run greedy generation jobs on ``tensor_parallel_size`` ranks; one result per job:
    ``{"logits": prefill logits [B, T, vocab] fp32, "tokens": new tokens [B, max_new_tokens]}``
    (prompts left-padded to the longest; tokens through the shared generation loop).

    A job is ``{"checkpoint": dir (sharded for this size, or unsharded), "input_ids": [[...], ...],
    "max_new_tokens": n}``.

    >>> [out] = run_tensor_parallel([{"checkpoint": "work/ckpt", "input_ids": [[1, 2, 3]],
    ...                               "max_new_tokens": 8}], tensor_parallel_size=2)  # doctest: +SKIP
    >>> out["tokens"].shape  # doctest: +SKIP
    torch.Size([1, 8])
    """
    world = tensor_parallel_size
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"tensor_parallel_size={world!r} must be an integer >= 1")
    if backend != "gloo":  # NCCL needs each rank placed on its own GPU: not done yet (docs/parallel.md)
        raise ValueError(f"backend={backend!r}: only 'gloo' (CPU) is supported so far")
    if not jobs:
        return []
    for job in jobs:  # a wrong checkpoint or size is named here, before any process starts
        check_checkpoint_size(job["checkpoint"], world)
    with tempfile.TemporaryDirectory(prefix="nbtrt-tp-") as tmp:
        tmp = Path(tmp)
        runs = [{"checkpoint": str(Path(j["checkpoint"]).resolve()),
                 "input_ids": [[int(t) for t in row] for row in j["input_ids"]],
                 "max_new_tokens": int(j["max_new_tokens"]), "out": str(tmp / f"out{i}.safetensors")}
                for i, j in enumerate(jobs)]
        (tmp / "job.json").write_text(json.dumps({"runs": runs, "backend": backend, "timeout_s": timeout_s}))
        _launch(tmp, world, timeout_s)
        return [load_file(r["out"]) for r in runs]


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # this nbtrt, whatever the caller's sys.path
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")  # N ranks share the cores
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # ranks talk over loopback, whatever the host's name resolves to
    return env


def _launch(tmp: Path, world: int, timeout_s: float) -> None:
    env = _worker_env()
    procs, logs = [], []
    try:
        for rank in range(world):
            log = open(tmp / f"rank{rank}.log", "w+b")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "nbtrt.parallel.worker", "--rank", str(rank), "--world", str(world),
                 "--dir", str(tmp)], env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                what = f"rank {failed[0]} failed" if failed else f"no result within {timeout_s:.0f} s"
                rank = failed[0] if failed else 0
                raise RuntimeError(f"tensor-parallel run of {world} ranks: {what}; its output ends:\n"
                                   f"{_tail(logs[rank])}")
            time.sleep(0.05)
        failed = [r for r, p in enumerate(procs) if p.returncode != 0]
        if failed:
            raise RuntimeError(f"tensor-parallel run of {world} ranks: rank {failed[0]} failed; its output ends:\n"
                               f"{_tail(logs[failed[0]])}")
    finally:
        for p in procs:  # only the processes started here, each by its own handle
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for log in logs:
            log.close()


def _tail(log, chars: int = 3000) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-chars:]
