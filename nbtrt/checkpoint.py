"""The nbtrt checkpoint format: config.json (decoder + provenance) and rank{r}.safetensors."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._io import ArtifactError, copy_tokenizer_files, file_sha256, provenance, write_json
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
    path = ckpt_dir / WEIGHTS
    if not path.is_file():
        raise ArtifactError(f"{ckpt_dir} has no {WEIGHTS}")
    if verify_hash and meta.get("content_sha256") and file_sha256(path) != meta["content_sha256"]:
        raise ArtifactError(f"{path} does not match the hash recorded in config.json; re-run the stage that wrote it")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path} is unreadable or truncated ({e}); re-run the stage that wrote it") from None
    if cfg.quantization:
        check_quantized_tensors(cfg, tensors, str(ckpt_dir))
    else:
        check_tensors(cfg, tensors, str(ckpt_dir))
    return cfg, tensors


def checkpoint_hash(ckpt_dir: str | Path) -> str:
    return json.loads((Path(ckpt_dir) / "config.json").read_text()).get("nbtrt", {}).get("content_sha256", "")
