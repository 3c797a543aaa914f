"""The TensorRT engine: the exported ONNX graph (see :mod:`nbtrt.export`) built into a plan.

Written against TensorRT's documented Python API (>= 10) and kept thin. TensorRT cannot be
installed on this project's machines (DESIGN.md), so this module has not been executed
there; ``available()`` says why it cannot run, and ``nbtrt.build(..., backend="tensorrt")``
then stops before writing anything.

Build::

    model.onnx ──OnnxParser──▶ network ──BuilderConfig──▶ model.plan
                               (strongly typed when the graph carries Q/DQ)
    config: FP16 / BF16 flag (weakly typed graphs), two optimization profiles
            0 "context":    batch 1..max_batch, seq 1..max_input_len, past 0
            1 "generation": batch 1..max_batch, seq 1,                past 1..max_seq_len-1
            timing cache file shared by all builds, builder_optimization_level,
            WORKSPACE pool limit, an IProgressMonitor feeding tqdm bars

Run: deserialize the plan, one execution context per profile, torch CUDA tensors bound
with ``set_tensor_address``, ``execute_async_v3`` on a torch CUDA stream. The KV cache
follows the ONNX contract: each step's ``present`` tensors are the next step's ``past``.

>>> edir = nbtrt.build("work/ckpt", "work/engine-trt", backend="tensorrt", dtype="float16")  # doctest: +SKIP
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from .._io import write_atomic
from ..engine import Engine, EngineLimits, register_backend
from ..export import MODEL_FILE, input_names, module_outputs, output_names
from ..errors import GenerationError
from ..model import positions_from_mask
from ..zoo import cache_root
from .onnxruntime import OnnxRuntimeEngine, check_build_options, export_into

PLAN_FILE = "model.plan"
BUILD_OPTIONS = {
    "dtype": None,              # export precision; None keeps the checkpoint's
    "builder_opt_level": 3,     # 0 (fast build) .. 5 (slow build, maybe faster engine)
    "workspace_gib": 4.0,       # WORKSPACE memory pool limit
    "timing_cache": None,       # file reused across builds; None: $NBTRT_CACHE/tensorrt/timing.cache
    "strongly_typed": None,     # None: strongly typed exactly when the graph has Q/DQ nodes
    "debug_outputs": [],        # module names (e.g. "layers.3.attn") marked as outputs for capture()
}
CONTEXT, GENERATION = 0, 1  # optimization profile indices


def _trt():
    import tensorrt as trt

    return trt


@register_backend
class TensorRTEngine(Engine):
    """A TensorRT plan built from the exported graph (needs ``tensorrt`` >= 10 and an NVIDIA GPU)."""

    backend = "tensorrt"

    @classmethod
    def available(cls) -> str | None:
        try:
            trt = _trt()
        except ImportError:
            return "the tensorrt package is not installed (pip install 'nbtrt[tensorrt]'; needs an NVIDIA GPU)"
        if int(trt.__version__.split(".")[0]) < 10:
            return f"tensorrt {trt.__version__} is installed; nbtrt needs tensorrt >= 10"
        if not torch.cuda.is_available():
            return "no CUDA device is visible (TensorRT builds and runs on an NVIDIA GPU)"
        return None

    # ------------------------------------------------------------------ build
    @classmethod
    def _build_files(cls, ckpt_dir, out, cfg, limits, options):
        options = check_build_options(cls.backend, options, BUILD_OPTIONS)
        export_into(ckpt_dir, out, cfg, options["dtype"])
        cache = Path(options["timing_cache"] or _default_timing_cache())
        build_plan(out / MODEL_FILE, out / PLAN_FILE, cfg, limits, options, cache)
        return {**options, "timing_cache": str(cache), "tensorrt_version": _trt().__version__}

    # ------------------------------------------------------------------ run
    def __init__(self, engine_dir: Path, manifest: dict, device: str = "cuda"):
        super().__init__(engine_dir, manifest)
        trt = _trt()
        self.device = torch.device(device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine((engine_dir / PLAN_FILE).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT cannot deserialize {engine_dir / PLAN_FILE} (built by another TensorRT "
                               "version or GPU?); rebuild the engine on this machine")
        self.stream = torch.cuda.Stream(device=self.device)
        self.contexts = []
        for profile in (CONTEXT, GENERATION):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.contexts.append(ctx)
        self.past_names = input_names(self.config)[3:]
        self.output_names = output_names(self.config)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        to_torch = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                    trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
        self._dtypes = {n: to_torch[self.engine.get_tensor_dtype(n)] for n in names}  # looked up every step
        self.marked = [n for n in names if n not in self.output_names and
                       self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dummy = torch.zeros(1, device=self.device)  # a valid address for zero-sized tensors
        self._past: list[torch.Tensor] = []
        self._past_len = 0

    def begin(self, batch_size: int) -> None:
        self.check_batch(batch_size)
        cfg = self.config
        dtype = self._dtypes[self.past_names[0]]
        self._past = [torch.empty(batch_size, cfg.num_kv_heads, 0, cfg.head_dim, dtype=dtype, device=self.device)
                      for _ in self.past_names]
        self._past_len = 0

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        self.check_step(self._past_len, T)
        if self._past_len > 0 and T != 1:
            raise GenerationError("after the prompt, this engine takes one token per step (generation profile)")
        outs = self._run(input_ids, attention_mask, self.output_names)
        self._past = [outs[n] for n in self.output_names[1:]]
        self._past_len += T
        return outs["logits"][:, -1]

    def _run(self, input_ids, attention_mask, names: list[str]) -> dict[str, torch.Tensor]:
        ctx = self.contexts[CONTEXT if self._past_len == 0 else GENERATION]
        T = input_ids.shape[1]
        feeds = {"input_ids": input_ids, "position_ids": positions_from_mask(attention_mask)[:, -T:],
                 "attention_mask": attention_mask, **dict(zip(self.past_names, self._past))}
        with torch.cuda.stream(self.stream):
            for name, t in feeds.items():
                t = t.to(self.device, self._dtypes[name]).contiguous()
                feeds[name] = t  # keep a reference until the stream is done with it
                ctx.set_input_shape(name, tuple(t.shape))
                ctx.set_tensor_address(name, self._address(t))
            outs = {}
            for name in names:
                outs[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self._dtypes[name],
                                         device=self.device)
                ctx.set_tensor_address(name, self._address(outs[name]))
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed; see the TensorRT log above")
        self.stream.synchronize()
        return outs

    module_table = OnnxRuntimeEngine.module_table  # the same graph metadata, read once

    def _capture(self, prompts, names):
        table = self.module_table
        missing = [n for n in names if table.get(n) not in (*self.marked, "logits")]
        if missing:
            raise GenerationError(f"{missing[:3]} are not outputs of this plan (TensorRT fixes its outputs at build "
                                  f"time); rebuild with debug_outputs={list(names)}")
        ids = torch.tensor(prompts, device=self.device)
        self.begin(len(prompts))
        outs = self._run(ids, torch.ones_like(ids), [*self.output_names, *self.marked])
        self._past = []
        return outs["logits"].float().cpu(), {n: outs[table[n]].float().cpu() for n in names}

    def _address(self, t: torch.Tensor) -> int:
        return t.data_ptr() if t.numel() else self._dummy.data_ptr()


# ------------------------------------------------------------------------------ the builder
def build_plan(onnx_path: Path, plan_path: Path, cfg, limits, options: dict, timing_cache: Path) -> None:
    """Parse ``onnx_path``, configure the builder from ``options`` and serialize the plan."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = options["strongly_typed"]
    if strongly_typed is None:
        strongly_typed = _has_qdq(onnx_path)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads model.onnx.data beside it
        errors = "; ".join(f"node {parser.get_error(i).node()}: {parser.get_error(i).desc()}"
                           for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    _mark_debug_outputs(network, onnx_path, options["debug_outputs"])

    config = builder.create_builder_config()
    if not strongly_typed:  # a strongly typed network takes its precisions from the graph itself
        flag = {"float16": trt.BuilderFlag.FP16, "bfloat16": trt.BuilderFlag.BF16}.get(options["dtype"] or cfg.dtype)
        if flag is not None:
            config.set_flag(flag)
    config.builder_optimization_level = int(options["builder_opt_level"])
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options["workspace_gib"] * (1 << 30)))
    for shapes in optimization_profiles(cfg, limits):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)

    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _progress_monitor()  # must outlive the build
    config.progress_monitor = monitor
    try:
        plan = builder.build_serialized_network(network, config)
    finally:
        monitor.close()
    if plan is None:
        raise RuntimeError("TensorRT could not build the engine; see the TensorRT log above "
                           "(a larger workspace_gib or smaller limits may help)")
    plan_path.write_bytes(bytes(plan))
    write_atomic(timing_cache, bytes(cache.serialize()))  # shared by builds: never half-written


