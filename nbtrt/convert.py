"""HF directory -> nbtrt checkpoint, driven by the mapping tables in :mod:`nbtrt.mapping`."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ._io import (ArtifactError, atomic_dir, check_output, eos_list, has_tokenizer, inside, load_tokenizer, read_json,
                  read_safetensors, refuse_nbtrt_artifact, refuse_remote_code, write_json)
from .checkpoint import check_finite, check_tensors, save_checkpoint
from .config import DTYPES, DecoderConfig, check_dtype
from .mapping import QKV_PARTS, Architecture, Row, architecture_for
from .model import TORCH_DTYPES


def hf_config(src: Path) -> dict:
    if not (src / "config.json").is_file():
        raise ArtifactError(f"{src} has no config.json; expected a HuggingFace model directory")
    return read_json(src / "config.json")


def resolve_source(src: str | Path) -> Path:
    """A zoo name or a local HF directory -> the directory (resolved), refused if it asks for remote code."""
    from . import zoo

    path = Path(zoo.resolve(src)).resolve()
    if path.is_dir():
        refuse_remote_code(path)
        refuse_nbtrt_artifact(path, "this step")
    return path


def decoder_config(src: str | Path, dtype: str = "float32") -> tuple[Architecture, DecoderConfig]:
    """(architecture, nbtrt config) for a HF directory, without reading any weights."""
    src = resolve_source(src)
    hf = hf_config(src)
    arch = architecture_for(hf)
    return arch, arch.config_from_hf(hf, dtype)


def mapping_table(src: str | Path) -> list[dict]:
    """The HF -> nbtrt mapping for one model, one row per tensor, for display.

    >>> import pandas as pd; pd.DataFrame(mapping_table("smollm2-135m-instruct"))  # doctest: +SKIP
    """
    src = resolve_source(src)
    arch, cfg = decoder_config(src)
    shapes, dtypes = _hf_tensor_meta(src)
    rows = []
    for row in arch.expand(cfg):
        rows.append({"hf": row.hf, "nbtrt": row.nbtrt, "shape": shapes.get(row.hf), "dtype": dtypes.get(row.hf),
                     "transform": _describe(row.transform)})
    return rows


def _describe(transform: str) -> str:
    return {"": "copy", "T": "transpose (Conv1D)", "q": "fuse into qkv [0]", "k": "fuse into qkv [1]",
            "v": "fuse into qkv [2]"}[transform]


def _weight_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(inside(index, src, "weight index")).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
            raise ArtifactError(f"{index} has no valid 'weight_map' (tensor name -> shard file)")
        files = [src / n for n in sorted(set(weight_map.values()))]
    elif (src / "model.safetensors").is_file():
        files = [src / "model.safetensors"]
    else:
        found = [p.name for p in src.iterdir()]
        hint = " (pickle .bin weights are not loaded: re-save with safe_serialization=True)" if any(
            n.endswith(".bin") for n in found) else ""
        raise ArtifactError(f"{src} has no model.safetensors or model.safetensors.index.json{hint}")
    for f in files:
        inside(f, src, "weight file")  # a symlink out, or a "../x" shard name in the index
        if not f.is_file():
            raise ArtifactError(f"{src}: weight shard {f.name} listed in the index is missing")
    return [f.resolve() for f in files]


def _hf_tensor_meta(src: Path) -> tuple[dict, dict]:
    shapes, dtypes = {}, {}
    for f in _weight_files(src):
        with _open(f) as sf:
            for name in sf.keys():
                sl = sf.get_slice(name)
                shapes[name], dtypes[name] = tuple(sl.get_shape()), sl.get_dtype()
    return shapes, dtypes


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path} is unreadable or truncated ({e})") from None


def _load_hf_tensors(src: Path, wanted: set[str]) -> dict[str, torch.Tensor]:
    tensors = {}
    files = _weight_files(src)
    for f in files:
        tensors.update(read_safetensors(f, wanted, remedy="download or copy it again", desc=f"reading {f.name}"))
    return tensors


def convert_tensors(arch: Architecture, cfg: DecoderConfig, hf_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the architecture's table: rename, transpose, fuse QKV, cast. Pure function."""
    dtype = TORCH_DTYPES[cfg.dtype]
    rows = arch.expand(cfg)
    absent = [r.hf for r in rows if r.hf not in hf_tensors]
    if absent:
        raise ArtifactError(f"the HF weights lack {absent[:5]}{' ...' if len(absent) > 5 else ''} "
                            f"which {arch.name} with this config.json needs")
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for row in rows:
        t = hf_tensors[row.hf]
        if row.transform == "T":
            t = t.t()
        if row.transform in QKV_PARTS:
            fused.setdefault(row.nbtrt, {})[row.transform] = t
        else:
            out[row.nbtrt] = t
    for name, parts in fused.items():
        trailing = {tuple(parts[p].shape[1:]) for p in QKV_PARTS}
        if len(trailing) > 1:
            raise ArtifactError(f"{name}: q/k/v parts have mismatched shapes "
                                f"{[tuple(parts[p].shape) for p in QKV_PARTS]}; config.json and weights disagree")
        out[name] = torch.cat([parts[p] for p in QKV_PARTS], dim=0)
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def _unused(arch: Architecture, rows: list[Row], hf_names: set[str], cfg: DecoderConfig) -> list[str]:
    used = {r.hf for r in rows}
    left = [n for n in hf_names - used if not any(re.fullmatch(p, n) for p in arch.ignore_hf)]
    if cfg.tie_embeddings and "lm_head.weight" in left:
        left.remove("lm_head.weight")  # saved by some tools even when tied
    return sorted(left)


