"""``TensorParallelEngine``: an :class:`~nbtrt.engine.Engine` in the caller's process whose model runs on
``tensor_parallel_size`` long-lived rank processes, so the shared generation loop (sampling, stop tokens,
stop strings, seeds), ``generate`` / ``stream``, ``nbtrt.LLM``'s static batches and the debugger's
``capture`` run unchanged with tensor parallelism.

    caller's process                                 rank processes (python -m nbtrt.parallel.worker --serve)
    generate_tokens -> engine.step(ids, mask)  ──▶  every rank's stdin: {"cmd": "step"} + safetensors
                                                     each rank: its decoder slice, static KV cache,
                                                     all-reduce / all-gather in one process group
                    logits [B, vocab]          ◀──  rank 0's stdout: {"answer": "step"} + safetensors

The ranks are started here, never inside the caller's process (process pools hang in Jupyter kernels);
they join one group through a file store in a temporary directory: Gloo on CPUs, NCCL on GPUs with rank r
on ``cuda:r``. Every wait has a deadline; a rank that exits or a deadline passed stops every rank and
raises naming the rank and the end of its output. ``close()`` (or the ``with`` block, garbage collection,
interpreter exit) stops the ranks and removes the directory.

>>> with TensorParallelEngine("work/ckpt", tensor_parallel_size=2, max_seq_len=512) as engine:  # doctest: +SKIP
...     engine.generate(["Hi!"], max_new_tokens=16)
"""
from __future__ import annotations

import functools
import json
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import asdict
from pathlib import Path

import torch

from .._io import refuse_remote_code
from ..config import check_dtype
from ..engine import Engine, EngineLimits
from ..errors import GenerationError
from ..model import Decoder
from .launch import DEFAULT_TIMEOUT_S, exit_text, log_tail, pack, start_ranks, stop_ranks, unpack
from .sharding import check_checkpoint_size


def rank_placement(device: str | None, world: int) -> tuple[str, str]:
    """(where the ranks run, process-group backend): ``("cuda", "nccl")``, one GPU per rank, when asked
    or when there are enough GPUs; else ``("cpu", "gloo")``."""
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.device_count() >= world else "cpu")
    if kind == "cuda":
        if torch.cuda.device_count() < world:
            raise ValueError(f"device={device!r} with tensor_parallel_size={world} needs {world} GPUs (rank r runs "
                             f"on cuda:r); this machine has {torch.cuda.device_count()}")
        return "cuda", "nccl"
    if kind != "cpu":
        raise ValueError(f"device={device!r}: tensor-parallel ranks run on 'cpu' (Gloo) or 'cuda' (NCCL)")
    return "cpu", "gloo"


