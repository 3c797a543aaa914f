"""The PyTorch engine: the nbtrt decoder with a static KV cache, eager or compiled.

Compiled (the default on CUDA), gpt-fast style but *regional*:

- each decoder block goes through ``torch.compile`` (Inductor) once and that one graph serves
  every layer, so compile time does not grow with depth (the pieces: :mod:`.torch_attention`);
- prefill has a dynamic sequence length and attends over the filled cache slots only (an
  unpadded prefill with no past runs plain causal attention: no [T, T] mask to build);
- opt-in (``graph_prefill=True`` at load), a causal prompt of up to ``GRAPH_PREFILL_TOKENS``
  is padded to a bucketed length and prefilled by one CUDA graph replay (first token off the host);
- decode has static shapes and the whole step is captured in one CUDA graph per batch size,
  so a token costs one graph replay instead of hundreds of kernel launches; on Hopper its
  kernels are programmatic dependent launches, each starting as the one before it ends, and its
  attention is nbtrt's flash-decoding kernels (:mod:`nbtrt.kernels.triton_attention`);
- quantized linears (INT8 / INT4 weight-only, FP8, W8A8; from an nbtrt.quantize checkpoint or
  quantized at load) replace ``nn.Linear`` in place (:mod:`.torch_linears`); which kernel runs a
  call of how many rows is one table, in :mod:`nbtrt.kernels`.

Inductor tunes every kernel it generates the first time it runs; on CUDA the engine has it time
them as the graph runs them, without the host's launch (``inductor_timing``). Inductor's on-disk
cache (FX graph cache) makes a reload compile in seconds. Capture (the debugger) runs the same
modules eagerly through forward hooks.

>>> engine = nbtrt.load(nbtrt.build(ckpt, "work/engine", backend="torch", quant="int8_wo"))  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from .._io import link_or_copy
from ..checkpoint import WEIGHTS
from ..config import check_dtype
from ..engine import Engine, EngineLimits, register_backend
from ..errors import GenerationError
from ..kernels import INT4_TRITON_MAX_ROWS, MANY_ROWS, cuda_int8, inductor_timing, triton_int8
from ..model import TORCH_DTYPES, Decoder, StaticKVCache, capture_outputs, load_decoder
from . import torch_attention as pieces  # read at call time: experiments swap a piece (benchmarks/gpu.py)
from .torch_attention import GRAPH_PREFILL_TOKENS, prefill_bucket  # noqa: F401  (GRAPH_PREFILL_TOKENS: public)
from .torch_linears import (QUANT_FORMATS, Int4WeightOnlyLinear, Int8WeightOnlyLinear, accelerate_quantized,
                            quant_format, quant_unavailable, quantize_linears)

DYNAMO_RECOMPILE_LIMIT = 64  # every engine in a process shares the compiled functions' caches
# renamed from cache_size_limit in recent PyTorch
_LIMIT_KEY = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
# Every attention backend but cuDNN's, which builds a plan for each new sequence length: on an H100
# a prompt of a length not seen before took 56-277 ms to prefill (qwen2.5-0.5b config), against
# 9-12 ms for any length without it (README, "The first token").
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _pick_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@contextlib.contextmanager
def _compiling(desc: str, enabled: bool = True):
    """A progress line around a step that may compile (first time only; Inductor caches it)."""
    if not enabled:
        yield
        return
    bar = tqdm(total=1, desc=desc, bar_format="{desc}: {elapsed}", leave=False)
    try:
        yield
        bar.update(1)
    finally:
        bar.close()



# ------------------------------------------------------------------------------ the engine
@register_backend
class TorchEngine(Engine):
    """The nbtrt decoder run by PyTorch with a static KV cache; compiled with CUDA graphs on GPU.

    Build options (recorded in engine.json, overridable at load): ``compile`` (True / False /
    "auto": on for CUDA), ``quant`` (None or one of :data:`QUANT_FORMATS`, applied to the float
    weights at load; a quantized checkpoint brings its own), ``dtype`` (cast the weights, e.g.
    "bfloat16"). Load only: ``graph_prefill`` (short causal prompts prefilled by CUDA graph
    replays: a first token sooner, decode a few percent slower; README, "Graphed prefills").

    >>> engine = nbtrt.load(nbtrt.build(ckpt, "work/e", backend="torch", dtype="bfloat16"))  # doctest: +SKIP
    >>> chat_engine = nbtrt.load("work/e", graph_prefill=True)  # doctest: +SKIP
    >>> engine = TorchEngine.from_decoder(model, max_seq_len=512)  # in memory, no files  # doctest: +SKIP
    """

    backend = "torch"

    @classmethod
    def _build_files(cls, ckpt_dir, out, cfg, limits, options):
        unknown = sorted(set(options) - {"compile", "quant", "dtype"})
        if unknown:
            raise ValueError(f"unknown torch build options {unknown}; known: compile, quant, dtype")
        if options.get("quant"):
            options = {**options, "quant": quant_format(options["quant"])}
            if options["quant"] not in QUANT_FORMATS:
                raise ValueError(f"quant={options['quant']!r} is not one of {sorted(QUANT_FORMATS)}")
        check_dtype(options.get("dtype"))
        link_or_copy(ckpt_dir / WEIGHTS, out / WEIGHTS)
        link_or_copy(ckpt_dir / "config.json", out / "config.json")
        return dict(options)

    def __init__(self, engine_dir: Path, manifest: dict, device: str | None = None, dtype: str | None = None,
                 compile: bool | str | None = None, quant: str | None = None, warmup: bool = True,
                 model: Decoder | None = None, graph_prefill: bool = False):
        super().__init__(engine_dir, manifest)
        opts = manifest.get("options", {})
        self.device = _pick_device(device)
        self.queues_steps = self.device.type == "cuda"
        dtype = dtype or opts.get("dtype")
        if model is None:

            model = load_decoder(engine_dir, device=self.device, dtype=dtype)
        else:
            model = model.to(device=self.device, dtype=TORCH_DTYPES[dtype] if dtype else None)
        self.model = model.eval().requires_grad_(False)
        self.dtype = self.model.float_dtype
        self.quant = quant if quant is not None else opts.get("quant")
        self.quant = quant_format(self.quant) if self.quant else self.quant
        self.quant_report = None
        if self.config.quantization:
            if self.quant:
                raise RuntimeError(f"{engine_dir} holds a quantized checkpoint ({self.config.quantization.format}); "
                                   f"quant={self.quant!r} applies to float checkpoints only")
            self.quant = self.config.quantization.format
            self.quant_report = accelerate_quantized(self.model, self.dtype)
        elif self.quant:
            reason = quant_unavailable(self.quant, self.device, self.dtype)
            if reason:
                raise RuntimeError(f"cannot load {engine_dir} with quant={self.quant!r}: {reason}")
            self.quant_report = quantize_linears(self.model, self.quant)
        flag = compile if compile is not None else opts.get("compile", "auto")
        self.compiled = self.device.type == "cuda" if flag in (None, "auto") else bool(flag)
        self.cache: StaticKVCache | None = None
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._past = 0
        self._static: dict[int, SimpleNamespace] = {}
        self._pool = None
        self._prefill_kinds: set[tuple] = set()  # (batch > 1, causal): the prefill graphs compiled so far
        self.causal_prefill = True  # False: every prefill takes the masked path (for comparison)
        # True: causal prefills at bucketed lengths through static buffers and, on CUDA, captured
        # graphs (prefill_bucket). Off by default: once a prefill graph is captured in a process,
        # the decode graph's dependent launches stop overlapping (README, "Graphed prefills")
        self.graph_prefill = graph_prefill
        self._prefill_static: dict[tuple[int, int], SimpleNamespace] = {}
        self._quiet = False  # inside warmup(), which shows one line for everything
        self.compile_seconds = 0.0
        eager = (pieces.prelude, pieces.prefill_block, pieces.head)
        self._prefill_fns = self._decode_fns = eager
        if self.compiled:
            # M=1 matmuls become fused reductions (with any dequantization inlined) only with this on;
            # the prefill head is one row per sequence too
            options = {"coordinate_descent_tuning": True} if self.device.type == "cuda" else {}
            # Decode launches its kernels as programmatic dependent launches (sm_90+; Inductor leaves
            # them out elsewhere): each may start while the one before it ends. 8B config on an H100,
            # ms a token: bf16 5.72-5.74 -> 5.54-5.65; INT4 (its own kernel launched so too) 2.32-2.36
            # -> 2.15-2.18, or 2.28 after an INT8 engine in the same process (gpu_pdl_*). Not the
            # prefill, whose kernels run in many waves: with it the 2048-token prefill took 1.47-1.64x
            # its floor, against 1.36-1.51x.
            decode_options = {**options, "triton.enable_pdl": True} if self.device.type == "cuda" else {}
            self._prefill_fns = (torch.compile(pieces.prefill_prelude, dynamic=True, fullgraph=True),
                                 torch.compile(pieces.prefill_block, dynamic=True, fullgraph=True),
                                 torch.compile(pieces.prefill_head, dynamic=True, fullgraph=True, options=options))
            self._decode_fns = tuple(torch.compile(f, dynamic=None, fullgraph=True, options=decode_options)
                                     for f in (pieces.decode_prelude, pieces.decode_block, pieces.decode_head))
            if warmup:
                self.warmup()

    @classmethod
    def from_decoder(cls, model: Decoder, *, max_batch_size: int = 1, max_input_len: int | None = None,
                     max_seq_len: int = 2048, generation_config: dict | None = None, **options) -> "TorchEngine":
        """An engine around an in-memory decoder (no engine directory): benchmarks, tests, the lab.
        The engine takes the decoder over: ``device``, ``dtype`` and ``quant`` change it in place
        (pass ``copy.deepcopy(model)`` to keep the original, e.g. as a debugger reference)."""
        limits = EngineLimits(max_batch_size, max_input_len or max_seq_len, max_seq_len)
        manifest = {"backend": cls.backend, "decoder": model.cfg.to_dict(), "limits": limits.__dict__,
                    "options": {}}
        device = options.pop("device", None) or next(model.parameters()).device
        engine = cls(Path("<memory>"), manifest, device=str(device), model=model, **options)
        engine.generation_config = dict(generation_config or {})
        return engine

    # ------------------------------------------------------------------ compile
    def warmup(self, batch_size: int = 1) -> float:
        """Compile prefill and decode (and capture the decode graph) now rather than at the first
        request. Returns the seconds it took; a reload with Inductor's cache takes a few."""
        start = time.perf_counter()
        with _compiling(f"torch.compile {self.config.architecture} prefill + decode (cached after)"):
            self._quiet = True
            prompt = torch.zeros(batch_size, 2, dtype=torch.long, device=self.device)
            mask = torch.ones_like(prompt)
            self.begin(batch_size)
            self.step(prompt, mask)
            self.step(prompt[:, :1], torch.ones(batch_size, 3, dtype=torch.long, device=self.device))
            for length in self._longer_prefill_lengths(batch_size):
                longer = torch.zeros(batch_size, length, dtype=torch.long, device=self.device)
                self.begin(batch_size)
                self.step(longer, torch.ones_like(longer))
            self.begin(batch_size)
            self._quiet = False
        seconds = time.perf_counter() - start
        self.compile_seconds += seconds
        return seconds

    def _longer_prefill_lengths(self, batch_size: int) -> list[int]:
        """Prompt lengths past 2 tokens that warm-up also prefills. Without a second length the
        first real prompt could compile the prefill again (seen on a config with 2 KV heads);
        and on CUDA, weight-only linears choose their kernel (INT8 its row tile too) by rows."""
        rows = {triton_int8.ROW_TILES[0] + 1}
        weight_only = [m for m in self.model.modules() if isinstance(m, (Int8WeightOnlyLinear, Int4WeightOnlyLinear))]
        if self.device.type == "cuda" and weight_only:
            rows |= {cuda_int8.MAX_ROWS + 1, MANY_ROWS}
            if any(getattr(m, "mma", False) for m in weight_only):  # INT4 in nbtrt's layout: Triton, then cuBLAS
                rows.add(INT4_TRITON_MAX_ROWS + 1)
        lengths = {min(self.limits.max_input_len, -(-r // batch_size)) for r in rows}
        return sorted(n for n in lengths if n > 2)

    def _run(self, fns, input_ids, attention_mask, cache_position, causal: bool = False,
             last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at the last position, or at position ``last`` ([1]) where the prompt was padded."""
        prelude, block, head = fns
        # a first call compiles and tunes its kernels; inductor_timing says why it times them itself
        tuning = (inductor_timing.kernel_timing() if self.compiled and self.device.type == "cuda"
                  else contextlib.nullcontext())
        with torch._dynamo.config.patch(**{_LIMIT_KEY: DYNAMO_RECOMPILE_LIMIT}), tuning, sdpa_kernel(ATTENTION_BACKENDS):
            x, rope, mask = prelude(self.model, input_ids, attention_mask, cache_position, causal)
            for layer, (k, v) in zip(self.model.layers, self._kv):
                x = block(layer, x, rope, mask, k, v, cache_position)
            return head(self.model, x if last is None else x.index_select(1, last))

    # ------------------------------------------------------------------ Engine API
    def release_cache(self) -> None:
        """Free the static KV cache and the CUDA graphs that point into it, with their memory pool
        (before a paged pool of :class:`nbtrt.LLM` takes the memory); the next ``begin`` allocates again."""
        self.cache, self._kv, self._static, self._prefill_static, self._pool = None, [], {}, {}, None

    @torch.inference_mode()
    def begin(self, batch_size: int) -> None:
        if self.cache is None or self.cache.batch_size != batch_size:
            self.release_cache()  # the old buffers and their graphs go before the new ones are allocated
            self.cache = StaticKVCache(self.config, batch_size, self.limits.max_seq_len, dtype=self.dtype,
                                       device=self.device)
            self._kv = [(getattr(self.cache, f"k{i}"), getattr(self.cache, f"v{i}")) for i in range(self.config.num_layers)]
        for st in self._static.values():
            st.mask.zero_()
        self._past = 0

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise GenerationError("call begin(batch_size) before step()")
        B, T = input_ids.shape
        if B != self.cache.batch_size:
            raise GenerationError(f"step got {B} sequences but begin() was called for {self.cache.batch_size}")
        self.check_step(self._past, T)
        if attention_mask.shape != (B, self._past + T):
            raise GenerationError(f"attention_mask must be [batch, past + new] = [{B}, {self._past + T}], "
                                  f"got {list(attention_mask.shape)}")
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device, torch.long)
        if T == 1 and self.compiled:
            logits = self._decode(input_ids, attention_mask)
        else:
            cache_position = torch.arange(self._past, self._past + T, device=self.device)
            window = self.config.sliding_window
            # a [T, T] mask costs a T x T bias per layer and a slower attention kernel; without
            # padding and past, plain causal attention is the same function (one host sync here)
            causal = (self.causal_prefill and self._past == 0 and T > 1 and (window is None or window >= T)
                      and bool(attention_mask.all()))
            bucket = prefill_bucket(T, self.limits.max_seq_len) if causal and self.graph_prefill else None
            if bucket:
                logits = self._graphed_prefill(input_ids, bucket)
            else:
                kind = (B > 1, causal)
                first = self.compiled and kind not in self._prefill_kinds
                with _compiling(f"torch.compile prefill (batch {'>1' if B > 1 else 1})",
                                enabled=first and not self._quiet):
                    logits = self._run(self._prefill_fns, input_ids, attention_mask, cache_position, causal)
                self._prefill_kinds.add(kind)
        self._past += T
        return logits

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One token per sequence through static buffers; on CUDA, one graph replay."""
        B, W = attention_mask.shape
        st = self._static.get(B)
        new = st is None
        if new:
            S = self.limits.max_seq_len
            st = self._static[B] = SimpleNamespace(
                ids=torch.zeros(B, 1, dtype=torch.long, device=self.device),
                mask=torch.zeros(B, S, dtype=torch.long, device=self.device),
                cache_position=torch.zeros(1, dtype=torch.long, device=self.device), graph=None, logits=None)
        st.ids.copy_(input_ids)
        st.mask[:, :W].copy_(attention_mask)
        st.cache_position.fill_(self._past)
        run = lambda: self._run(self._decode_fns, st.ids, st.mask, st.cache_position)  # noqa: E731
        return self._replay(st, run, f"decode (batch {B})", new)

    def _graphed_prefill(self, input_ids: torch.Tensor, length: int) -> torch.Tensor:
        """A causal prefill (no past, no padding) padded on the right to ``length``, through static
        buffers and one CUDA graph per (batch, length). Causal attention keeps the padding out of
        the prompt's rows; its cache slots lie past the prompt, masked until decode overwrites them.
        The logits are the last real token's."""
        B, T = input_ids.shape
        st = self._prefill_static.get((B, length))
        new = st is None
        if new:
            st = self._prefill_static[B, length] = SimpleNamespace(
                ids=torch.zeros(B, length, dtype=torch.long, device=self.device),
                mask=torch.ones(B, length, dtype=torch.long, device=self.device),
                cache_position=torch.arange(length, device=self.device),
                last=torch.zeros(1, dtype=torch.long, device=self.device), graph=None, logits=None)
        st.ids[:, :T].copy_(input_ids)  # the rows past T keep what they held: no real row attends to them
        st.last.fill_(T - 1)
        run = lambda: self._run(self._prefill_fns, st.ids, st.mask, st.cache_position, True, st.last)  # noqa: E731
        return self._replay(st, run, f"prefill (batch {B}, {length} tokens)", new)

    def _replay(self, st: SimpleNamespace, run: Callable[[], torch.Tensor], what: str, new: bool) -> torch.Tensor:
        """``run()`` (one step through ``st``'s static buffers) as a CUDA graph replay; the graph is
        captured on the first call. Off CUDA, ``run()`` itself."""
        if self.device.type != "cuda":
            with _compiling(f"torch.compile {what}", enabled=new and self.compiled and not self._quiet):
                return run()
        if st.graph is None:
            # warm up (compiles) on a side stream, then capture; these runs write the step's keys
            # and values at the step's slots, so they leave the cache as the replay will
            with _compiling(f"torch.compile + CUDA graph {what}", enabled=not self._quiet):
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        run()
                torch.cuda.current_stream(self.device).wait_stream(side)
                # one pool for every graph of this cache: they never run at once, and each keeps its output
                self._pool = self._pool or torch.cuda.graph_pool_handle()
                st.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(st.graph, pool=self._pool):
                    st.logits = run()
        st.graph.replay()
        return st.logits.clone()

    @torch.inference_mode()
    def _capture(self, prompts, names):
        ids = torch.tensor(prompts, device=self.device)
        with capture_outputs(self.model, names) as captured:
            logits = self.model(ids)
        return logits.float().cpu(), captured
