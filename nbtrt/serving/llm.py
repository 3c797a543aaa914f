"""``nbtrt.LLM``: many requests at once, each streamed as it goes (TensorRT-LLM's and vLLM's LLM API).

With the torch backend (the default) one background thread owns the engine and runs the step loop:
admit waiting requests, prefill a chunk, decode, retire finished ones, over a paged KV cache
(:mod:`~nbtrt.serving.scheduler`, :mod:`~nbtrt.serving.runner`). ONNX Runtime and TensorRT engines
are served through the same API with **static batches** (requests that share sampling options run
together through :meth:`Engine`'s generation loop; a new request waits for the batch to end).

>>> llm = nbtrt.LLM("smollm2-135m-instruct")  # doctest: +SKIP
>>> outs = llm.generate(["Hi!", "Tell me a joke."], llm.sampling(max_new_tokens=16))  # doctest: +SKIP
>>> async for out in llm.generate_async("Hi!", streaming=True): print(out.delta_text, end="")  # doctest: +SKIP
"""
from __future__ import annotations

import asyncio
import itertools
import numbers
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import AsyncIterator, Iterator

import torch

from ..engine import Engine, EngineLimits
from ..errors import is_whole
from ..generate import Detokenizer, GenerationError, GenerationState, GenerationStats, SamplingParams
from .artifacts import resolve_engine, tensor_parallel_engine
from .block_pool import BlockPool, blocks_for_memory
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence, Status

_ids = itertools.count()


@dataclass
class RequestOutput:
    """What a request has produced so far (``finished``: all of it). Times are ``time.perf_counter()``."""

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    delta_text: str
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    metrics: dict = field(default_factory=dict)
    error: str | None = None  # set when the engine loop failed while serving this request


