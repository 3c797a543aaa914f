"""The ONNX Runtime engine: runs the exact graph TensorRT would parse (see :mod:`nbtrt.export`).

This is the check that the ONNX contract computes the HF function; on a machine without
TensorRT it is also the default engine. The KV cache stays in ONNX Runtime's own memory
between steps: each step's ``present`` OrtValues are bound as the next step's ``past``
(IO binding), so the cache never round-trips through numpy. On the CPU that measured no
faster than plain ``session.run`` (smollm2-135m, batch 1: 18.6 vs 18.8 tokens/s, see
benchmarks/cpu_build.py); it is what keeps the cache on the GPU under the CUDA provider.

>>> engine = nbtrt.load(nbtrt.build("work/ckpt", "work/engine", backend="onnxruntime"))  # doctest: +SKIP
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from ..config import check_dtype
from ..engine import Engine, register_backend
from ..export import MODEL_FILE, export_onnx, input_names, module_outputs, output_names, with_outputs
from ..export_ort import all_positions, choose_graph, export_ort_cpu
from ..errors import GenerationError
from ..layouts import FORMATS
from ..model import positions_from_mask

BUILD_OPTIONS = {
    "dtype": None,  # export precision; None keeps the checkpoint's
    # "standard": the TensorRT contract graph (nbtrt.export); "ort-cpu": the same decoder in ONNX
    # Runtime's fused CPU operators (nbtrt.export_ort); "auto": ort-cpu on the CPU where it applies
    "graph": "auto",
    # ort-cpu's quantized matmuls (MatMulNBits): 4 quantizes activations to int8 on the fly, as llama.cpp
    # does (2.4x faster int4 decode measured, and int8 weights have no fast fp32 kernel); 0 computes in
    # fp32 exactly what the checkpoint's reference computes (int8 weights then run as a float MatMul)
    "accuracy_level": 4,
}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


def check_build_options(backend: str, options: dict, known: dict) -> dict:
    """The build options with their defaults filled in; unknown names and dtypes are refused up front,
    before the checkpoint is read."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"backend {backend!r} has no build options {unknown}; it takes {sorted(known)}")
    check_dtype(options.get("dtype"))
    return {**known, **options}


def export_into(ckpt_dir: Path, out: Path, cfg, dtype: str | None) -> None:
    """Export the checkpoint's decoder into the engine directory; the engine's precision is the export's."""
    export_onnx(ckpt_dir, out, dtype=dtype)
    if dtype:
        cfg.dtype = dtype  # engine.json records the engine's precision, not the checkpoint's


