"""Which tensor splits how across tensor-parallel ranks (a table of data), and sharded checkpoints.

A checkpoint sharded for ``N`` ranks is an ordinary nbtrt checkpoint directory whose config.json keeps
the *whole* model's decoder config and records ``"tensor_parallel_size": N`` in its ``nbtrt`` block;
``rank{r}.safetensors`` holds rank ``r``'s slice of every tensor, named as in the unsharded checkpoint.

How each rank's decoder differs (:func:`rank_config`): ``num_heads / N`` query heads, the KV heads those
query heads read (``num_kv_heads / N``, or one KV head copied to ``N / num_kv_heads`` ranks when there
are fewer KV heads than ranks), ``intermediate_size / N`` and ``ceil(vocab_size / N)`` rows of the
embedding and lm_head (the last slice zero-padded).
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .._io import (ArtifactError, atomic_dir, file_sha256, inside, link_or_copy, provenance, read_safetensors,
                   write_json)
from ..checkpoint import check_tensors, load_checkpoint
from ..config import DecoderConfig, load_checkpoint_config
from ..errors import is_whole

# How each tensor of an unsharded checkpoint is split, by name ("{layer}": any block index).
#   column     split the output dimension (dim 0): each rank computes a slice of the outputs
#   qkv        column, by head: the rank's query heads, then the KV heads they read (GQA groups stay whole)
#   row        split the input dimension (dim 1); the partial outputs are summed by an all-reduce
#   vocab      split the vocabulary rows (dim 0, padded to a multiple of the world size)
#   replicate  every rank holds the whole tensor; a row-split linear's bias is added once, after its all-reduce
SHARDING: dict[str, str] = {
    "embed.tok.weight": "vocab",
    "embed.pos.weight": "replicate",
    "layers.{layer}.attn_norm.weight": "replicate",
    "layers.{layer}.attn_norm.bias": "replicate",
    "layers.{layer}.attn.qkv.weight": "qkv",
    "layers.{layer}.attn.qkv.bias": "qkv",
    "layers.{layer}.attn.q_norm.weight": "replicate",  # per head_dim: the same for every head
    "layers.{layer}.attn.k_norm.weight": "replicate",
    "layers.{layer}.attn.o.weight": "row",
    "layers.{layer}.attn.o.bias": "replicate",
    "layers.{layer}.mlp_norm.weight": "replicate",
    "layers.{layer}.mlp_norm.bias": "replicate",
    "layers.{layer}.mlp.gate.weight": "column",
    "layers.{layer}.mlp.gate.bias": "column",
    "layers.{layer}.mlp.up.weight": "column",
    "layers.{layer}.mlp.up.bias": "column",
    "layers.{layer}.mlp.down.weight": "row",
    "layers.{layer}.mlp.down.bias": "replicate",
    "final_norm.weight": "replicate",
    "final_norm.bias": "replicate",
    "lm_head.weight": "vocab",
}
_LAYER = re.compile(r"^layers\.\d+\.")


def sharding_of(name: str) -> str:
    """The rule of :data:`SHARDING` for a checkpoint tensor name.

    >>> sharding_of("layers.7.mlp.down.weight")
    'row'
    """
    key = _LAYER.sub("layers.{layer}.", name)
    if key not in SHARDING:
        raise ArtifactError(f"tensor {name} has no tensor-parallel sharding rule (nbtrt.parallel.SHARDING)")
    return SHARDING[key]


def check_world_size(cfg: DecoderConfig, world: int) -> None:
    """A ValueError naming the count that ``world`` does not divide (and the sizes that would work)."""
    if not is_whole(world, 1):
        raise ValueError(f"tensor_parallel_size={world!r} must be an integer >= 1")
    problems = []
    if cfg.num_heads % world:
        problems.append(f"num_heads={cfg.num_heads}")
    if cfg.num_kv_heads % world and world % cfg.num_kv_heads:
        problems.append(f"num_kv_heads={cfg.num_kv_heads} (nor is it a multiple of it)")
    if cfg.intermediate_size % world:
        problems.append(f"intermediate_size={cfg.intermediate_size}")
    if problems:
        sizes = [n for n in range(1, cfg.num_heads + 1) if cfg.num_heads % n == 0 and cfg.intermediate_size % n == 0
                 and (cfg.num_kv_heads % n == 0 or n % cfg.num_kv_heads == 0)]
        raise ValueError(f"tensor_parallel_size={world} does not divide {', '.join(problems)}; "
                         f"this model splits over {sizes} ranks")
    if cfg.quantization:
        # int8_wo / int4 (wo, awq) would shard along their output channels and whole input groups, fp8's
        # per-tensor scales replicate; int8_sq per_token would change numerics (each rank's amax of a
        # row-split input covers only its slice). None is wired into the rank's decoder yet.
        raise ValueError(f"the checkpoint is quantized ({cfg.quantization.get('format') or 'KV cache only'}); "
                         "tensor parallelism takes unquantized checkpoints for now: shard the float checkpoint")


def rank_config(cfg: DecoderConfig, world: int) -> DecoderConfig:
    """One rank's decoder config: the same decoder with its share of heads, MLP width and vocabulary.

    >>> cfg = DecoderConfig(architecture="LlamaForCausalLM", vocab_size=257, hidden_size=64,
    ...                     intermediate_size=96, num_layers=1, num_heads=4, num_kv_heads=2, rope_theta=1e4)
    >>> r = rank_config(cfg, 4)
    >>> r.num_heads, r.num_kv_heads, r.head_dim, r.intermediate_size, r.vocab_size
    (1, 1, 16, 24, 65)
    """
    check_world_size(cfg, world)
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // world, num_kv_heads=max(1, cfg.num_kv_heads // world),
                               head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size // world,
                               vocab_size=-(-cfg.vocab_size // world))


def _heads_of_rank(cfg: DecoderConfig, world: int, rank: int) -> tuple[list[int], list[int]]:
    """(query heads, KV heads) rank ``rank`` computes: contiguous query heads and the KV heads they read."""
    per_rank = cfg.num_heads // world
    q_heads = list(range(rank * per_rank, (rank + 1) * per_rank))
    group = cfg.num_heads // cfg.num_kv_heads
    kv_heads = sorted({h // group for h in q_heads})
    return q_heads, kv_heads


def _split_qkv(cfg: DecoderConfig, t: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    q, k, v = t.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=0)
    q_heads, kv_heads = _heads_of_rank(cfg, world, rank)
    rest = t.shape[1:]

    def heads(x: torch.Tensor, n: int, which: list[int]) -> torch.Tensor:
        return x.reshape(n, cfg.head_dim, *rest)[which].reshape(len(which) * cfg.head_dim, *rest)

    return torch.cat([heads(q, cfg.num_heads, q_heads), heads(k, cfg.num_kv_heads, kv_heads),
                      heads(v, cfg.num_kv_heads, kv_heads)], dim=0)


def shard_tensors(cfg: DecoderConfig, tensors: dict[str, torch.Tensor], world: int,
                  rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s slice of an unsharded checkpoint's tensors, by :data:`SHARDING` (names unchanged).

    >>> part = shard_tensors(cfg, tensors, world=2, rank=1)  # doctest: +SKIP
    """
    check_world_size(cfg, world)
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} is outside 0..{world - 1}")
    rows = rank_config(cfg, world).vocab_size
    out = {}
    for name, t in tensors.items():
        rule = sharding_of(name)
        if rule == "replicate":
            part = t
        elif rule == "qkv":
            part = _split_qkv(cfg, t, world, rank)
        elif rule == "column":
            part = t.chunk(world, dim=0)[rank]
        elif rule == "row":
            part = t.chunk(world, dim=1)[rank]
        else:  # vocab: zero rows pad the last slice, so every rank's table has the same shape
            part = t[rank * rows:(rank + 1) * rows]
            if part.shape[0] < rows:
                part = torch.cat([part, part.new_zeros(rows - part.shape[0], *part.shape[1:])])
        out[name] = part.contiguous()
    return out


