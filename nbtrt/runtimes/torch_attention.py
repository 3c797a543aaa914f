"""The torch runtime's attention and forward pieces: decode attention over the static cache,
the per-layer KV object a block attends through (the decoder's swap point, ``kv.attend``), and
the decoder's forward cut in three (prelude, one block, head) so that one compiled block serves
every layer.

>>> x, rope, mask = decode_prelude(model, ids, mask, cache_position)  # doctest: +SKIP
>>> x = decode_block(model.layers[0], x, rope, mask, k0, v0, cache_position)  # doctest: +SKIP
"""
from __future__ import annotations

import torch

from ..kernels import triton_attention
from ..model import Decoder, dense_attention, positions_from_mask

# With graphed prefills on, prompts up to this many tokens a sequence prefill through a CUDA graph
# (past it the GPU's time hides the host's): a compiled prefill launches ~30 kernels a layer from
# Python, and the 8B config's 128-token prefill took 13-35 ms of host time for 7-14 ms of kernels
# (README, "Graphed prefills").
GRAPH_PREFILL_TOKENS = 512


def grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """Attention of one new token per sequence over the whole static cache, with the query heads
    that share a KV head as the rows of one matrix product: the cache is read as it lies, where
    SDPA first needs every KV head copied out to each of its query heads, the whole cache each
    step (8B config, H200: 7.3 µs a layer against 13.9 for SDPA and its copies). Scores stay
    float32, as in SDPA. ``q`` [B, H, 1, D], ``k``/``v`` [B, KV, S, D], ``mask`` [B, 1, 1, S] (bool, True: seen)."""
    B, H, _, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    G = H // KV  # query heads per KV head
    qg, kt = q.reshape(B * KV, G, D), k.reshape(B * KV, S, D).transpose(1, 2)
    if q.is_cuda:  # cuBLAS accumulates in float32 and can hand that back
        scores = torch.bmm(qg, kt, out_dtype=torch.float32)
    else:
        scores = torch.bmm(qg.float(), kt.float())
    scores = scores.view(B, KV, G, S) * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(v.dtype)
    return torch.bmm(probs.view(B * KV, G, S), v.reshape(B * KV, S, D)).view(B, H, 1, D)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """A decode step's attention: on CUDA nbtrt's flash-decoding kernels (:mod:`triton_attention`),
    elsewhere :func:`grouped_decode_attention`. Arguments as there."""
    if triton_attention.takes(q, k):
        split = triton_attention.keys_per_split(k.shape[2])
        return torch.ops.nbtrt.decode_attention(q, k, v, mask[:, 0, 0], scale, split)
    return grouped_decode_attention(q, k, v, mask, scale)


class LayerKV:
    """One layer's static cache as a block sees it: write the new tokens at their slots, return the
    first ``width`` slots (all when None). The layer index is ignored on purpose: a graph that
    does not depend on it serves every layer. ``decode_attention``, when set, replaces SDPA for a
    one-token step (in attend)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, width=None, decode_attention=None):
        self.k, self.v, self.width, self.decode_attention = k, v, width, decode_attention

    def update(self, layer, k, v, cache_position):
        self.k.index_copy_(2, cache_position, k.to(self.k.dtype))
        self.v.index_copy_(2, cache_position, v.to(self.v.dtype))
        if self.width is None:
            return self.k, self.v
        return self.k[:, :, : self.width], self.v[:, :, : self.width]

    def attend(self, layer, q, k, v, mask, scale, cache_position):
        k_all, v_all = self.update(layer, k, v, cache_position)
        if q.shape[2] == 1 and mask is not None and self.decode_attention is not None:
            return self.decode_attention(q, k_all, v_all, mask, scale)
        return dense_attention(q, k_all, v_all, mask, scale)


def prelude(model: Decoder, input_ids, attention_mask, cache_position, causal: bool = False):
    """What :meth:`Decoder.forward` does before the blocks: embeddings, rotary tables, the mask.
    ``attention_mask`` column j is cache slot j; positions count real tokens up to each slot.
    ``causal`` (no padding, no past): no mask at all; attention runs plain causal."""
    positions = positions_from_mask(attention_mask).index_select(1, cache_position)
    x = model.embed(input_ids, positions)
    rope = model.rope(positions, x.dtype) if model.rope is not None else None
    return x, rope, None if causal else model.build_mask(attention_mask, cache_position)


def prefill_bucket(tokens: int, max_seq_len: int) -> int | None:
    """The length a prompt of ``tokens`` is padded to for a graphed prefill: the next power of two
    up to 64, then the next multiple of 64 (a graph serves one length, so prompts share a few; a
    padded row costs next to nothing while the weights' reads dominate). None past
    ``GRAPH_PREFILL_TOKENS`` or where the padding would not fit in the cache.

    >>> prefill_bucket(100, 2048), prefill_bucket(5, 2048), prefill_bucket(600, 2048)
    (128, 8, None)
    """
    bucket = 1 << (tokens - 1).bit_length() if tokens <= 64 else -(-tokens // 64) * 64
    return bucket if bucket <= min(GRAPH_PREFILL_TOKENS, max_seq_len) else None


def head(model: Decoder, x):
    return model.lm_head(model.final_norm(x[:, -1:]))[:, -1]


# Two copies of each piece: torch.compile keeps one cache per code object, and prefill
# (dynamic length, attends over filled slots) and decode (static, full cache width) differ.
def prefill_prelude(model, input_ids, attention_mask, cache_position, causal=False):
    return prelude(model, input_ids, attention_mask, cache_position, causal)


def prefill_block(block, x, rope, mask, k, v, cache_position):
    width = x.shape[1] if mask is None else mask.shape[-1]  # no mask: no past, just the new tokens
    return block(x, rope, mask, LayerKV(k, v, width), cache_position)


def prefill_head(model, x):
    return head(model, x)


def decode_prelude(model, input_ids, attention_mask, cache_position, causal=False):
    return prelude(model, input_ids, attention_mask, cache_position, causal)


def decode_block(block, x, rope, mask, k, v, cache_position):
    return block(x, rope, mask, LayerKV(k, v, decode_attention=decode_attention), cache_position)


def decode_head(model, x):
    return head(model, x)
