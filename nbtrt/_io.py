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
import tempfile
from pathlib import Path
from typing import Any, Iterator

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "added_tokens.json", "generation_config.json",
)


class ArtifactError(ValueError):
    """An artifact on disk is missing, malformed, or does not match what it claims."""


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block succeeds.

    >>> with atomic_dir("work/ckpt", overwrite=True) as tmp:
    ...     (tmp / "config.json").write_text("{}")
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the artifact is an ordinary directory
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy whichever tokenizer / generation files exist in ``src``; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


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
