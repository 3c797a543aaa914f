"""One rank's decoder: :class:`nbtrt.model.Decoder` built from :func:`rank_config`, with four swaps.

The attention and MLP run unchanged on the rank's heads and MLP slice (column-split qkv, gate, up need
no communication). Where a rank holds only part of a sum or of the vocabulary, a module is swapped in:

    layers.{i}.attn.o, layers.{i}.mlp.down   RowParallelLinear: partial x @ W.T, all-reduce (sum), + bias
    embed.tok                                VocabParallelEmbedding: own rows looked up, others 0, all-reduce
    lm_head                                  VocabParallelHead: own logits, all-gather, padding cut off

Module and tensor names are those of the unsharded model, so checkpoints and debugger captures agree.
The collectives are torch.distributed's own (the default process group: Gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import DecoderConfig
from ..model import TORCH_DTYPES, Decoder, Rope
from .sharding import load_rank_tensors, rank_config


class RowParallelLinear(nn.Module):
    """A linear whose input dimension is split across ranks: the partial products are summed by an
    all-reduce, then the (replicated) bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows ``[offset, offset + rows)`` of the token embedding; a token of another rank's rows gives 0
    here, so the all-reduce (one non-zero term per token) is exact."""

    def __init__(self, rows: int, dim: int, offset: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))
        self.offset = offset

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.offset
        mine = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * mine[..., None].to(self.weight.dtype)
        dist.all_reduce(x)
        return x


class VocabParallelHead(nn.Module):
    """Logits for the rank's vocabulary rows; all ranks gather everyone's and drop the padding rows."""

    def __init__(self, rows: int, dim: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight).contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]


def tensor_parallel_decoder(cfg: DecoderConfig, tensors: dict[str, torch.Tensor], rank: int, world: int,
                            dtype: str | None = None) -> Decoder:
    """Rank ``rank``'s :class:`Decoder` holding its slice ``tensors`` (from :func:`shard_tensors`); ``cfg`` is
    the whole model's config. Call it inside an initialised process group of ``world`` ranks.

    >>> model = tensor_parallel_decoder(*load_rank_tensors("work/ckpt-tp2", 2, rank), rank, 2)  # doctest: +SKIP
    """
    rcfg = rank_config(cfg, world)
    with torch.device("meta"):
        model = Decoder(rcfg)
        model.embed.tok = VocabParallelEmbedding(rcfg.vocab_size, cfg.hidden_size, offset=rank * rcfg.vocab_size)
        model.lm_head = VocabParallelHead(rcfg.vocab_size, cfg.hidden_size, cfg.vocab_size)
        for block in model.layers:
            block.attn.o = RowParallelLinear(rcfg.q_size, cfg.hidden_size, cfg.o_bias)
            block.mlp.down = RowParallelLinear(rcfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias)
    if cfg.tie_embeddings:  # both vocabulary-parallel, split the same way: one table serves both
        tensors = {**tensors, "lm_head.weight": tensors["embed.tok.weight"]}
    model.load_state_dict(tensors, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.tok.weight
    model.rope = Rope(rcfg) if rcfg.position == "rope" else None  # derived, not stored
    return model.to(dtype=TORCH_DTYPES[dtype or cfg.dtype]).eval()


def load_rank_decoder(ckpt_dir: str | Path, rank: int, world: int, dtype: str | None = None) -> Decoder:
    """:func:`tensor_parallel_decoder` for a checkpoint directory (sharded for ``world`` ranks, or unsharded)."""
    cfg, tensors = load_rank_tensors(ckpt_dir, world, rank)
    return tensor_parallel_decoder(cfg, tensors, rank, world, dtype=dtype)