# How a module's output is split across ranks, where it is not whole on every rank (a rank sees only
# its heads or its MLP slice); what capture gathers. Any other module's output is whole: the row-split
# linears (and the attention and MLP ending in them) all-reduce, the vocabulary-parallel ones all-gather.
#   qkv       [..., q heads | kv heads | kv heads] of the rank's heads (KV heads copied when few)
#   column    [..., intermediate_size / N]
#   q_heads   [B, heads / N, T, head_dim]
#   kv_heads  [B, the rank's KV heads, T, head_dim]
OUTPUT_SPLIT: dict[str, str] = {
    "layers.{layer}.attn.qkv": "qkv",
    "layers.{layer}.attn.q_norm": "q_heads",
    "layers.{layer}.attn.k_norm": "kv_heads",
    "layers.{layer}.attn.k_quant": "kv_heads",
    "layers.{layer}.attn.v_quant": "kv_heads",
    "layers.{layer}.mlp.gate": "column",
    "layers.{layer}.mlp.up": "column",
}


def output_split(module: str) -> str | None:
    """The rule of :data:`OUTPUT_SPLIT` for a module name; None where the output is whole on every rank.

    >>> output_split("layers.3.mlp.up"), output_split("layers.3.mlp")
    ('column', None)
    """
    return OUTPUT_SPLIT.get(_LAYER.sub("layers.{layer}.", module))