class _Ranks:
    """The rank processes of one engine and the channel to them: a command goes to every rank's stdin,
    rank 0's answer comes back on its stdout. Reads and writes wait on ``select`` with a deadline (never a
    blocking call), checking meanwhile that every rank is alive."""

    def __init__(self, tmp: Path, world: int):
        self.tmp, self.world = tmp, world
        self.procs, self.logs = start_ranks(tmp, world, ["--serve"], channel=True)
        self.answers = self.procs[0].stdout.fileno()
        for fd in [p.stdin.fileno() for p in self.procs] + [self.answers]:
            os.set_blocking(fd, False)
        self.failure: str | None = None
        self._buf = bytearray()
        self._lock = threading.Lock()  # one command and its answer at a time
        self._stopped = False
        self._cmd, self._deadline = "start", 0.0  # the command being served and its deadline

    def call(self, cmd: str | None, timeout_s: float, header: dict | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Send ``cmd`` to every rank (None: only wait for their start) and return rank 0's answer's tensors."""
        with self._lock:
            if self.failure or self._stopped:
                raise RuntimeError(self.failure or "this tensor-parallel engine is closed; start a new one")
            self._cmd, self._deadline = cmd or "start", time.monotonic() + timeout_s
            try:
                return self._exchange(cmd, header, tensors)
            except BaseException as e:
                if self.failure is None and not self._stopped:  # interrupted (Ctrl-C) halfway through
                    self.failure = (f"tensor-parallel engine of {self.world} ranks: interrupted ({type(e).__name__}) "
                                    f"during {self._cmd!r}; its ranks were stopped, as their next answer could no "
                                    "longer be matched to a command: start a new engine")
                    self.stop(grace_s=0)
                raise

    def _exchange(self, cmd: str | None, header: dict | None, tensors: dict | None) -> dict[str, torch.Tensor]:
        if cmd is not None:
            data = pack({**(header or {}), "cmd": cmd}, tensors)
            for rank in range(self.world):
                self._write(rank, data)
        line = self._read_line()
        try:
            nbytes = json.loads(line)["nbytes"]
        except (ValueError, KeyError, TypeError):
            raise self._fail(f"rank 0 wrote {line[:200]!r}, which is not an answer") from None
        answer, out = unpack(line, self._read(nbytes))
        if answer.get("answer") != (cmd or "ready"):
            raise self._fail(f"rank 0 answered {answer!r}")
        return out

    def _write(self, rank: int, data: bytes) -> None:
        fd, view = self.procs[rank].stdin.fileno(), memoryview(data)
        while view:
            self._wait(fd, writing=True)
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise self._fail(f"rank {rank} closed its input") from None

    def _read_line(self) -> bytes:
        while (end := self._buf.find(b"\n")) < 0:
            self._fill()
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        return line

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _fill(self) -> None:
        self._wait(self.answers)
        chunk = os.read(self.answers, 1 << 20)
        if not chunk:  # rank 0 ended: give it a moment to exit, so that its exit code can be told
            try:
                self.procs[0].wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            raise self._fail("rank 0 closed its answers")
        self._buf += chunk

    def _wait(self, fd: int, writing: bool = False) -> None:
        """Until ``fd`` can be read (or written), while every rank lives and the deadline has not passed."""
        while True:
            if self._stopped:
                raise RuntimeError("this tensor-parallel engine was closed while it was running")
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise self._fail("no answer before the deadline")
            ready = select.select([] if writing else [fd], [fd] if writing else [], [], min(left, 0.1))
            if ready[0] or ready[1]:
                return
            if any(p.poll() is not None for p in self.procs):
                raise self._fail()

    def _fail(self, what: str | None = None) -> RuntimeError:
        """Stop every rank; the error names each rank that exited (else rank 0) with its output's end."""
        exited = [r for r, p in enumerate(self.procs) if p.poll() is not None]
        told = ", ".join(f"rank {r} exited ({exit_text(self.procs[r].returncode)})" for r in exited)
        tails = "".join(f"\nrank {r}'s output ends:\n{log_tail(self.logs[r], 2000)}" for r in exited or [0])
        reason = "; ".join(x for x in (what, told) if x)
        self.failure = (f"tensor-parallel engine of {self.world} ranks: {reason}, during {self._cmd!r}; "
                        f"every rank is stopped.{tails}")
        self.stop(grace_s=0)
        return RuntimeError(self.failure)

    def stop(self, grace_s: float = 5.0) -> None:
        """Close the ranks' stdin (each then leaves its loop and the group), kill any still running after
        ``grace_s``, and remove the temporary directory. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:  # a rank already gone
                pass
        stop_ranks(self.procs, self.logs, grace_s=grace_s)
        shutil.rmtree(self.tmp, ignore_errors=True)


class TensorParallelEngine(Engine):
    """An engine whose decoder is split over ``tensor_parallel_size`` rank processes (see the module
    docstring). ``ckpt_dir``: an nbtrt checkpoint, unsharded (each rank slices it at load) or sharded for
    this size (:func:`~nbtrt.parallel.shard_checkpoint`). Serves **static batches** (a new request waits
    for the batch to end); ``timeout_s`` bounds the start and every step. A failure, or an interrupt in
    the middle of a step, stops the ranks for good: the error says why; start a new engine.

    >>> engine = TensorParallelEngine("work/ckpt-tp2", 2, max_batch_size=4, max_seq_len=1024)  # doctest: +SKIP
    >>> engine.generate(input_ids=[[1, 2, 3]], max_new_tokens=8); engine.close()  # doctest: +SKIP
    """

    backend = "torch-tp"

    def __init__(self, ckpt_dir: str | Path, tensor_parallel_size: int, *, max_batch_size: int = 8,
                 max_input_len: int | None = None, max_seq_len: int = 2048, dtype: str | None = None,
                 device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        world, ckpt_dir = tensor_parallel_size, Path(ckpt_dir).resolve()
        cfg, meta = check_checkpoint_size(ckpt_dir, world)  # a wrong checkpoint or size, before any rank starts
        refuse_remote_code(ckpt_dir)
        check_dtype(dtype)
        limits = EngineLimits(max_batch_size, max_input_len or max_seq_len, max_seq_len)
        if cfg.position == "learned" and max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's {cfg.max_position_embeddings} learned positions")
        placement, group = rank_placement(device, world)
        super().__init__(ckpt_dir, {
            "backend": self.backend, "decoder": dict(cfg.to_dict(), dtype=dtype or cfg.dtype), "limits": asdict(limits),
            "options": {"tensor_parallel_size": world, "device": placement, "process_group": group, "dtype": dtype},
            "checkpoint": {"path": str(ckpt_dir), "content_sha256": meta.get("content_sha256")}})
        self.tensor_parallel_size, self.rank_device, self.process_group = world, placement, group
        self.timeout_s = timeout_s
        self._batch: int | None = None
        self._past = 0
        tmp = Path(tempfile.mkdtemp(prefix="nbtrt-tp-"))
        (tmp / "serve.json").write_text(json.dumps({
            "checkpoint": str(ckpt_dir), "max_seq_len": max_seq_len, "dtype": dtype, "device": placement,
            "backend": group, "timeout_s": timeout_s}))
        try:
            self._ranks = _Ranks(tmp, world)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._finalizer = weakref.finalize(self, self._ranks.stop)  # also at interpreter exit
        try:
            self._ranks.call(None, timeout_s)  # every rank loaded its slice and joined the group, or an error
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ Engine API
    def begin(self, batch_size: int) -> None:
        self.check_batch(batch_size)
        self._ranks.call("begin", self.timeout_s, {"batch_size": int(batch_size)})
        self._batch, self._past = batch_size, 0

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self._batch is None:
            raise GenerationError("call begin(batch_size) before step()")
        B, T = input_ids.shape
        if B != self._batch:
            raise GenerationError(f"step got {B} sequences but begin() was called for {self._batch}")
        self.check_step(self._past, T)
        if tuple(attention_mask.shape) != (B, self._past + T):
            raise GenerationError(f"attention_mask must be [batch, past + new] = [{B}, {self._past + T}], "
                                  f"got {list(attention_mask.shape)}")
        out = self._ranks.call("step", self.timeout_s, tensors={
            "input_ids": input_ids.long(), "attention_mask": attention_mask.long()})
        self._past += T
        return out["logits"]

    def _capture(self, prompts, names):
        unknown = [n for n in names if n not in self._module_names]
        if unknown:  # named here: a rank would die on it
            raise KeyError(f"no module named {unknown[:3]}; capture names are module names such as "
                           f"'embed', 'layers.0.attn', 'layers.0', 'final_norm', 'lm_head'")
        out = self._ranks.call("capture", self.timeout_s, {"names": list(names)},
                               {"input_ids": torch.tensor(prompts, dtype=torch.long)})
        return out["logits"], {n: out[n] for n in names}  # in the order asked (safetensors sorts its keys)

    @functools.cached_property
    def _module_names(self) -> set[str]:
        with torch.device("meta"):  # the unsharded decoder's names: a rank's modules keep them
            return {name for name, _ in Decoder(self.config).named_modules()}

    # ------------------------------------------------------------------ lifetime
    @property
    def pids(self) -> list[int]:
        """The rank processes' ids, rank 0 first."""
        return [p.pid for p in self._ranks.procs]

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop the rank processes and remove their temporary directory (idempotent)."""
        self._finalizer()

    def __enter__(self) -> "TensorParallelEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self.config
        return (f"<TensorParallelEngine {c.architecture} {c.dtype} layers={c.num_layers} "
                f"tensor_parallel_size={self.tensor_parallel_size} ({self.process_group} on {self.rank_device}), "
                f"static batches, limits={asdict(self.limits)} dir={self.engine_dir}{' closed' if self.closed else ''}>")
