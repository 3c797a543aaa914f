"""Engines: what ``build`` writes and ``load`` returns.

Every backend implements three things — ``_build_files`` (write its files into a new
engine directory), ``begin`` (start a batch: reset the KV cache) and ``step`` (run new
tokens through the model, return logits) — and inherits one generation loop, streaming
and text helpers from :class:`Engine`.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import numbers
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Iterator

import torch

from ._io import (TMP_MARKER, ArtifactError, atomic_dir, check_output, copy_tokenizer_files, eos_list, file_sha256,
                  has_tokenizer, inside, load_tokenizer, read_json, refuse_remote_code, write_json)
from .checkpoint import checkpoint_hash, verify_checkpoint
from .config import DecoderConfig, check_dtype, load_checkpoint_config
from .generate import (GenerationError, GenerationState, GenerationStats, SamplingParams, check_text, generate_text,
                       generate_tokens)
from .turns import Turns, exclusive, leased_stream
from .model import TORCH_DTYPES

ENGINE_JSON = "engine.json"


def token_lists(input_ids) -> list[list[int]]:
    """``input_ids`` as a list of token-id lists (a batch), or a clear error for the usual slips:
    one flat list of ids, or text where ids belong. Tensors and arrays of shape [B, T] are accepted.

    >>> token_lists([[1, 2, 3]])
    [[1, 2, 3]]
    """
    if hasattr(input_ids, "tolist"):
        input_ids = input_ids.tolist()
    if isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, (list, tuple)) \
            or not all(isinstance(p, (list, tuple)) for p in input_ids):
        raise GenerationError("input_ids must be a batch: a list of token-id lists, e.g. [[1, 2, 3]] "
                              "(for text, pass prompts instead)")
    return [list(p) for p in input_ids]


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int = 8
    max_input_len: int = 1024
    max_seq_len: int = 2048

    def __post_init__(self):
        for name in ("max_batch_size", "max_input_len", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name}={value!r} must be an integer")
        if min(self.max_batch_size, self.max_input_len, self.max_seq_len) < 1:
            raise ValueError(f"engine limits must be positive, got {self}")
        if self.max_input_len > self.max_seq_len:
            raise ValueError(f"max_input_len ({self.max_input_len}) must not exceed max_seq_len ({self.max_seq_len})")

    # The one source of truth for what a request may ask of an engine: Engine.check_request (before
    # a request), the backends' check_batch / check_step (inside begin / step) and the chat session
    # (a growing conversation) all call these.
    def check_batch(self, batch_size: int) -> None:
        if batch_size > self.max_batch_size:
            raise GenerationError(f"a batch of {batch_size} exceeds this engine's max_batch_size={self.max_batch_size}; "
                                  "split the request or rebuild with a larger max_batch_size")

    def check_prompt(self, length: int, what: str = "the prompt") -> None:
        if length > self.max_input_len:
            raise GenerationError(f"{what} has {length} tokens, more than this engine's max_input_len="
                                  f"{self.max_input_len}; shorten it or rebuild the engine with a larger max_input_len")

    def room(self, prompt_len: int) -> int:
        """The most new tokens after a ``prompt_len``-token (padded) prompt: the KV cache holds the
        prompt plus every generated token but the last."""
        return self.max_seq_len - prompt_len + 1

    def check_new_tokens(self, prompt_len: int, max_new_tokens: int) -> None:
        if max_new_tokens > self.room(prompt_len):
            raise GenerationError(
                f"a {prompt_len}-token prompt plus max_new_tokens={max_new_tokens} needs {prompt_len + max_new_tokens - 1} "
                f"positions, more than this engine's max_seq_len={self.max_seq_len}; use max_new_tokens <= "
                f"{self.room(prompt_len)} or rebuild the engine with a larger max_seq_len")

    def check_step(self, past: int, new: int) -> None:
        """``new`` tokens after ``past`` in one model step."""
        if past == 0:
            self.check_prompt(new)
        if past + new > self.max_seq_len:
            raise GenerationError(f"the sequence would reach {past + new} tokens, beyond this engine's "
                                  f"max_seq_len={self.max_seq_len}")


BACKENDS: dict[str, type["Engine"]] = {}


def register_backend(cls: type["Engine"]) -> type["Engine"]:
    BACKENDS[cls.backend] = cls
    return cls


class Engine:
    """Base of all engines: one interface, one generation loop.

    >>> engine = nbtrt.load("work/engine")  # doctest: +SKIP
    >>> engine.generate(["Hi!"], max_new_tokens=8)  # doctest: +SKIP
    """

    backend: ClassVar[str] = ""

    def __init__(self, engine_dir: Path, manifest: dict):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.config = DecoderConfig.from_dict(manifest["decoder"])
        self.limits = EngineLimits(**manifest["limits"])
        self.generation_config = _read_optional_json(self.engine_dir / "generation_config.json")
        self._tokenizer = None
        self._turns = Turns()  # one request at a time per engine; an unread stream cannot keep it

    # ------------------------------------------------------------------ backend API
    @classmethod
    def available(cls) -> str | None:
        """None when this backend can run here, else the reason it cannot."""
        return None

    @classmethod
    def _build_files(cls, ckpt_dir: Path, out: Path, cfg: DecoderConfig, limits: EngineLimits,
                     options: dict) -> dict:
        """Write the backend's files into ``out``; return options worth recording."""
        raise NotImplementedError

    device: torch.device = torch.device("cpu")
    # True where step() returns once its work is queued on the device (CUDA streams): the
    # generation loop then queues the next step before it waits for this step's tokens
    queues_steps: bool = False

    def begin(self, batch_size: int) -> None:
        raise NotImplementedError

    def check_batch(self, batch_size: int) -> None:
        """The backends' own guard in begin(): a batch beyond max_batch_size."""
        self.limits.check_batch(batch_size)

    def check_step(self, past: int, new: int) -> None:
        """The backends' own guard in step(): ``new`` tokens after ``past`` beyond the engine's limits."""
        self.limits.check_step(past, new)

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Feed [B, T] new tokens; ``attention_mask`` [B, past+T] marks real tokens. Returns last-position logits [B, V]."""
        raise NotImplementedError

    def capture(self, input_ids: list[list[int]], names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Prefill ``input_ids`` (a fresh batch of equal-length prompts) and return (logits [B, T, V],
        {name: tensor}) for the named intermediate tensors. Names are nbtrt module names (see
        :mod:`nbtrt.model`), e.g. ``"embed"``, ``"layers.3.attn"``, ``"layers.3"``, ``"final_norm"``.
        Tensors come back on the CPU. Waits for a generation running on another thread.

        >>> logits, tensors = engine.capture([engine.encode("Hello")], ["layers.0.attn"])  # doctest: +SKIP
        """
        prompts = token_lists(input_ids)
        self.check_request(prompts, 1)
        if len({len(p) for p in prompts}) != 1:
            raise GenerationError("capture needs prompts of equal length (no padding)")
        with exclusive(self):  # it replaces the KV cache: never in the middle of someone's stream
            return self._capture(prompts, list(names))

    def _capture(self, prompts: list[list[int]], names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} cannot capture intermediate tensors")

    # ------------------------------------------------------------------ shared
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not (self.engine_dir / "tokenizer_config.json").is_file() and not (self.engine_dir / "tokenizer.json").is_file():
                raise GenerationError(f"engine {self.engine_dir} has no tokenizer files; pass input_ids instead of text")
            self._tokenizer = load_tokenizer(self.engine_dir)
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        pad = self.generation_config.get("pad_token_id")
        if pad is None:
            pad = next(iter(self.end_token_ids), 0)
        return int(pad)

    @functools.cached_property
    def end_token_ids(self) -> tuple[int, ...]:
        """Every id that ends an answer: generation_config.json's ``eos_token_id`` (a checkpoint made
        by this nbtrt already holds config.json's there), then the tokenizer's eos, in that order."""
        ids = eos_list(self.generation_config.get("eos_token_id"))
        if has_tokenizer(self.engine_dir):
            ids += eos_list(self.tokenizer.eos_token_id)
        return tuple(dict.fromkeys(ids))

    def sampling(self, **overrides) -> SamplingParams:
        """The model's generation_config.json with ``overrides`` on top (unknown names are an error);
        the end tokens are :attr:`end_token_ids` unless ``stop_token_ids`` is given.

        >>> engine.sampling(temperature=0.7, max_new_tokens=64)  # doctest: +SKIP
        """
        gen = dict(self.generation_config, eos_token_id=list(self.end_token_ids))
        params = SamplingParams.from_generation_config(gen, **overrides)
        bad = [t for t in params.stop_token_ids if t >= self.config.vocab_size]
        if bad:
            raise GenerationError(f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        return params

    def check_request(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """Refuse, with a :class:`GenerationError` that names the limit, a request this engine
        cannot serve: batch, prompt length, token ids outside the vocabulary, max_new_tokens
        (the rules themselves live in :class:`EngineLimits`)."""
        lim = self.limits
        if not prompts:
            raise GenerationError("no prompts given")
        lim.check_batch(len(prompts))
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise GenerationError(f"prompt {i} is empty")
            lim.check_prompt(len(p), f"prompt {i}")
            bad = [t for t in p if isinstance(t, bool) or not isinstance(t, numbers.Integral)
                   or not 0 <= t < self.config.vocab_size]
            if bad:
                raise GenerationError(f"prompt {i} has token ids outside the vocabulary [0, {self.config.vocab_size}): {bad[:5]}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        lim.check_new_tokens(max(len(p) for p in prompts), max_new_tokens)

    def encode(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` with the engine's own tokenizer (special tokens as the model adds them).

        >>> engine.encode("Hello")  # doctest: +SKIP
        """
        check_text("prompt", prompt)
        if not prompt:
            raise GenerationError("prompt is empty")
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def generate(self, prompts: str | list[str | list[int]] | None = None, *, input_ids: list[list[int]] | None = None,
                 cancel: threading.Event | None = None, stats: GenerationStats | None = None,
                 **sampling) -> list[str] | list[list[int]]:
        """Generate for a batch (prompts of any lengths, left-padded). ``prompts`` (each text or token
        ids) -> list of str; ``input_ids`` -> list of new token id lists. Options (``max_new_tokens``, ``temperature``,
        ``top_k``, ``top_p``, ``repetition_penalty``, ``seed``, ``stop_strings``, ...) overlay the
        model's generation_config.json.

        >>> engine.generate(["Hi!", "Tell me a joke."], max_new_tokens=16)  # doctest: +SKIP
        >>> engine.generate(input_ids=[[1, 2, 3]], max_new_tokens=4)  # doctest: +SKIP
        """
        if (prompts is None) == (input_ids is None):
            raise GenerationError("pass either prompts (text) or input_ids, not both")
        params = self.sampling(**sampling)
        as_text = input_ids is None
        if as_text:
            if not isinstance(prompts, (str, list, tuple)):
                raise GenerationError(f"prompts must be a string or a list of prompts, got {type(prompts).__name__}")
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            input_ids = [list(p) if isinstance(p, (list, tuple)) else self.encode(p) for p in prompts]
        input_ids = token_lists(input_ids)
        self.check_request(input_ids, params.max_new_tokens)
        state = GenerationState(input_ids, stats=stats or GenerationStats())
        texts = [""] * len(input_ids)
        with exclusive(self, cancel) as lease:
            if lease is None:  # cancelled while another request held the engine: nothing ran
                return texts if as_text else [[] for _ in input_ids]
            if as_text or params.stop_strings:
                for deltas in generate_text(self, input_ids, params, cancel=cancel, state=state):
                    texts = [t + d for t, d in zip(texts, deltas)]
            else:
                for _ in generate_tokens(self, input_ids, params, cancel=cancel, state=state):
                    pass
        return texts if as_text else state.tokens

    def stream(self, prompt: str | list[int], cancel: threading.Event | None = None,
               stats: GenerationStats | None = None, state: GenerationState | None = None,
               **sampling) -> Iterator[str]:
        """Yield text deltas as tokens arrive; their concatenation equals the full decode.
        ``prompt`` is text or token ids (e.g. from :func:`nbtrt.chat.apply_chat_template`).
        Setting ``cancel`` (a ``threading.Event``, from any thread) ends the stream within one
        step; ``stats`` (a :class:`GenerationStats`) fills in TTFT and tokens/s as it runs;
        ``state`` (optional) is the loop's own: the answer's token ids and how each row ended.
        Bad input raises here, before anything runs.

        >>> for delta in engine.stream("Hi!", max_new_tokens=16): print(delta, end="")  # doctest: +SKIP
        """
        params = self.sampling(**sampling)
        ids = list(prompt) if isinstance(prompt, (list, tuple)) else self.encode(prompt)
        self.check_request([ids], params.max_new_tokens)
        state = state or GenerationState([ids], stats=stats or GenerationStats())
        # the engine is taken at the first read and given back at the end, on close(), or when the
        # stream is garbage-collected; an unread stream cannot keep it from another thread for long
        return leased_stream(self, generate_text(self, [ids], params, cancel=cancel, state=state), cancel)

    def __repr__(self) -> str:
        c = self.config
        return (f"<{type(self).__name__} {c.architecture} {c.dtype} layers={c.num_layers} "
                f"limits={asdict(self.limits)} dir={self.engine_dir}>")


def _read_optional_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def default_backend() -> str:
    """The one place the runtime is chosen: TensorRT where it runs, else ONNX Runtime, else torch."""
    for name in ("tensorrt", "onnxruntime", "torch"):
        if name in BACKENDS and BACKENDS[name].available() is None:
            return name
    raise RuntimeError("no engine backend can run on this machine")


def build(ckpt: str | Path, out: str | Path, *, backend: str | None = None, max_batch_size: int = 8,
          max_input_len: int = 1024, max_seq_len: int = 2048, overwrite: bool = False, **options) -> Path:
    """Build an engine directory from an nbtrt checkpoint.

    >>> edir = build("work/ckpt", "work/engine", backend="torch", max_batch_size=4)  # doctest: +SKIP
    """
    _ensure_backends()
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {sorted(BACKENDS)}")
    reason = BACKENDS[backend].available()
    if reason:
        raise RuntimeError(f"backend {backend!r} cannot build here: {reason}")
    ckpt = Path(ckpt)
    cfg, _ = load_checkpoint_config(ckpt)
    refuse_remote_code(ckpt)
    limits = EngineLimits(max_batch_size, max_input_len, max_seq_len)
    if cfg.position == "learned" and max_seq_len > cfg.max_position_embeddings:
        raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's {cfg.max_position_embeddings} learned positions")
    check_dtype(options.get("dtype"))  # a typo'd precision is named before anything reads it
    check_kv_cache_fits(ckpt, cfg, limits, backend, options.get("dtype"))
    out = Path(out)
    check_output(out, (ckpt,), overwrite=overwrite)  # refuse before the (long) hash and build
    verify_checkpoint(ckpt)
    with atomic_dir(out, overwrite=overwrite, inputs=(ckpt,)) as tmp:
        copy_tokenizer_files(ckpt, tmp)
        recorded = BACKENDS[backend]._build_files(ckpt, tmp, cfg, limits, options)
        extra = sorted(p.name for p in tmp.iterdir() if not p.is_file() and p.name != TMP_MARKER)
        if extra:
            raise ArtifactError(f"backend {backend!r} wrote {extra}, which are not plain files; "
                                "an engine directory holds plain files only")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                 for p in sorted(tmp.iterdir()) if p.name != TMP_MARKER}
        from ._version import __version__

        write_manifest(tmp / ENGINE_JSON, {
            "backend": backend,
            "decoder": cfg.to_dict(),
            "limits": asdict(limits),
            "options": recorded,
            "checkpoint": {"path": str(ckpt.resolve()), "content_sha256": checkpoint_hash(ckpt)},
            "files": files,
            "nbtrt_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        })
    return out


def manifest_hash(manifest: dict) -> str:
    """sha256 over the manifest's own content (all but this hash): catches an edited engine.json."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(path: Path, manifest: dict) -> None:
    write_json(path, {**manifest, "manifest_sha256": manifest_hash(manifest)})


def check_manifest(engine_dir: Path, manifest: dict, verify: bool) -> None:
    """engine.json unedited, and it lists every file in the directory with its size (and hash when ``verify``)."""
    if "manifest_sha256" not in manifest:
        raise ArtifactError(f"{engine_dir / ENGINE_JSON} has no manifest_sha256: it was edited after the build, or "
                            "built by an nbtrt older than this check; rebuild the engine")
    if manifest["manifest_sha256"] != manifest_hash(manifest):
        raise ArtifactError(f"{engine_dir / ENGINE_JSON} was edited after the build (its content does not match "
                            "its recorded hash; limits and decoder are fixed at build): rebuild the engine")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{engine_dir / ENGINE_JSON} lists no files; rebuild the engine")
    unlisted = sorted(p.name for p in engine_dir.iterdir() if p.name != ENGINE_JSON and p.name not in files)
    if unlisted:
        raise ArtifactError(f"{engine_dir}: {unlisted[:5]} are not listed in {ENGINE_JSON}: files were added to "
                            "the engine after its build (tampering?); remove them or rebuild the engine")
    for name, info in files.items():
        path = engine_dir / name
        if not isinstance(info, dict) or not {"bytes", "sha256"} <= set(info):
            raise ArtifactError(f"{engine_dir / ENGINE_JSON}: the entry for {name} is malformed; rebuild the engine")
        if Path(name).name != name or not path.is_file() or path.is_symlink():
            raise ArtifactError(f"{engine_dir}: {name} listed in {ENGINE_JSON} is missing or not a plain file; "
                                "rebuild the engine")
        inside(path, engine_dir)
        if path.stat().st_size != info["bytes"] or (verify and file_sha256(path) != info["sha256"]):
            raise ArtifactError(f"{engine_dir}: {name} does not match {ENGINE_JSON} (changed or from another build); "
                                "rebuild the engine")


def load(engine_dir: str | Path, *, verify: bool = True, **backend_options) -> Engine:
    """Load an engine directory written by :func:`build`. Refuses an engine whose engine.json was
    edited, that holds files the build did not write, or that asks for remote code; ``verify=False``
    skips hashing the (large) files but still checks their sizes.

    >>> engine = load("work/engine")  # doctest: +SKIP
    """
    _ensure_backends()
    engine_dir = Path(engine_dir)
    if not (engine_dir / ENGINE_JSON).is_file():
        raise ArtifactError(f"{engine_dir} is not an engine directory ({ENGINE_JSON} missing); build one with nbtrt.build()")
    manifest = read_json(engine_dir / ENGINE_JSON)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{engine_dir / ENGINE_JSON} is not an engine manifest; rebuild the engine")
    refuse_remote_code(engine_dir)
    check_manifest(engine_dir, manifest, verify)
    backend = manifest.get("backend")
    if backend not in BACKENDS:
        raise ArtifactError(f"{engine_dir} needs backend {backend!r}, which this nbtrt does not know ({sorted(BACKENDS)})")
    reason = BACKENDS[backend].available()
    if reason:
        raise RuntimeError(f"{engine_dir} was built for {backend!r}, which cannot run here: {reason}")
    return BACKENDS[backend](engine_dir, manifest, **backend_options)


def available_memory(backend: str) -> tuple[int, str]:
    """(bytes, where) of the memory the engine would run in: the GPU's free memory where the
    backend runs on CUDA here, else the RAM the OS reports available (no psutil needed)."""
    on_gpu = torch.cuda.is_available() and (backend != "onnxruntime" or _ort_has_cuda())
    if on_gpu:
        free, _ = torch.cuda.mem_get_info()
        return free, f"free on {torch.cuda.get_device_name()}"
    try:  # MemAvailable counts reclaimable page cache, as the kernel itself would
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "of RAM available"
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "of RAM free"


def _ort_has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def check_kv_cache_fits(ckpt: Path, cfg: DecoderConfig, limits: EngineLimits, backend: str,
                        dtype: str | None = None) -> None:
    """Refuse at build, saying what would fit, limits whose KV cache (max_batch_size sequences of
    max_seq_len positions, keys and values of every layer) and weights exceed the device's memory;
    otherwise the first large request fails allocating, long after the build said yes."""
    quantized_kv = cfg.quantization.get("kv_cache") in ("int8", "fp8")
    item = 1 if quantized_kv else torch.empty((), dtype=TORCH_DTYPES[dtype or cfg.dtype]).element_size()
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * item
    weights = sum(p.stat().st_size for p in Path(ckpt).glob("*.safetensors"))
    need = per_token * limits.max_batch_size * limits.max_seq_len + weights
    have, where = available_memory(backend)
    if need <= have:
        return
    fits_seq = max(0, (have - weights) // (per_token * limits.max_batch_size))
    fits_batch = max(0, (have - weights) // (per_token * limits.max_seq_len))
    gib = 1 << 30
    raise ValueError(
        f"max_batch_size={limits.max_batch_size} x max_seq_len={limits.max_seq_len} needs a KV cache of "
        f"{per_token * limits.max_batch_size * limits.max_seq_len / gib:.1f} GiB ({per_token} bytes per position) plus "
        f"{weights / gib:.2f} GiB of weights, more than the {have / gib:.1f} GiB {where}; what fits: "
        f"max_seq_len <= {fits_seq} at max_batch_size={limits.max_batch_size}, or max_batch_size <= {fits_batch} "
        f"at max_seq_len={limits.max_seq_len}")


def _ensure_backends() -> None:
    """Import the backend modules so they register (lazy: onnx/tensorrt import only when used)."""
    from . import runtimes  # noqa: F401


def add_cli(sub) -> None:
    p = sub.add_parser("build", help="nbtrt checkpoint -> engine directory")
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--backend", default=None, help="tensorrt | onnxruntime | torch (default: best available)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--overwrite", action="store_true")
    # backend options (as trtllm-build's); each backend rejects the ones it does not take
    p.add_argument("--dtype", default=None, choices=sorted(TORCH_DTYPES), help="engine precision (default: the checkpoint's)")
    p.add_argument("--builder-opt-level", type=int, default=None, help="TensorRT builder optimization level 0-5")
    p.add_argument("--workspace-gib", type=float, default=None, help="TensorRT workspace memory limit")
    p.add_argument("--timing-cache", default=None, help="TensorRT timing cache file reused across builds")
    p.add_argument("--graph", default=None, choices=("auto", "standard", "ort-cpu"), help="ONNX Runtime graph flavour")
    p.add_argument("--accuracy-level", type=int, default=None, help="ort-cpu MatMulNBits: 4 int8 activations, 0 fp32")
    names = ("dtype", "builder_opt_level", "workspace_gib", "timing_cache", "graph", "accuracy_level")
    p.set_defaults(run=lambda a: print(build(a.ckpt, a.out, backend=a.backend, max_batch_size=a.max_batch_size,
                                             max_input_len=a.max_input_len, max_seq_len=a.max_seq_len,
                                             overwrite=a.overwrite,
                                             **{n: getattr(a, n) for n in names if getattr(a, n) is not None})))
