"""Start one process per rank (``python -m nbtrt.parallel.worker``), never inside the caller's process:
process pools hang inside Jupyter kernels, and a fresh interpreter per rank is what torchrun does too.

The parent writes a job file (JSON), the ranks join a process group through a file store in a temporary
directory (Gloo on the CPU), run every job in step, and rank 0 writes each result as safetensors.
Nothing crosses a process boundary as pickle. Every wait has a deadline; on one, all ranks are stopped.
:func:`start_ranks` / :func:`stop_ranks` are shared with :class:`~nbtrt.parallel.TensorParallelEngine`,
whose ranks live across calls and take commands on their stdin.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load, save

from .._io import read_safetensors
from ..errors import is_whole
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
    if not is_whole(world, 1):
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
        return [read_safetensors(r["out"], remedy="run it again") for r in runs]


# the engine's channel (see nbtrt/parallel/worker.py): a JSON header line, then safetensors bytes
def pack(header: dict, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """One message: the JSON header line (with ``nbytes``), then the tensors as safetensors bytes."""
    # copies: safetensors refuses tensors that share memory (a module's output is often another's)
    payload = save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}) if tensors else b""
    return json.dumps({**header, "nbytes": len(payload)}).encode() + b"\n" + payload


def unpack(header_line: bytes, payload: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads(header_line), (load(payload) if payload else {})


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # this nbtrt, whatever the caller's sys.path
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")  # N ranks share the cores
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # ranks talk over loopback, whatever the host's name resolves to
    return env


def start_ranks(tmp: Path, world: int, args: list[str] = (), channel: bool = False) -> tuple[list, list]:
    """(processes, log files): one ``python -m nbtrt.parallel.worker --rank r --world N --dir tmp *args`` per
    rank, each writing its output to ``tmp/rank{r}.log``. With ``channel`` every rank reads commands on its
    stdin and rank 0 answers on its stdout (the long-lived engine's pipes); else stdin is empty.

    >>> procs, logs = start_ranks(Path(tmp), 2, ["--serve"], channel=True)  # doctest: +SKIP
    """
    env = _worker_env()
    procs, logs = [], []
    try:
        for rank in range(world):
            log = open(tmp / f"rank{rank}.log", "w+b")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "nbtrt.parallel.worker", "--rank", str(rank), "--world", str(world),
                 "--dir", str(tmp), *args], env=env, stdin=subprocess.PIPE if channel else subprocess.DEVNULL,
                stdout=subprocess.PIPE if channel and rank == 0 else log, stderr=log,
                # long-lived ranks keep out of the terminal's Ctrl-C: the engine stops them (or they see
                # their stdin close when the caller is gone)
                start_new_session=channel))
    except BaseException:
        stop_ranks(procs, logs)
        raise
    return procs, logs


def stop_ranks(procs: list, logs: list, grace_s: float = 0.0) -> None:
    """Stop the ranks started by :func:`start_ranks`: give them ``grace_s`` to exit on their own, then
    kill each (by its own handle: only processes started here); close their pipes and logs."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
        for pipe in (p.stdin, p.stdout):
            if pipe is not None:
                pipe.close()
    for log in logs:
        log.close()


def exit_text(code: int) -> str:
    """How a rank ended, in words: ``exit code 1`` or ``killed by SIGKILL``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _launch(tmp: Path, world: int, timeout_s: float) -> None:
    procs, logs = start_ranks(tmp, world)
    try:
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                what = f"rank {failed[0]} failed" if failed else f"no result within {timeout_s:.0f} s"
                rank = failed[0] if failed else 0
                raise RuntimeError(f"tensor-parallel run of {world} ranks: {what}; its output ends:\n"
                                   f"{log_tail(logs[rank])}")
            time.sleep(0.05)
        failed = [r for r, p in enumerate(procs) if p.returncode != 0]
        if failed:
            raise RuntimeError(f"tensor-parallel run of {world} ranks: rank {failed[0]} failed; its output ends:\n"
                               f"{log_tail(logs[failed[0]])}")
    finally:
        stop_ranks(procs, logs)


def log_tail(log, chars: int = 3000) -> str:
    """The end of a rank's log, read through a fresh handle: the rank shares ``log``'s file offset."""
    return Path(log.name).read_bytes().decode(errors="replace")[-chars:]
