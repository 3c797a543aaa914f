"""What ``nbtrt.LLM(model)`` serves: any of a zoo name, a HF directory, an nbtrt checkpoint, an engine
directory or a loaded :class:`~nbtrt.engine.Engine`, taken through convert and build as far as
needed, once: the checkpoint and the engine are cached under ``work_dir`` by a key of their
source and options, and reused by the next ``LLM`` of the same model.

>>> engine = resolve_engine("smollm2-135m-instruct", "torch", work_dir="work/llm")  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

from .._io import ArtifactError
from ..engine import ENGINE_JSON, Engine, build, load

DEFAULT_INPUT_LEN, DEFAULT_SEQ_LEN = 1024, 2048  # the engine builder's defaults


def default_work_dir() -> Path:
    """``$NBTRT_CACHE/llm`` (``~/.cache/nbtrt/llm``): where converted and built artifacts are kept."""
    return Path(os.environ.get("NBTRT_CACHE") or Path.home() / ".cache" / "nbtrt") / "llm"


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _load(edir: Path, backend: str, device: str | None, dtype: str | None) -> Engine:
    if backend == "torch":  # the LLM runs its own compiled step: the engine's static warm-up is not needed
        return load(edir, device=device, dtype=dtype, warmup=False)
    return load(edir)


def resolve_engine(model, backend: str = "torch", *, work_dir: str | Path | None = None, device: str | None = None,
                   dtype: str | None = None, max_batch_size: int = 64, max_input_len: int | None = None,
                   max_seq_len: int | None = None) -> Engine:
    """The engine for ``model`` (see the module docstring); a torch engine is loaded on ``device``
    in ``dtype``."""
    from ..config import load_checkpoint_config

    if isinstance(model, Engine):
        return model
    path = Path(model).expanduser() if not isinstance(model, str) or Path(model).expanduser().exists() else None
    if path is not None and (path / ENGINE_JSON).is_file():
        manifest = json.loads((path / ENGINE_JSON).read_text())
        if manifest.get("backend") != backend and backend != "torch":
            raise ValueError(f"{path} is a {manifest.get('backend')!r} engine, not {backend!r}; pass backend="
                             f"{manifest.get('backend')!r} or a checkpoint / HF model to build from")
        return _load(path, manifest.get("backend"), device, dtype)
    work = Path(work_dir) if work_dir is not None else default_work_dir()
    ckpt = resolve_checkpoint(model, work)
    cfg, meta = load_checkpoint_config(ckpt)
    seq_len, input_len = _lengths(cfg, max_input_len, max_seq_len)
    opts = {"dtype": dtype} if dtype and backend != "torch" else {}
    batch = max_batch_size
    edir = work / f"engine-{backend}-{ckpt.name}-{_key(str(ckpt.resolve()), meta.get('content_sha256'), batch, input_len, seq_len, opts)}"
    if (edir / ENGINE_JSON).is_file():
        try:
            return _load(edir, backend, device, dtype)
        except ArtifactError as e:  # ours, in nbtrt's cache: stale (an older nbtrt) or damaged
            warnings.warn(f"rebuilding the cached engine {edir}: {e}", stacklevel=2)
    build(ckpt, edir, backend=backend, max_batch_size=batch, max_input_len=input_len, max_seq_len=seq_len,
          overwrite=edir.exists(), **opts)
    return _load(edir, backend, device, dtype)


def resolve_checkpoint(model, work: Path) -> Path:
    """The nbtrt checkpoint of ``model``: the directory itself if it is one, else a HF directory or zoo
    name converted once (float32) into ``work``, cached."""
    from ..checkpoint import verify_checkpoint
    from ..convert import convert, resolve_source

    path = Path(model).expanduser() if not isinstance(model, str) or Path(model).expanduser().exists() else None
    if path is not None and (path / "config.json").is_file() and \
            "decoder" in json.loads((path / "config.json").read_text()):
        return path
    src = resolve_source(model)
    ckpt = work / f"ckpt-{src.name}-{_key(str(src.resolve()))}"
    if not _cached_ok(ckpt, verify_checkpoint):
        convert(src, ckpt, dtype="float32", overwrite=ckpt.exists())
    return ckpt


def _lengths(cfg, max_input_len: int | None, max_seq_len: int | None) -> tuple[int, int]:
    """(max_seq_len, max_input_len): as asked, else the builder's defaults within the model's positions."""
    seq_len = max_seq_len or min(DEFAULT_SEQ_LEN, cfg.max_position_embeddings or DEFAULT_SEQ_LEN)
    return seq_len, min(max_input_len or DEFAULT_INPUT_LEN, seq_len)


def tensor_parallel_engine(model, tensor_parallel_size: int, *, work_dir: str | Path | None = None,
                           device: str | None = None, dtype: str | None = None, max_batch_size: int = 64,
                           max_input_len: int | None = None, max_seq_len: int | None = None) -> Engine:
    """A :class:`~nbtrt.parallel.TensorParallelEngine` for ``model`` (a zoo name, HF directory or nbtrt
    checkpoint) on ``tensor_parallel_size`` ranks. An unsharded checkpoint is sharded once into
    ``work_dir`` (cached, like the converted checkpoint), so that each rank reads only its slice.

    >>> engine = tensor_parallel_engine("smollm2-135m-instruct", 2, max_seq_len=1024)  # doctest: +SKIP
    """
    from ..parallel import TensorParallelEngine, shard_checkpoint
    from ..parallel.sharding import check_checkpoint_size, recorded_world_size

    world = tensor_parallel_size
    if isinstance(model, Engine) or (Path(str(model)).expanduser() / ENGINE_JSON).is_file():
        raise ValueError(f"tensor_parallel_size={world} needs the model's weights (a zoo name, HF directory or "
                         "nbtrt checkpoint), not a built engine: each rank loads its slice of the checkpoint; "
                         "pass the checkpoint the engine was built from")
    work = Path(work_dir) if work_dir is not None else default_work_dir()
    ckpt = resolve_checkpoint(model, work)
    cfg, meta = check_checkpoint_size(ckpt, world)  # a size that does not divide is named before any work
    if recorded_world_size(meta) == 1:
        sharded = work / f"ckpt-tp{world}-{ckpt.name}-{_key(str(ckpt.resolve()), meta.get('content_sha256'))}"
        if not _cached_ok(sharded, lambda p: check_checkpoint_size(p, world)):
            shard_checkpoint(ckpt, sharded, world, overwrite=sharded.exists())
        ckpt = sharded
    seq_len, input_len = _lengths(cfg, max_input_len, max_seq_len)
    return TensorParallelEngine(ckpt, world, max_batch_size=max_batch_size, max_input_len=input_len,
                                max_seq_len=seq_len, dtype=dtype, device=device)


def _cached_ok(path: Path, check) -> bool:
    """Whether the cached artifact ``path`` exists and passes ``check``; a failing one is said and
    rebuilt by the caller (it lies in nbtrt's own cache, written by nbtrt)."""
    if not path.exists():
        return False
    try:
        check(path)
        return True
    except ArtifactError as e:
        warnings.warn(f"rebuilding the cached {path}: {e}", stacklevel=3)
        return False


def engine_from_decoder(model, *, max_batch_size: int = 1, max_seq_len: int = 2048, **options) -> Engine:
    """A torch engine around an in-memory decoder (random weights for benchmarks, tests); the one
    place the serving package imports the torch runtime.

    >>> llm = nbtrt.LLM(engine_from_decoder(decoder, max_seq_len=512))  # doctest: +SKIP
    """
    from ..runtimes.torch_engine import TorchEngine

    return TorchEngine.from_decoder(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len, **options)


def release_static_cache(engine: Engine) -> None:
    """Free a torch engine's static KV cache and its CUDA graphs (after static batching, before a
    paged pool takes the memory); the next ``begin`` allocates them again."""
    release = getattr(engine, "release_cache", None)  # engines without a static cache have nothing to free
    if release is not None:
        release()