def convert(src: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Convert a HF causal LM directory (or a zoo name) into an nbtrt checkpoint.

    >>> ckpt = convert("smollm2-135m-instruct", "work/ckpt", overwrite=True)  # doctest: +SKIP
    >>> sorted(p.name for p in ckpt.iterdir())[:2]  # doctest: +SKIP
    ['config.json', 'rank0.safetensors']
    """
    check_dtype(dtype)
    out = Path(out)
    src = resolve_source(src)
    check_output(out, (src,), overwrite=overwrite)
    arch, cfg = decoder_config(src, dtype)
    rows = arch.expand(cfg)
    shapes, _ = _hf_tensor_meta(src)
    unused = _unused(arch, rows, set(shapes), cfg)
    if unused:
        raise ArtifactError(f"{src}: tensors {unused[:5]} have no place in the {arch.name} mapping; "
                            "the config and the weights disagree (e.g. tie_word_embeddings or a bias flag)")
    hf_tensors = _load_hf_tensors(src, {r.hf for r in rows})
    check_finite(hf_tensors, str(src))
    tensors = convert_tensors(arch, cfg, hf_tensors)
    check_tensors(cfg, tensors, f"{src} converted")
    check_finite(tensors, f"{src} converted")
    with atomic_dir(out, overwrite=overwrite, inputs=(src,)) as tmp:
        save_checkpoint(tmp, cfg, tensors, stage="convert", source=src, options={"dtype": dtype},
                        tokenizer_dir=src)
        write_end_tokens(src, tmp)
    return out


def end_token_ids(src: Path) -> list[int]:
    """Every id that ends an answer for the HF model in ``src``: generation_config.json's
    ``eos_token_id``, config.json's (what transformers uses when generation_config.json is absent),
    then the tokenizer's eos; all of them, each once, in that order.

    >>> end_token_ids(nbtrt.zoo.get("smollm2-135m-instruct"))  # doctest: +SKIP
    [2, 0]
    """
    gen = read_json(src / "generation_config.json") if (src / "generation_config.json").is_file() else {}
    ids = eos_list(gen.get("eos_token_id")) + eos_list(hf_config(src).get("eos_token_id"))
    if has_tokenizer(src):
        try:
            tokenizer = load_tokenizer(src)
        except ArtifactError:
            raise
        except (OSError, ValueError, TypeError) as e:
            raise ArtifactError(f"{src}: the tokenizer files do not load ({e})") from None
        ids += eos_list(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def write_end_tokens(src: Path, ckpt: Path) -> None:
    """Record :func:`end_token_ids` as the checkpoint's generation_config.json ``eos_token_id``
    (created from config.json's special tokens, as transformers does, when the model has none), so
    every engine built from it stops where transformers would."""
    ids = end_token_ids(src)
    if not ids:
        return
    path = ckpt / "generation_config.json"
    if path.is_file():
        gen = read_json(path)
    else:
        hf = hf_config(src)
        gen = {k: hf[k] for k in ("bos_token_id", "pad_token_id") if hf.get(k) is not None}
    gen["eos_token_id"] = ids
    write_json(path, gen)


def add_cli(sub) -> None:
    p = sub.add_parser("convert", help="HF directory or zoo name -> nbtrt checkpoint")
    p.add_argument("src", help="a zoo name (see `python -m nbtrt.zoo`) or a local HF directory")
    p.add_argument("out")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=lambda a: print(convert(a.src, a.out, dtype=a.dtype, overwrite=a.overwrite)))
