"""Artifact plumbing: atomic directories, JSON, content hashes, provenance.

Every stage writes into a temporary sibling directory and renames it into
place only when complete, so an interrupted stage never leaves half an
artifact behind.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import numbers
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "added_tokens.json", "generation_config.json",
)


class ArtifactError(ValueError):
    """An artifact on disk is missing, malformed, or does not match what it claims."""


TMP_MARKER = ".nbtrt-tmp"  # written inside nbtrt's temporary directories: {"pid": ...}


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False,
               inputs: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block succeeds.

    ``inputs`` are the directories the stage reads: ``out`` may not be, contain or lie
    inside one of them. An existing ``out`` is replaced only with ``overwrite`` and only
    when nbtrt wrote it (see :func:`check_output`).

    >>> with atomic_dir("work/ckpt", overwrite=True) as tmp:
    ...     (tmp / "config.json").write_text("{}")
    """
    out = check_output(out, inputs, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out.parent)
    tmp = None
    try:  # from the moment the temporary exists: an interrupt anywhere below still removes it
        tmp = _marked_tmp(out.parent, f".{out.name}.tmp-")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the artifact is an ordinary directory
        yield tmp
        (tmp / TMP_MARKER).unlink(missing_ok=True)
        if out.exists():
            old = _marked_tmp(out.parent, f".{out.name}.old-")
            try:
                os.replace(out, old / out.name)
                try:
                    os.replace(tmp, out)
                except BaseException:
                    os.replace(old / out.name, out)  # the previous artifact goes back in place
                    raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _marked_tmp(parent: Path, prefix: str) -> Path:
    """mkdtemp plus a marker naming this process, so a later run can tell ours (and dead) from anyone else's."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    (tmp / TMP_MARKER).write_text(json.dumps({"pid": os.getpid()}))
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_tmp(parent: str | os.PathLike) -> list[Path]:
    """Remove the hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` directories that a killed nbtrt stage
    left in ``parent``: only those holding nbtrt's marker whose process is gone. Returns them."""
    removed = []
    for d in Path(parent).glob(".*"):
        if not (".tmp-" in d.name or ".old-" in d.name) or d.is_symlink() or not d.is_dir():
            continue
        try:
            pid = int(json.loads((d / TMP_MARKER).read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours (or unreadable): leave it
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def is_nbtrt_output(path: Path) -> bool:
    """True for a directory nbtrt wrote: an engine (engine.json) or a checkpoint (config.json with provenance)."""
    for name, key in (("engine.json", "backend"), ("config.json", "nbtrt")):
        try:
            data = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and key in data and (key != "nbtrt" or isinstance(data["nbtrt"], dict)
                                                       and "stage" in data["nbtrt"]):
            return True
    return False


def check_output(out: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = (), *,
                 overwrite: bool = False) -> Path:
    """``out`` resolved, once it is safe to write: not an input, not inside one, holding none, not the
    current directory; an existing ``out`` only with ``overwrite`` and only if nbtrt wrote it."""
    out = Path(out).resolve()
    for src in inputs:
        src = Path(src).resolve()
        if out == src or out.is_relative_to(src) or src.is_relative_to(out):
            raise ArtifactError(f"output {out} overlaps the input {src} (is, contains or lies inside it); "
                                "write to a separate directory")
    if Path.cwd().resolve().is_relative_to(out):
        raise ArtifactError(f"output {out} is (or contains) the current directory; write to a subdirectory")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
        if out.is_symlink() or not out.is_dir() or not is_nbtrt_output(out):
            raise ArtifactError(f"{out} exists and is not an nbtrt checkpoint or engine (no nbtrt config.json "
                                "or engine.json): refusing to replace it; choose another output or remove it yourself")
    return out


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a file atomically (temp file + rename): readers see the old content or the new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # the pid: concurrent writers don't share it
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e})") from None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def inside(path: str | os.PathLike, root: str | os.PathLike, what: str = "file") -> Path:
    """``path`` resolved (symlinks followed), or an :class:`ArtifactError` if that lies outside ``root``.

    >>> inside("model/model.safetensors", "model")  # doctest: +SKIP
    """
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(Path(root).resolve()):
        raise ArtifactError(f"{what} {path} resolves to {resolved}, outside {root}; nbtrt reads only files "
                            "inside the directory it is given (copy the file in instead of linking it)")
    return resolved


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy whichever tokenizer / generation files exist in ``src``; return their names.
    A file that resolves outside ``src`` (a symlink out) is refused, never followed."""
    copied = []
    for name in TOKENIZER_FILES:
        path = Path(src) / name
        if path.is_file():
            shutil.copyfile(inside(path, src, "tokenizer file"), Path(dst) / name)
            copied.append(name)
    return copied


# files through which transformers would import code shipped with a model ("auto_map": {...: "mod.Class"})
REMOTE_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json",
                       "preprocessor_config.json", "generation_config.json")


def refuse_remote_code(d: str | os.PathLike) -> None:
    """Refuse a directory that asks for downloaded code: an ``auto_map`` in any of its configs, or a ``*.py``.

    >>> refuse_remote_code(nbtrt.zoo.get("smollm2-135m-instruct"))  # doctest: +SKIP
    """
    d = Path(d)
    for name in REMOTE_CODE_CONFIGS:
        path = d / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # the stage that reads it reports a malformed file
        if isinstance(data, dict) and "auto_map" in data:
            raise ArtifactError(f"{path} has 'auto_map': it asks to run code shipped with the model "
                                "(trust_remote_code); nbtrt never executes downloaded code")
    code = sorted(p.name for p in d.glob("*.py"))
    if code:
        raise ArtifactError(f"{d} holds Python files {code[:3]}: code shipped with a model is never run by "
                            "nbtrt; remove them (or use a model that does not need them)")


def recorded_source(path: str | os.PathLike) -> Path | None:
    """The HF directory an nbtrt artifact was made from, following each stage's recorded source
    (engine -> checkpoint -> ... -> HF dir); None when that chain is broken.

    >>> recorded_source("work/engine")  # doctest: +SKIP
    PosixPath('/root/.cache/nbtrt/zoo/smollm2-135m-instruct')
    """
    path = Path(path)
    try:
        if (path / "engine.json").is_file():
            path = Path(json.loads((path / "engine.json").read_text()).get("checkpoint", {}).get("path", ""))
        for _ in range(8):
            config = path / "config.json"
            if not config.is_file():
                return None
            meta = json.loads(config.read_text()).get("nbtrt")
            if meta is None:
                return path
            path = Path(meta.get("source", ""))
    except (OSError, ValueError, AttributeError):  # unreadable or not the JSON nbtrt writes
        return None
    return None


def refuse_nbtrt_artifact(d: str | os.PathLike, needs: str) -> None:
    """Name the mix-up when an nbtrt engine or checkpoint is given where a HuggingFace model is read
    (HF's own error would be "Unrecognized model ... model_type"), with the HF directory it came from."""
    d = Path(d)
    if not is_nbtrt_output(d):
        return
    kind = "engine" if (d / "engine.json").is_file() else "checkpoint"
    source = recorded_source(d)
    hint = f"; it was made from {source}" if source is not None else ""
    raise ArtifactError(f"{d} is an nbtrt {kind}, not a HuggingFace model directory; {needs} needs the HF "
                        f"model (a zoo name or an HF directory){hint}")


def load_tokenizer(d: str | os.PathLike):
    """The HF tokenizer in directory ``d``, after refusing remote code and files linked from outside ``d``.

    >>> tok = load_tokenizer("work/engine")  # doctest: +SKIP
    """
    d = Path(d)
    refuse_remote_code(d)
    for name in TOKENIZER_FILES:
        if (d / name).exists() or (d / name).is_symlink():
            inside(d / name, d, "tokenizer file")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d, trust_remote_code=False)


def load_hf_model(d: str | os.PathLike, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(d)`` that never runs downloaded code.

    >>> model = load_hf_model(nbtrt.zoo.get("smollm2-135m-instruct"), dtype=torch.float32)  # doctest: +SKIP
    """
    refuse_remote_code(d)
    refuse_nbtrt_artifact(d, "the HF reference")
    from transformers import AutoModelForCausalLM

    with ctrl_c_held():  # its reader is safetensors': see ctrl_c_held
        return AutoModelForCausalLM.from_pretrained(d, trust_remote_code=False, **kwargs)


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[Callable[[], None]]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block; hand it on at ``check()`` or at the end.

    A Ctrl-C that lands while safetensors' Rust reader is building a tensor comes out as an
    unrelated ValueError ("could not determine the shape of object type ...UntypedStorage"), so an
    interrupted load would read as a broken file. Inside the block the signal is only recorded;
    ``check()``, called between tensors, and the block's end pass it to the handler that was in
    place (Python's raises KeyboardInterrupt). Off the main thread, or when SIGINT is ignored or
    left to the OS, there is no Python handler to defer and ``check()`` does nothing.

    >>> with ctrl_c_held() as check:  # doctest: +SKIP
    ...     for name in f.keys():
    ...         check()
    ...         tensors[name] = f.get_tensor(name)
    """
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if not callable(previous):
        yield lambda: None
        return
    pending: list[int] = []

    def check() -> None:
        if pending:
            pending.clear()
            previous(signal.SIGINT, None)

    signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)
    check()


def read_safetensors(path: str | os.PathLike, names: Iterable[str] | None = None, *,
                     remedy: str = "re-run the stage that wrote it", desc: str | None = None) -> dict:
    """The tensors of one safetensors file (only ``names`` when given), read one at a time so that
    Ctrl-C stops between tensors as a KeyboardInterrupt (:func:`ctrl_c_held`). A cut or corrupt
    file is an :class:`ArtifactError` naming the file, the tensor and ``remedy``.

    >>> tensors = read_safetensors("work/ckpt/rank0.safetensors")  # doctest: +SKIP
    """
    from safetensors import SafetensorError, safe_open
    from tqdm.auto import tqdm

    path, name, keep = Path(path), None, None if names is None else set(names)
    tensors = {}
    try:
        with ctrl_c_held() as check, safe_open(str(path), framework="pt") as f:
            wanted = [n for n in f.keys() if keep is None or n in keep]
            for name in tqdm(wanted, desc=desc, leave=False, disable=desc is None):
                check()
                tensors[name] = f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        where = f"{path}: tensor {name}" if name else str(path)
        raise ArtifactError(f"{where} is unreadable or truncated ({e}); {remedy}") from None
    return tensors


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when on the same filesystem (instant, no extra disk), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def provenance(stage: str, source: str | os.PathLike, options: dict, content_hash: str) -> dict:
    from ._version import __version__

    return {
        "stage": stage,
        "source": str(source),
        "nbtrt_version": __version__,
        "options": options,
        "content_sha256": content_hash,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def eos_list(value) -> list[int]:
    """An ``eos_token_id`` as HF writes it (one id, a list, or None) -> a list of ids."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [int(v) for v in values if isinstance(v, numbers.Integral) and not isinstance(v, bool)]


def has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file()
