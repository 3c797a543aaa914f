"""The nbtrt checkpoint format: config.json (decoder + provenance) and rank{r}.safetensors."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ._io import (ArtifactError, copy_tokenizer_files, ctrl_c_held, file_sha256, inside, provenance,
                  read_safetensors, write_json)
from .config import DecoderConfig, load_checkpoint_config
from .layouts import check_quantized_tensors, expected_shapes

WEIGHTS = "rank0.safetensors"  # tensor-parallel shards would be rank1, rank2, ...


def check_tensors(cfg: DecoderConfig, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor the config implies is present, with the implied shape, and nothing else."""
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise ArtifactError(f"{where}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise ArtifactError(f"{where}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ArtifactError(
                f"{where}: tensor {name} has shape {tuple(tensors[name].shape)} but the config implies {shape}"
            )


def check_finite(tensors: dict[str, torch.Tensor], where: str, error: type[Exception] = ArtifactError) -> None:
    """Refuse NaN / Inf in any floating-point tensor, naming it (an engine built on one answers nothing)."""
    for name, t in tensors.items():
        if t.is_floating_point() and t.element_size() == 1:
            t = t.float()  # torch has no isfinite for float8
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise error(f"{where}: tensor {name} holds NaN/Inf values; the weights are broken there "
                                "(re-convert or re-download the model)")


def save_checkpoint(out: Path, cfg: DecoderConfig, tensors: dict[str, torch.Tensor], *, stage: str,
                    source: str | Path, options: dict, tokenizer_dir: Path | None,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json + rank0.safetensors (+ tokenizer files) into ``out`` (a temp dir)."""
    all_tensors = {k: v.contiguous() for k, v in {**tensors, **(extra_tensors or {})}.items()}
    save_file(all_tensors, out / WEIGHTS, metadata={"format": "pt", "producer": "nbtrt"})
    meta = provenance(stage, source, options, file_sha256(out / WEIGHTS))
    write_json(out / "config.json", {"decoder": cfg.to_dict(), "nbtrt": meta})
    if tokenizer_dir is not None:
        copy_tokenizer_files(Path(tokenizer_dir), out)


def load_checkpoint(ckpt_dir: str | Path, verify_hash: bool = False) -> tuple[DecoderConfig, dict[str, torch.Tensor]]:
    """Read an nbtrt checkpoint -> (config, tensors). Validates names and shapes.

    >>> cfg, tensors = load_checkpoint("work/ckpt")  # doctest: +SKIP
    """
    ckpt_dir = Path(ckpt_dir)
    cfg, meta = load_checkpoint_config(ckpt_dir)
    path = _weights(ckpt_dir)
    if verify_hash:
        _check_hash(ckpt_dir, meta)
    tensors = read_safetensors(path)
    if cfg.quantization:
        check_quantized_tensors(cfg, tensors, str(ckpt_dir))
    else:
        check_tensors(cfg, tensors, str(ckpt_dir))
    return cfg, tensors


def _weights(ckpt_dir: Path) -> Path:
    _refuse_sharded(ckpt_dir)
    path = ckpt_dir / WEIGHTS
    if not path.is_file():
        raise ArtifactError(f"{ckpt_dir} has no {WEIGHTS}")
    inside(path, ckpt_dir, "weight file")
    inside(ckpt_dir / "config.json", ckpt_dir, "checkpoint config")
    return path


def _refuse_sharded(ckpt_dir: Path) -> None:
    """A tensor-parallel checkpoint's rank0.safetensors holds only rank 0's slice: say so, not a shape error."""
    world = int(load_checkpoint_config(ckpt_dir)[1].get("tensor_parallel_size", 1))
    if world != 1:
        raise ArtifactError(f"{ckpt_dir} is sharded for tensor_parallel_size={world} (rank0..rank{world - 1}"
                            ".safetensors); run it with nbtrt.parallel at that size, or use the unsharded checkpoint")


def _check_hash(ckpt_dir: Path, meta: dict) -> None:
    recorded = meta.get("content_sha256")
    if not recorded:
        raise ArtifactError(f"{ckpt_dir / 'config.json'} records no content hash; re-run the stage that wrote it")
    if file_sha256(ckpt_dir / WEIGHTS) != recorded:
        raise ArtifactError(f"{ckpt_dir / WEIGHTS} does not match the hash recorded in config.json (changed after "
                            "it was written); re-run the stage that wrote it")


def verify_checkpoint(ckpt_dir: str | Path) -> None:
    """Before building on it: the weights match the hash recorded at save and hold no NaN/Inf.
    Reads one tensor at a time, so a large checkpoint is checked without loading it whole.

    >>> verify_checkpoint("work/ckpt")  # doctest: +SKIP
    """
    ckpt_dir = Path(ckpt_dir)
    _, meta = load_checkpoint_config(ckpt_dir)
    path = _weights(ckpt_dir)
    _check_hash(ckpt_dir, meta)
    try:
        with ctrl_c_held() as check, safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                check()
                check_finite({name: f.get_tensor(name)}, str(ckpt_dir))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path} is unreadable or truncated ({e}); re-run the stage that wrote it") from None


def checkpoint_hash(ckpt_dir: str | Path) -> str:
    return json.loads((Path(ckpt_dir) / "config.json").read_text()).get("nbtrt", {}).get("content_sha256", "")