def optimization_profiles(cfg, limits) -> list[dict[str, tuple]]:
    """(min, opt, max) shapes per input for the context (prefill) and generation (decode) profiles."""
    B, L, S = limits.max_batch_size, limits.max_input_len, limits.max_seq_len
    batch = (1, max(1, B // 2), B)

    def profile(seq: tuple, past: tuple) -> dict[str, tuple]:  # seq, past: (min, opt, max)
        total = tuple(s + p for s, p in zip(seq, past))
        shapes = {"input_ids": tuple(zip(batch, seq)), "position_ids": tuple(zip(batch, seq)),
                  "attention_mask": tuple(zip(batch, total))}
        for name in input_names(cfg)[3:]:
            shapes[name] = tuple((b, cfg.num_kv_heads, p, cfg.head_dim) for b, p in zip(batch, past))
        return shapes

    return [profile(seq=(1, max(1, L // 2), L), past=(0, 0, 0)),
            profile(seq=(1, 1, 1), past=(1, S // 2, S - 1))]


def profile_table(cfg, max_batch_size: int, max_input_len: int, max_seq_len: int) -> list[dict]:
    """:func:`optimization_profiles` for these limits as rows (profile, input, min, opt, max), for
    display; layer 0's past_key_values stand for every layer's."""
    names = ("context", "generation")
    profiles = optimization_profiles(cfg, EngineLimits(max_batch_size, max_input_len, max_seq_len))
    return [{"profile": names[i], "input": name, "min": lo, "opt": opt, "max": hi}
            for i, shapes in enumerate(profiles) for name, (lo, opt, hi) in list(shapes.items())[:5]]


def _has_qdq(onnx_path: Path) -> bool:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


def _mark_debug_outputs(network, onnx_path: Path, names: list[str]) -> None:
    """Mark the named module tensors as extra outputs (only these: marking everything breaks fusions)."""
    if not names:
        return
    table = module_outputs(onnx_path)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"debug_outputs {unknown[:3]} are not module names of this graph (e.g. {list(table)[:4]})")
    wanted = {table[n] for n in names} - {"logits"}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            tensor = layer.get_output(j)
            if tensor.name in wanted:
                network.mark_output(tensor)
                wanted.discard(tensor.name)
    if wanted:
        raise RuntimeError(f"TensorRT's network has no tensors named {sorted(wanted)[:3]}")


def _progress_monitor():
    """An IProgressMonitor showing one tqdm bar per builder phase (TensorRT calls it from its threads)."""
    from tqdm.auto import tqdm

    trt = _trt()

    class TqdmMonitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars, self.lock = {}, threading.Lock()

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self.lock:
                self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, leave=parent_phase is None)

        def step_complete(self, phase_name, step):
            with self.lock:
                if phase_name in self.bars:
                    self.bars[phase_name].n = step + 1
                    self.bars[phase_name].refresh()
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            with self.lock:
                bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

        def close(self):
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()

    return TqdmMonitor()


def _default_timing_cache() -> Path:
    return Path(cache_root()) / "tensorrt" / "timing.cache"