def join_outputs(cfg: DecoderConfig, module: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The TP=1 output of ``module`` from every rank's (``parts``, in rank order): the inverse of the
    split; a KV head held by several ranks is taken once. ``cfg`` is the whole model's config.

    >>> join_outputs(cfg, "layers.0.attn.qkv", [rank0_out, rank1_out]).shape[-1] == cfg.qkv_size  # doctest: +SKIP
    """
    world, rule = len(parts), output_split(module)
    if rule is None:
        return parts[0]
    if rule == "column":
        return torch.cat(parts, dim=-1)
    if rule == "q_heads":
        return torch.cat(parts, dim=1)
    if rule == "kv_heads":
        return _join_kv_heads(cfg, parts, dim=1)
    r = rank_config(cfg, world)
    q, k, v = zip(*(p.split([r.q_size, r.kv_size, r.kv_size], dim=-1) for p in parts))
    return torch.cat([torch.cat(q, dim=-1), _join_kv_heads(cfg, k, -1), _join_kv_heads(cfg, v, -1)], dim=-1)


def _join_kv_heads(cfg: DecoderConfig, parts, dim: int) -> torch.Tensor:
    heads: dict[int, torch.Tensor] = {}
    for rank, part in enumerate(parts):
        mine = _heads_of_rank(cfg, len(parts), rank)[1]
        for h, one in zip(mine, part.chunk(len(mine), dim=dim)):
            heads.setdefault(h, one)
    return torch.cat([heads[h] for h in range(cfg.num_kv_heads)], dim=dim)


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def recorded_world_size(meta: dict) -> int:
    """The tensor-parallel size a checkpoint's ``nbtrt`` block records (1: unsharded)."""
    return int(meta.get("tensor_parallel_size", 1))


def shard_checkpoint(ckpt_dir: str | Path, out: str | Path, tensor_parallel_size: int, *,
                     overwrite: bool = False) -> Path:
    """Write ``out``: ``ckpt_dir`` (unsharded) split for ``tensor_parallel_size`` ranks, atomically.

    >>> shard_checkpoint("work/ckpt", "work/ckpt-tp2", tensor_parallel_size=2)  # doctest: +SKIP
    PosixPath('work/ckpt-tp2')
    """
    ckpt_dir, out = Path(ckpt_dir), Path(out)
    cfg, tensors = load_checkpoint(ckpt_dir)  # refuses an already sharded checkpoint, names it
    check_world_size(cfg, tensor_parallel_size)
    with atomic_dir(out, overwrite=overwrite, inputs=(ckpt_dir,)) as tmp:
        hashes = []
        for rank in range(tensor_parallel_size):
            save_file(shard_tensors(cfg, tensors, tensor_parallel_size, rank), tmp / rank_file(rank),
                      metadata={"format": "pt", "producer": "nbtrt"})
            hashes.append(file_sha256(tmp / rank_file(rank)))
        # one content hash over the ranks in order (each rank's own hash is kept too)
        meta = provenance("shard", ckpt_dir, {"tensor_parallel_size": tensor_parallel_size},
                          hashlib.sha256("".join(hashes).encode()).hexdigest())
        meta.update(tensor_parallel_size=tensor_parallel_size, rank_sha256=hashes)
        write_json(tmp / "config.json", {"decoder": cfg.to_dict(), "nbtrt": meta})
        for path in ckpt_dir.iterdir():  # tokenizer, generation and end-token files travel along
            if path.is_file() and path.name != "config.json" and path.suffix != ".safetensors":
                link_or_copy(inside(path, ckpt_dir, "checkpoint file"), tmp / path.name)
    return out


def check_checkpoint_size(ckpt_dir: str | Path, world: int) -> tuple[DecoderConfig, dict]:
    """(config, provenance) of a checkpoint that can run on ``world`` ranks: unsharded and divisible by
    ``world``, or sharded for exactly ``world``; else an error naming both sizes and what to do."""
    ckpt_dir = Path(ckpt_dir)
    cfg, meta = load_checkpoint_config(ckpt_dir)
    recorded = recorded_world_size(meta)
    if recorded not in (1, world):
        raise ArtifactError(
            f"{ckpt_dir} is sharded for tensor_parallel_size={recorded} but tensor_parallel_size={world} was "
            f"asked for; run it with {recorded} ranks, or shard the unsharded checkpoint again with "
            f"nbtrt.parallel.shard_checkpoint(..., tensor_parallel_size={world})")
    check_world_size(cfg, world)
    return cfg, meta


def load_rank_tensors(ckpt_dir: str | Path, world: int, rank: int,
                      verify_hash: bool = False) -> tuple[DecoderConfig, dict[str, torch.Tensor]]:
    """(whole model's config, rank ``rank``'s tensors) for ``world`` ranks: read from a checkpoint sharded
    for ``world`` ranks, or sliced at load from an unsharded one. Another sharded size is refused.

    >>> cfg, part = load_rank_tensors("work/ckpt-tp2", world=2, rank=0)  # doctest: +SKIP
    """
    ckpt_dir = Path(ckpt_dir)
    cfg, meta = check_checkpoint_size(ckpt_dir, world)
    if recorded_world_size(meta) == 1:
        cfg, tensors = load_checkpoint(ckpt_dir, verify_hash=verify_hash)
        return cfg, shard_tensors(cfg, tensors, world, rank)
    path = inside(ckpt_dir / rank_file(rank), ckpt_dir, "weight file")
    if verify_hash and file_sha256(path) != meta.get("rank_sha256", [None] * world)[rank]:
        raise ArtifactError(f"{path} does not match the hash recorded in config.json; shard the checkpoint again")
    tensors = read_safetensors(path, remedy="shard the checkpoint again")
    check_tensors(rank_config(cfg, world), tensors, str(path))
    return cfg, tensors