def _has_cuda_provider() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@register_backend
class OnnxRuntimeEngine(Engine):
    """The exported graph run by ONNX Runtime (CUDA provider where onnxruntime-gpu is installed, else CPU)."""

    backend = "onnxruntime"

    @classmethod
    def available(cls) -> str | None:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as e:
            return f"{e.name} is not installed (pip install onnx onnxruntime)"
        return None

    @classmethod
    def _build_files(cls, ckpt_dir, out, cfg, limits, options):
        options = check_build_options(cls.backend, options, BUILD_OPTIONS)
        if (options["dtype"] or cfg.dtype) == "bfloat16":
            # numpy, through which this engine feeds the KV cache and reads logits, has no bfloat16
            raise ValueError("ONNX Runtime's CPU provider has no bfloat16 kernels and this engine exchanges "
                             "its KV cache and logits as numpy arrays, which have no bfloat16; build it with "
                             "dtype='float32' or 'float16' (or use backend='torch')")
        graph = choose_graph(options["graph"], cfg, options["dtype"], on_cuda=_has_cuda_provider())
        if graph == "ort-cpu":
            export_ort_cpu(ckpt_dir, out, limits.max_seq_len, accuracy_level=options["accuracy_level"])
        else:
            export_into(ckpt_dir, out, cfg, options["dtype"])
        return {**options, "graph": graph}  # engine.json records the flavour built, which load follows

    def __init__(self, engine_dir: Path, manifest: dict, provider: str | None = None, threads: int = 0,
                 io_binding: bool = True, accuracy_level: int = 1):
        """``threads=0`` lets ONNX Runtime use one thread per physical core (its default).

        ``accuracy_level`` is the compute precision ONNX Runtime picks when it fuses a quantized
        weight's DequantizeLinear -> MatMul into its MatMulNBits kernel: 1 computes in fp32, exactly
        what the graph says (the default: this engine is the check of that graph); 4 (ONNX Runtime's
        own default) also quantizes the activations to int8 on the fly — faster on int8/int4
        checkpoints, but no longer the function TensorRT is given.
        """
        super().__init__(engine_dir, manifest)
        import onnxruntime as ort

        self.session_config = {"session.qdq_matmulnbits_accuracy_level": str(accuracy_level)}
        if self._keep_qdq_unfused(accuracy_level):
            self.session_config["session.disable_quant_qdq"] = "1"
        self.threads = threads
        available = ort.get_available_providers()
        self.provider = provider or ("CUDAExecutionProvider" if _has_cuda_provider() else "CPUExecutionProvider")
        if self.provider not in available:
            raise RuntimeError(f"ONNX Runtime provider {self.provider} is not available here ({available})")
        self.ort_device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self.graph = manifest.get("options", {}).get("graph", "standard")
        self.session = self._session(engine_dir / MODEL_FILE)
        # ort-cpu: GroupQueryAttention appends to the KV buffers in place, which needs them bound
        self.io_binding = io_binding or self.graph == "ort-cpu"
        self.kv_dtype = NUMPY_DTYPES.get(self.config.dtype, np.float32)
        self.past_names = input_names(self.config)[3:]
        self.output_names = output_names(self.config)
        self._past: list = []
        self._kv_buffers: list = []  # ort-cpu: the in-place KV cache, kept across requests of one batch size
        self._past_len = 0
        self._capture_cache = None  # (names, session) of the last capture graph
        self._batch = 0

    def _keep_qdq_unfused(self, accuracy_level: int) -> bool:
        """Whether ONNX Runtime should run the graph's Q/DQ nodes as written instead of fusing them.

        FP8: ONNX Runtime 1.31 fuses an FP8 DequantizeLinear -> MatMul into MatMulIntegerToFloat,
        which then rejects float8 inputs. INT8 weights at accuracy_level 1: its 8-bit MatMulNBits
        with fp32 compute measured 334 ms per token on smollm2-135m (1 thread), the unfused
        DequantizeLinear -> MatMul 68 ms. INT4 keeps the fusion: its 4-bit kernel is the fast one.
        """
        q = self.config.quantization
        weights = FORMATS[q.format].weight if q.format else None
        return "fp8" in (weights, q.kv_cache) or (weights == "int8" and accuracy_level == 1)

    def _session(self, path: Path, graph: bytes | None = None):
        """A session for ``path``, or for ``graph`` (a serialized variant of it) whose external
        weights are read from ``path``'s folder."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        config = dict(self.session_config)
        if graph is not None:
            config["session.model_external_initializers_file_folder_path"] = str(path.parent)
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        try:
            return ort.InferenceSession(graph if graph is not None else str(path), options, providers=[self.provider])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types; name the file and the remedy
            first = str(e).splitlines()[0][:300]
            if "NOT_IMPLEMENTED" in first:
                raise RuntimeError(f"ONNX Runtime's {self.provider} cannot run {path}: {first}; rebuild the "
                                   "engine with a precision it has kernels for (dtype='float32')") from None
            if "INVALID_PROTOBUF" in first or "INVALID_GRAPH" in first or "Protobuf parsing failed" in first:
                raise RuntimeError(f"ONNX Runtime cannot load {path}: {first}; the file is corrupted or "
                                   "incomplete: rebuild the engine") from None
            # memory, a missing CUDA library, a provider that fails to start: the file may be fine
            raise RuntimeError(f"ONNX Runtime's {self.provider} could not create a session for {path}: {first} "
                               f"(if the engine files were changed, nbtrt.load(..., verify=True) checks them)") from None

    # ------------------------------------------------------------------ engine API
    def begin(self, batch_size: int) -> None:
        self.check_batch(batch_size)
        cfg = self.config
        if self.graph == "ort-cpu":
            import onnxruntime as ort

            if self._batch != batch_size or not self._kv_buffers:
                # GroupQueryAttention reads only the first total_sequence_length positions: a reused
                # buffer's old contents are never seen, so it is neither cleared nor reallocated
                shape = (batch_size, cfg.num_kv_heads, self.limits.max_seq_len, cfg.head_dim)
                self._kv_buffers = [ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cpu", 0)
                                    for _ in self.past_names]
            self._past = self._kv_buffers
        else:
            empty = np.zeros((batch_size, cfg.num_kv_heads, 0, cfg.head_dim), self.kv_dtype)
            self._past = [self._ortvalue(empty) for _ in self.past_names]
        self._batch, self._past_len = batch_size, 0

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        if not self._past or self._batch != B:
            raise GenerationError(f"call begin({B}) before stepping a batch of {B}")
        self.check_step(self._past_len, T)
        outs = self._run(self.session, input_ids, attention_mask, self.output_names)
        if self.graph != "ort-cpu":  # ort-cpu's presents are its pasts, written in place
            self._past = outs[1:]
        self._past_len += T
        return torch.from_numpy(self._numpy(outs[0])[:, -1])

    def _run(self, session, input_ids, attention_mask, names: list[str]) -> list:
        """One forward through the graph with ``self._past``; returns the named outputs (OrtValues
        under IO binding, numpy arrays otherwise)."""
        feeds = self._feeds(input_ids, attention_mask)
        if not self.io_binding:
            return session.run(names, {**feeds, **dict(zip(self.past_names, self._past))})
        binding = session.io_binding()
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, self._ortvalue(array))
        for name, value in zip(self.past_names, self._past):
            binding.bind_ortvalue_input(name, value)
        shared = dict(zip(self.output_names[1:], self._past)) if self.graph == "ort-cpu" else {}
        for name in names:
            if name in shared:  # present.{i}.key is past_key_values.{i}.key: one buffer, appended in place
                binding.bind_ortvalue_output(name, shared[name])
            else:
                binding.bind_output(name, self.ort_device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _feeds(self, input_ids, attention_mask) -> dict[str, np.ndarray]:
        """The graph's inputs besides the KV cache, for either flavour."""
        T = input_ids.shape[1]
        feeds = {"input_ids": input_ids.cpu().numpy().astype(np.int64)}
        mask = attention_mask.cpu().numpy()
        if self.graph != "ort-cpu":
            return {**feeds, "position_ids": positions_from_mask(attention_mask)[:, -T:].cpu().numpy(),
                    "attention_mask": mask.astype(np.int64)}
        # GroupQueryAttention masks causally by itself; left padding is an additive bias over the keys.
        # Every row of a left-padded batch has the same total length, so seqlens_k is that for all, and
        # rotary takes each token's slot in the cache as its position: a row's positions are then its
        # mask-derived ones plus its padding, one shift for queries and keys alike, which RoPE's
        # relative scores do not see (HF's logits are matched to float rounding, tests/test_onnx.py).
        B, total = mask.shape
        bias = np.where(mask[:, None, None, :] == 0, np.finfo(np.float32).min, 0).astype(np.float32)
        return {**feeds, "attention_bias": np.ascontiguousarray(np.broadcast_to(bias, (B, 1, T, total))),
                "seqlens_k": np.full(B, total - 1, np.int32), "total_sequence_length": np.array(total, np.int32)}

    def _ortvalue(self, array: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(array, self.ort_device, 0) if self.io_binding else array

    def _numpy(self, value) -> np.ndarray:
        return value.numpy() if self.io_binding else value

    def _capture(self, prompts, names):
        session, tensors = self._capture_session(names)
        wanted = list(dict.fromkeys([*self.output_names, *tensors.values()]))
        ids = torch.tensor(prompts)
        self.begin(len(prompts))
        outs = dict(zip(wanted, self._run(session, ids, torch.ones_like(ids), wanted)))
        self._past = []  # a capture is not a generation step: the next request begins anew
        logits = torch.from_numpy(self._numpy(outs["logits"])).float()
        return logits, {n: torch.from_numpy(self._numpy(outs[t])).float() for n, t in tensors.items()}

    @functools.cached_property
    def module_table(self) -> dict[str, str]:
        """{module name: graph tensor name}, read once from the graph's metadata."""
        return module_outputs(self.engine_dir / MODEL_FILE)

    def _capture_session(self, names: list[str]):
        """A session over a variant of the graph with the requested module tensors as extra outputs."""
        table = self.module_table
        if self._capture_cache is None or self._capture_cache[0] != names:
            self._capture_cache = None
            proto = with_outputs(self.engine_dir / MODEL_FILE, names)
            if self.graph == "ort-cpu":
                all_positions(proto)  # its generation graph computes the last position's logits only
            # run from memory, weights read in place: no copy of a model-sized file per capture
            self._capture_cache = (names, self._session(self.engine_dir / MODEL_FILE, proto.SerializeToString()))
        return self._capture_cache[1], {n: table[n] for n in names}