class LLM:
    """Serve a model: ``generate`` (a list of prompts, a progress bar) and ``generate_async``
    (one request, text deltas as they come), from any number of threads and event loops at once.

    ``model``: a zoo name, a HF directory, an nbtrt checkpoint, an engine directory or an
    :class:`~nbtrt.engine.Engine` already loaded; whatever is missing is converted and built
    once under ``work_dir``. Options (docs/serving.md): ``max_batch_size`` sequences a step,
    ``max_num_tokens`` tokens a step, ``block_size`` / ``num_blocks`` / ``gpu_memory_utilization``
    for the KV pool. ``cuda_graphs=False`` runs decode steps eagerly on CUDA too; ``tiled`` runs mixed
    steps through the tile kernel as one compiled graph (default on CUDA); ``overlap=False`` reads every
    step's tokens back before launching the next (see :meth:`_inflight_step`); ``prefix_caching=False``
    computes every prompt in full instead of sharing the KV blocks of a prefix seen before (a system
    prompt, a conversation's earlier turns: see :mod:`~nbtrt.serving.block_pool`).
    ``tensor_parallel_size=N`` (N > 1) splits the model over N rank processes started here (CPU: Gloo;
    N GPUs: NCCL, not yet run) through :class:`~nbtrt.parallel.TensorParallelEngine`, served with static
    batches (no in-flight batching under tensor parallelism yet); ``shutdown()`` stops the ranks.

    >>> with nbtrt.LLM("smollm2-135m-instruct", max_batch_size=16) as llm:  # doctest: +SKIP
    ...     print(llm.generate(["Hi!"])[0].text)
    """

    def __init__(self, model, backend: str = "torch", *, max_batch_size: int = 64, max_input_len: int | None = None,
                 max_seq_len: int | None = None, max_num_tokens: int = 2048, block_size: int = 16,
                 num_blocks: int | None = None, gpu_memory_utilization: float = 0.9, device: str | None = None,
                 dtype: str | None = None, work_dir: str | Path | None = None, cuda_graphs: bool | None = None,
                 warmup: bool = True, verbose: bool = True, batching: str | None = None, tiled: bool | None = None,
                 overlap: bool = True, prefix_caching: bool = True, tensor_parallel_size: int = 1):
        tp = tensor_parallel_size
        if not is_whole(tp, 1):
            raise ValueError(f"tensor_parallel_size={tp!r} must be an integer >= 1 (1: one process, no tensor "
                             "parallelism; N: N rank processes, each holding 1/N of the model)")
        sizes = dict(max_batch_size=max_batch_size, max_input_len=max_input_len, max_seq_len=max_seq_len,
                     max_num_tokens=max_num_tokens, block_size=block_size, num_blocks=num_blocks)
        for name, value in sizes.items():  # before anything loads: a typo costs no wait
            if value is not None and not is_whole(value, 1):
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if isinstance(gpu_memory_utilization, bool) or not isinstance(gpu_memory_utilization, numbers.Real) \
                or not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization!r} is the fraction of the device's "
                             "memory nbtrt may use: a number in (0, 1], e.g. 0.9")
        self.tensor_parallel_size = int(tp)
        if tp > 1:  # checked before any rank starts
            if batching == "inflight" or backend != "torch":
                raise ValueError(f"tensor_parallel_size={tp} serves static batches of the torch decoder: in-flight "
                                 f"batching over the paged KV cache is not built for tensor parallelism yet; leave "
                                 f"batching (static) and backend ('torch') at their defaults, got batching="
                                 f"{batching!r}, backend={backend!r}")
            self.engine: Engine = tensor_parallel_engine(model, tp, work_dir=work_dir, device=device, dtype=dtype,
                                                         max_batch_size=max_batch_size, max_input_len=max_input_len,
                                                         max_seq_len=max_seq_len)
        else:
            self.engine = resolve_engine(model, backend, work_dir=work_dir, device=device, dtype=dtype,
                                         max_batch_size=max_batch_size, max_input_len=max_input_len,
                                         max_seq_len=max_seq_len)
        cfg = self.engine.config
        self.backend = self.engine.backend
        batching = batching or ("inflight" if self.backend == "torch" else "static")
        if batching not in ("inflight", "static") or (batching == "inflight" and self.backend != "torch"):
            raise ValueError(f"batching={batching!r}: 'inflight' (torch engines) or 'static' (any engine)")
        self.inflight = batching == "inflight"
        seq_len = max_seq_len or self.engine.limits.max_seq_len
        if cfg.position == "learned":
            seq_len = min(seq_len, cfg.max_position_embeddings)
        if not self.inflight:  # the engine's own limits bound every static batch
            seq_len = min(seq_len, self.engine.limits.max_seq_len)
            max_batch_size = min(max_batch_size, self.engine.limits.max_batch_size)
        input_len = min(max_input_len or self.engine.limits.max_input_len, seq_len)
        self.limits = EngineLimits(max_batch_size, input_len, seq_len)
        self.model_name = str(getattr(model, "engine_dir", model)) if not isinstance(model, Engine) else str(model.engine_dir)
        self.max_num_tokens = max_num_tokens
        self.pool = self.scheduler = self.runner = None
        if self.inflight:
            from .runner import ModelRunner

            dev = self.engine.device
            kv_dtype = self.engine.dtype
            if num_blocks is None:
                reserve = _activation_bytes(cfg, max_num_tokens, max_batch_size, kv_dtype)
                num_blocks = blocks_for_memory(cfg, block_size, kv_dtype, dev, gpu_memory_utilization, reserve)
                if dev.type != "cuda":  # a CPU never needs more than every sequence at full length
                    num_blocks = min(num_blocks, max_batch_size * -(-seq_len // block_size) + 1)
            self.pool = BlockPool(cfg, num_blocks, block_size, kv_dtype, dev, prefix_caching=prefix_caching)
            if verbose:
                print(f"nbtrt.LLM: {self.pool.describe()} on {dev}")
            self.scheduler = Scheduler(self.pool, max_batch_size, max_num_tokens)
            self.runner = ModelRunner(self.engine.model, self.pool, max_batch_size=max_batch_size,
                                      max_seq_len=seq_len, cuda_graphs=cuda_graphs, tiled=tiled)
            if warmup:
                self.runner.warmup(progress=verbose)
        self._cv = threading.Condition()
        self._inbox: list[Sequence] = []
        self._aborts: set[str] = set()
        self._reset_prefix = False
        self._live: dict[str, Sequence] = {}
        self._static_waiting: list[Sequence] = []
        self._counters = {"steps": 0, "overlapped_steps": 0, "tokens_generated": 0, "requests_finished": 0}
        self.overlap = overlap
        self._pending: _Pending | None = None
        self._stopping = False
        self._failed: str | None = None
        self._thread = threading.Thread(target=self._loop, name="nbtrt-llm-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ text helpers
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def sampling(self, **overrides) -> SamplingParams:
        """The model's generation_config.json with ``overrides`` on top: :meth:`Engine.sampling`
        (the end tokens included), so an LLM and its engine stop on the same tokens.

        >>> llm.sampling(max_new_tokens=32, temperature=0.7)  # doctest: +SKIP
        """
        return self.engine.sampling(**overrides)

    # what the chat cell, ChatSession and the debugger read from an engine, so an LLM can stand in
    @property
    def config(self):
        return self.engine.config

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def engine_dir(self) -> Path:
        return self.engine.engine_dir

    @property
    def manifest(self) -> dict:
        return self.engine.manifest

    def encode(self, text: str) -> list[int]:
        return self.engine.encode(text)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation in the model's chat template (see :func:`nbtrt.chat.apply_chat_template`)."""
        from ..chat_template import apply_chat_template

        return apply_chat_template(self.tokenizer, messages)

    def _detokenizer(self, params: SamplingParams) -> Detokenizer | None:
        try:
            tok = self.tokenizer
        except GenerationError:  # an engine without tokenizer files serves token ids only
            if params.stop_strings:
                raise
            return None
        return Detokenizer(tok, params.stop_strings)

    # ------------------------------------------------------------------ requests
    def check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        """Raise :class:`GenerationError` naming the limit a request breaks (before anything is queued)."""
        lim = self.limits
        if not isinstance(params, SamplingParams):
            raise GenerationError(f"sampling_params must be nbtrt.SamplingParams, got {type(params).__name__}")
        if not ids:
            raise GenerationError("prompt is empty")
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)
               or not 0 <= t < self.engine.config.vocab_size]
        if bad:
            raise GenerationError(f"prompt has token ids outside the vocabulary [0, {self.engine.config.vocab_size}): {bad[:5]}")
        if len(ids) > lim.max_input_len:
            raise GenerationError(f"prompt has {len(ids)} tokens, more than max_input_len={lim.max_input_len}")
        if len(ids) + params.max_new_tokens - 1 > lim.max_seq_len:
            raise GenerationError(f"a {len(ids)}-token prompt plus max_new_tokens={params.max_new_tokens} needs "
                                  f"{len(ids) + params.max_new_tokens - 1} positions, more than max_seq_len="
                                  f"{lim.max_seq_len}; use max_new_tokens <= {lim.max_seq_len - len(ids) + 1}")
        if self.scheduler is not None:
            self.scheduler.check_fits(Sequence("?", list(ids), params))

    def _sequence(self, prompt, params: SamplingParams | None, request_id: str | None) -> Sequence:
        params = self.sampling() if params is None else params
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        elif isinstance(prompt, (list, tuple)) or hasattr(prompt, "tolist"):
            ids = list(prompt.tolist() if hasattr(prompt, "tolist") else prompt)
        else:
            raise GenerationError(f"a prompt is text or a list of token ids, got {type(prompt).__name__}")
        self.check_prompt(ids, params)
        rid = request_id if request_id is not None else f"req-{next(_ids)}"
        if rid in self._live:
            raise GenerationError(f"request_id {rid!r} is already running")
        return Sequence(rid, ids, params, detokenizer=self._detokenizer(params))

    def _submit(self, seq: Sequence) -> None:
        with self._cv:
            if self._stopping or self._failed:
                raise RuntimeError(f"this LLM is shut down{': ' + self._failed if self._failed else ''}")
            if seq.request_id in self._live:
                raise GenerationError(f"request_id {seq.request_id!r} is already running")
            seq.arrival_time = time.perf_counter()
            self._live[seq.request_id] = seq
            self._inbox.append(seq)
            self._cv.notify()

    def submit(self, prompt, sampling_params: SamplingParams | None = None, *, on_output,
               request_id: str | None = None) -> str:
        """Queue one request; ``on_output(RequestOutput)`` is called from the engine's loop thread
        once per generated token, the last time with ``finished=True`` (keep it quick). Returns the
        request id. What ``generate`` and ``generate_async`` are built on; benchmarks use it directly.

        >>> rid = llm.submit([1, 2, 3], llm.sampling(max_new_tokens=4), on_output=print)  # doctest: +SKIP
        """
        seq = self._sequence(prompt, sampling_params, request_id)
        seq.on_output = on_output
        self._submit(seq)
        return seq.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request from any thread; its KV blocks are freed within one engine step."""
        with self._cv:
            self._aborts.add(request_id)
            self._cv.notify()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One finished :class:`RequestOutput` per prompt (text or token ids), in order.

        >>> [o.text for o in llm.generate(["Hi!", [1, 2, 3]], llm.sampling(max_new_tokens=8))]  # doctest: +SKIP
        """
        from tqdm.auto import tqdm

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if prompts and all(isinstance(t, numbers.Integral) for t in prompts):
            raise GenerationError("prompts must be a list of prompts: for token ids pass [[1, 2, 3]], not [1, 2, 3]")
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise GenerationError(f"{len(params)} sampling_params for {len(prompts)} prompts")
        seqs = [self._sequence(p, sp, None) for p, sp in zip(prompts, params)]
        results: list[RequestOutput | None] = [None] * len(seqs)
        done = threading.Semaphore(0)
        bar = tqdm(total=len(seqs), desc="generate", disable=not use_tqdm or not seqs)

        def collector(i):
            def on_output(out: RequestOutput):
                if out.finished:
                    results[i] = out
                    bar.update(1)
                    done.release()
            return on_output

        try:
            for i, seq in enumerate(seqs):
                seq.on_output = collector(i)
                self._submit(seq)
            for _ in seqs:
                while not done.acquire(timeout=0.5):
                    if not self._thread.is_alive():
                        raise RuntimeError(f"the engine loop stopped: {self._failed or 'shut down'}")
        except BaseException:
            for seq in seqs:
                self.abort(seq.request_id)
            raise
        finally:
            bar.close()
        errors = [o.error for o in results if o is not None and o.error]
        if errors:
            raise RuntimeError(f"the engine loop failed: {errors[0]}")
        return results  # type: ignore[return-value]

    def generate_async(self, prompt, sampling_params: SamplingParams | None = None, *, streaming: bool = True,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """An async iterator of :class:`RequestOutput` for one request: with ``streaming`` one per
        generated token (``delta_token_ids`` / ``delta_text`` are new; the text may be "" while an
        incomplete character or a possible stop string is held back), else one when finished. Bad
        input raises here; the request is queued when iteration starts; closing the iterator early
        (break, ``aclose()``, a cancelled task) aborts it: its KV blocks are freed within one step.

        >>> async for out in llm.generate_async("Hi!", llm.sampling(max_new_tokens=8)):  # doctest: +SKIP
        ...     print(out.delta_text, end="")
        """
        seq = self._sequence(prompt, sampling_params, request_id)
        return self._stream(seq, streaming)

    async def _stream(self, seq: Sequence, streaming: bool) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        seq.on_output = lambda out: loop.call_soon_threadsafe(queue.put_nowait, out)
        self._submit(seq)
        finished = False
        try:
            while True:
                out = await queue.get()
                finished = out.finished
                if out.error:
                    raise RuntimeError(f"the engine loop failed: {out.error}")
                if finished and not streaming:
                    out.delta_text, out.delta_token_ids = out.text, list(out.token_ids)
                if streaming or finished:
                    yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(seq.request_id)

    def stream(self, prompt, cancel: threading.Event | None = None, stats: GenerationStats | None = None,
               state: GenerationState | None = None, **sampling) -> Iterator[str]:
        """One request's text deltas as its tokens arrive: :meth:`Engine.stream`'s interface, so
        :class:`~nbtrt.chat.ChatSession`, the chat cell and ``nbtrt chat`` run on an LLM and share
        it with other requests. ``cancel`` (set from any thread) or closing the stream aborts the
        request; ``stats`` and ``state`` are filled in as for an engine. Bad input raises here.

        >>> for delta in llm.stream("Hi!", max_new_tokens=16): print(delta, end="")  # doctest: +SKIP
        """
        seq = self._sequence(prompt, self.sampling(**sampling), None)
        state = state or GenerationState([seq.prompt], stats=stats or GenerationStats())
        return self._stream_sync(seq, cancel or threading.Event(), state)

    def _stream_sync(self, seq: Sequence, cancel: threading.Event, state: GenerationState) -> Iterator[str]:
        outputs: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        seq.on_output = outputs.put
        state.prompts, state.tokens, state.finished, state.cancelled = [seq.prompt], [[]], [False], False
        state.stats.begin(len(seq.prompt))
        self._submit(seq)  # at the first read, as an engine's stream starts then
        finished = aborted = False
        try:
            while not finished:
                if cancel.is_set() and not aborted:
                    self.abort(seq.request_id)  # the loop ends it within one step and says "abort"
                    aborted = True
                try:
                    out = outputs.get(timeout=0.05)
                except queue.Empty:
                    if not self._thread.is_alive():
                        raise RuntimeError(f"the engine loop stopped: {self._failed or 'shut down'}") from None
                    continue
                if out.error:
                    raise RuntimeError(f"the engine loop failed: {out.error}")
                finished = out.finished
                if out.delta_token_ids:
                    state.tokens[0] += out.delta_token_ids
                    state.stats.record(len(out.delta_token_ids))
                if finished:
                    state.finished[0] = out.finish_reason == "stop"
                    state.cancelled = out.finish_reason == "abort"
                if out.delta_text:
                    yield out.delta_text
        finally:
            if not finished:  # closed early, cancelled, or failed: free its blocks now
                self.abort(seq.request_id)

    def reset_prefix_cache(self) -> None:
        """Forget the prefix cache before the next step: the prompts after it are computed in full
        (a fair start for a before/after measurement on one LLM; vLLM has the same call)."""
        with self._cv:
            self._reset_prefix = True
            self._cv.notify()

    def stats(self) -> dict:
        """Live counters (safe to read from any thread)."""
        sched = self.scheduler
        return {"running": len(sched.running) if sched else 0,
                "waiting": (len(sched.waiting) if sched else len(self._static_waiting)) + len(self._inbox),
                "kv_blocks_used": self.pool.used if self.pool else 0,
                "kv_blocks_total": self.pool.capacity if self.pool else 0,
                "kv_blocks_cached": len(self.pool.evictable) if self.pool else 0,
                "prefix_cached_tokens": sched.cached_tokens if sched else 0,
                **self._counters, "preemptions": sched.preemptions if sched else 0}

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._inbox or self._aborts or self._reset_prefix or self._has_work()):
                        self._cv.wait()
                    if self._stopping:
                        break
                    new, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, set()
                    reset, self._reset_prefix = self._reset_prefix, False
                if reset and self.pool is not None:  # here: the loop thread owns the pool
                    self.pool.forget()
                for seq in new:
                    if self.scheduler is not None:
                        self.scheduler.add(seq)
                    else:
                        self._static_waiting.append(seq)
                for rid in aborts:
                    seq = self._live.get(rid)
                    if seq is not None and not seq.finished:
                        self._finish(seq, "abort")
                        self._emit(seq, [], "")
                if self.scheduler is not None:
                    self._inflight_step()
                elif self._static_waiting:
                    self._static_batch()
        except BaseException as e:  # never leave a caller waiting on a dead loop
            self._failed = f"{type(e).__name__}: {e}"
            for seq in list(self._live.values()) + self._inbox:
                if not seq.finished:
                    seq.status, seq.finish_reason = Status.FINISHED, "abort"
                    self._emit(seq, [], "", error=self._failed)
            raise
        finally:
            for seq in list(self._live.values()):  # shut down: whoever still waits gets an abort
                if not seq.finished:
                    self._finish(seq, "abort")
                    self._emit(seq, [], "")

    def _has_work(self) -> bool:
        return self.scheduler.has_work() if self.scheduler is not None else bool(self._static_waiting)

    def _inflight_step(self) -> None:
        """One step. With ``overlap`` the step that follows a greedy step is launched *before* that
        step's tokens are read back: it feeds them from the device, and the host reads them, streams
        them and checks stops while the GPU computes (TensorRT-LLM's overlap scheduler). A sequence
        that stopped on the token being read has had one extra step computed; it is thrown away."""
        from .runner import plain_greedy, sample

        launched = self._launch()
        if launched is None:
            return
        batch, logits, unread = launched
        self._counters["steps"] += 1
        ready = [s for s in batch.seqs if s.num_computed == s.num_tokens]  # rows of logits, in order
        if ready and self.overlap and all(map(plain_greedy, ready)):
            self._pending = _Pending(ready, logits.argmax(-1), whole=len(ready) == len(batch.seqs))
        if unread is not None:  # the step before: read while this one computes
            self._read_back(unread)
        if self._pending is not None:
            for seq in ready:
                seq.pending = 0 if seq.finished else 1
        elif ready:
            for seq, token in zip(ready, sample(ready, logits)):
                if not seq.finished:
                    self._advance(seq, token)

    def _launch(self):
        """Start the next step: chained onto the pending step's tokens on the device where it can be,
        else after reading them back and scheduling afresh. -> (batch, logits, the step still to
        read back, or None), or None when there is no work."""
        pending, self._pending = self._pending, None
        chained = self._chained_batch(pending) if pending is not None else None
        if chained is not None:
            batch, fed = chained
            self._counters["overlapped_steps"] += 1
            return batch, self.runner.step(batch, fed), pending
        if pending is not None:
            self._read_back(pending)
        batch = self.scheduler.schedule()
        if not batch:
            return None
        for seq in batch.seqs:
            seq.scheduled_time = seq.scheduled_time or time.perf_counter()
        return batch, self.runner.step(batch), None

    def _chained_batch(self, p: "_Pending"):
        """The next step as decodes of ``p``'s sequences, if it can run before ``p`` is read back:
        ``p`` held every running sequence, none of them is mid-prompt, nobody waiting could be
        admitted instead, and every one has a block for its next token. A sequence whose pending
        token is its last (max_new_tokens) is left out. -> (batch, their input ids on the device) or None."""
        sched = self.scheduler
        live = [s for s in p.seqs if not s.finished]
        if not p.whole or len(live) != len(sched.running):
            return None
        rows = [i for i, s in enumerate(p.seqs) if not s.finished and len(s.output) + 1 < s.params.max_new_tokens]
        seqs = [p.seqs[i] for i in rows]
        if not seqs or len(seqs) > sched.max_num_tokens or (sched.waiting and len(seqs) < sched.max_batch_size):
            return None
        pool = self.pool
        if sum(pool.blocks_needed(s.block_table, s.num_computed + 1) for s in seqs) > pool.num_free:
            return None
        for s in seqs:
            pool.grow(s.block_table, s.num_computed + 1)
        fed = p.tokens[:len(rows)] if rows[-1] == len(rows) - 1 else p.tokens[torch.tensor(rows, device=p.tokens.device)]
        return ScheduledBatch(seqs, [1] * len(seqs)), fed

    def _read_back(self, p: "_Pending") -> None:
        """Read a step's sampled tokens (waits for that step only) and hand them to their sequences."""
        for seq, token in zip(p.seqs, p.host()):
            seq.pending = 0
            if not seq.finished:
                self._advance(seq, token)

    def _static_batch(self) -> None:
        """Static batching: the oldest request and those waiting with the same sampling options (any
        max_new_tokens: each row stops at its own), up to the batch size and while the left-padded
        batch fits max_seq_len, as one static batch through the engine's generation loop."""
        from ..generate import GenerationState, generate_tokens

        def options(seq):
            return replace(seq.params, max_new_tokens=1)

        first = self._static_waiting[0]
        batch, width, new = [], 0, 0
        for seq in self._static_waiting:
            w, n = max(width, len(seq.prompt)), max(new, seq.params.max_new_tokens)
            if options(seq) == options(first) and w + n - 1 <= self.limits.max_seq_len:
                batch.append(seq)
                width, new = w, n
                if len(batch) == self.limits.max_batch_size:
                    break
        self._static_waiting = [s for s in self._static_waiting if s not in batch]
        params = replace(first.params, max_new_tokens=new)
        state = GenerationState([s.prompt for s in batch])
        now = time.perf_counter()
        for seq in batch:
            seq.status, seq.scheduled_time = Status.RUNNING, now
        for step in generate_tokens(self.engine, state.prompts, params, state=state):
            self._counters["steps"] += 1
            with self._cv:
                aborts, self._aborts = self._aborts & {s.request_id for s in batch}, self._aborts - {s.request_id for s in batch}
            for b, (seq, token) in enumerate(zip(batch, step)):
                if seq.request_id in aborts and not seq.finished:
                    self._finish(seq, "abort")
                    self._emit(seq, [], "")
                elif token is not None and not seq.finished:
                    self._advance(seq, token)
                state.finished[b] = state.finished[b] or seq.finished
        for seq in batch:  # the loop's own end (all finished): nothing left over
            if not seq.finished:
                self._finish(seq, "length")
                self._emit(seq, [], "")

    def _advance(self, seq: Sequence, token: int) -> None:
        now = time.perf_counter()
        seq.first_token_time = seq.first_token_time or now
        seq.output.append(token)
        self._counters["tokens_generated"] += 1
        delta = seq.detokenizer.add(token) if seq.detokenizer else ""
        reason = None
        if token in seq.params.stop_token_ids or (seq.detokenizer is not None and seq.detokenizer.stopped):
            reason = "stop"
        elif len(seq.output) >= seq.params.max_new_tokens:
            reason = "length"
        if reason:
            if seq.detokenizer is not None:
                delta += seq.detokenizer.flush()
            self._finish(seq, reason)
        seq.text += delta
        self._emit(seq, [token], delta)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if self.scheduler is not None:
            self.scheduler.finish(seq, reason)
        else:
            if seq in self._static_waiting:
                self._static_waiting.remove(seq)
            seq.status, seq.finish_reason = Status.FINISHED, seq.finish_reason or reason
        seq.finish_time = time.perf_counter()
        self._counters["requests_finished"] += 1
        self._live.pop(seq.request_id, None)

    def _emit(self, seq: Sequence, delta_ids: list[int], delta_text: str, error: str | None = None) -> None:
        if seq.on_output is None:
            return
        out = RequestOutput(seq.request_id, seq.prompt, seq.text, list(seq.output), delta_text, delta_ids,
                            seq.finished, seq.finish_reason if seq.finished else None, seq.metrics(), error)
        try:
            seq.on_output(out)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            if not seq.finished:
                self._finish(seq, "abort")

    # ------------------------------------------------------------------ lifetime
    def shutdown(self) -> None:
        """Stop the loop thread (requests still running end with finish_reason "abort") and free the cache."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self.runner = None
        if self.pool is not None:
            self.pool.k, self.pool.v = [], []
        if self.tensor_parallel_size > 1:  # the LLM started the ranks: it stops them
            self.engine.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        c, lim = self.engine.config, self.limits
        how = (f"in-flight batching, {self.pool.describe()}" if self.inflight
               else f"static batches of up to {lim.max_batch_size} (no in-flight batching on {self.backend})")
        if self.tensor_parallel_size > 1:
            how += f", tensor_parallel_size={self.tensor_parallel_size}"
        return (f"<nbtrt.LLM {c.architecture} backend={self.backend} device={self.engine.device} {how}; "
                f"max_seq_len={lim.max_seq_len} max_num_tokens={self.max_num_tokens}>")


class _Pending:
    """A step's greedy tokens on their way to the host: ``tokens`` on the device (the next step may
    feed them), a copy into pinned memory started at once. ``whole``: every sequence of the step
    sampled (none was mid-prompt)."""

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor, whole: bool):
        self.seqs, self.tokens, self.whole = seqs, tokens, whole
        if tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host, self._done = tokens, None

    def host(self) -> list[int]:
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()


def _activation_bytes(cfg, max_num_tokens: int, max_batch_size: int, dtype: torch.dtype) -> int:
    """A generous bound on one step's activations, kept out of the KV pool (plus 1 GiB for graphs
    and the allocator's slack)."""
    size = torch.tensor([], dtype=dtype).element_size()
    per_token = (4 * cfg.hidden_size + 3 * cfg.intermediate_size + cfg.qkv_size) * size
    return 2 * max_num_tokens * per_token + 2 * max_batch_size * cfg.vocab_size * 4 + (1 << 30)
