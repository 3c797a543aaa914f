"""Attention over a paged KV cache on CUDA, in Triton: decode (flash-decoding through block tables)
and the tiles of a mixed step (prefill chunks and decodes together).

One program per (sequence, KV head, split) multiplies the query heads that share that KV head
(padded to 16 rows for the tensor cores) with the keys of its split of the sequence's context,
found through the sequence's block table, and keeps a running maximum and sum (online softmax);
the dense decode's second kernel (:mod:`nbtrt.kernels.triton_attention`) merges the splits. Scores
are float32. ``context_lens`` and ``block_tables`` are read on the device, so one captured CUDA graph
serves every step of a batch size. A row of context
length 0 (padding of a graph bucket) comes out as zeros.

The mixed step's kernel (:func:`paged_tile_attention`) takes the step's tokens in *tiles*: up to
:func:`tokens_per_tile` consecutive tokens of one sequence. One program per (tile, KV head) multiplies
the tile's tokens x the query heads sharing that KV head with the keys the tile's last token sees, each
row masked to its own causal context, so a whole step of any mix of chunk lengths is one launch with
every size read on the device, and the step compiles as one graph.

The plain torch paths every test checks them against are
:func:`nbtrt.serving.runner.paged_attention_reference` and :func:`~nbtrt.serving.runner.paged_decode_reference`.

>>> out = torch.ops.nbtrt.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, 512)  # doctest: +SKIP
"""
from __future__ import annotations

import functools
import importlib.util

import torch
from torch.library import triton_op, wrap_triton

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
BLOCK_N = 64  # keys a loop iteration reads
MAX_SPLITS = 16


def takes(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernels run: CUDA, Triton, a head size the tensor cores take (16..256)."""
    return (q.is_cuda and TRITON_INSTALLED and q.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and k_cache.dtype == q.dtype and 16 <= q.shape[-1] <= 256)


def keys_per_split(max_context: int) -> int:
    """Keys each split reads for contexts up to ``max_context``: a multiple of BLOCK_N giving at
    most MAX_SPLITS splits.

    >>> keys_per_split(2048), keys_per_split(100)
    (128, 64)
    """
    return BLOCK_N * max(1, -(-max_context // (BLOCK_N * MAX_SPLITS)))


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def partial_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, acc_ptr, max_ptr, sum_ptr, scale, KV, G, SPLITS,
                       q_sb, q_sh, c_slot, c_head, t_sb, BLOCK_SIZE,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                       KEYS_PER_SPLIT: tl.constexpr, PRECISION: tl.constexpr):
        seq_head, split = tl.program_id(0), tl.program_id(1)
        b, h = seq_head // KV, seq_head % KV
        scale = tl.cast(scale, tl.float32)
        ctx = tl.load(lens_ptr + b)
        rows, d = tl.arange(0, ROWS), tl.arange(0, BLOCK_D)
        row_ok, d_ok = rows < G, d < D
        q = tl.load(q_ptr + b * q_sb + (h * G + rows)[:, None] * q_sh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        row_max = tl.full((ROWS,), float("-inf"), tl.float32)
        row_sum = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
        lo = split * KEYS_PER_SPLIT
        hi = tl.minimum(lo + KEYS_PER_SPLIT, ctx)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            block = tl.load(tables_ptr + b * t_sb + n // BLOCK_SIZE, mask=n_ok, other=0)
            slot = block.to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE
            kv_off = slot[:, None] * c_slot + h * c_head + d[None, :]
            k = tl.load(k_ptr + kv_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            scores = tl.where(n_ok[None, :], scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            base = tl.where(new_max == float("-inf"), 0.0, new_max)
            rescale = tl.exp(row_max - base)
            p = tl.exp(scores - base[:, None])
            v = tl.load(v_ptr + kv_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            row_sum = row_sum * rescale + tl.sum(p, 1)
            row_max = new_max
        part = (seq_head * SPLITS + split) * G + rows
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(max_ptr + part, row_max, mask=row_ok)
        tl.store(sum_ptr + part, row_sum, mask=row_ok)

    @triton.jit
    def tile_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, starts_ptr, counts_ptr, first_ctx_ptr, scale, G,
                    q_sn, q_sh, o_sn, o_sh, c_slot, c_head, t_sb, BLOCK_SIZE,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, TOKENS: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        tile, h = tl.program_id(0), tl.program_id(1)
        start = tl.load(starts_ptr + tile)  # the tile's first token: a row of q
        count = tl.load(counts_ptr + tile)  # its tokens (<= TOKENS)
        first_ctx = tl.load(first_ctx_ptr + tile)  # keys its first token sees (its position + 1)
        scale = tl.cast(scale, tl.float32)
        rows, d = tl.arange(0, ROWS), tl.arange(0, BLOCK_D)
        t, g = rows // G, rows % G  # row = (token of the tile, query head of the group)
        row_ok, d_ok = (t < count) & (rows < TOKENS * G), d < D
        q = tl.load(q_ptr + (start + t)[:, None] * q_sn + (h * G + g)[:, None] * q_sh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        row_ctx = first_ctx + t
        row_max = tl.full((ROWS,), float("-inf"), tl.float32)
        row_sum = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
        hi = first_ctx + count - 1  # keys the tile's last token sees
        for key0 in range(0, hi, BLOCK_N):
            n = key0 + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            block = tl.load(tables_ptr + tile * t_sb + n // BLOCK_SIZE, mask=n_ok, other=0)
            slot = block.to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE
            kv_off = slot[:, None] * c_slot + h * c_head + d[None, :]
            k = tl.load(k_ptr + kv_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            scores = tl.where(n[None, :] < row_ctx[:, None], scores, float("-inf"))  # causal, per row
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            base = tl.where(new_max == float("-inf"), 0.0, new_max)
            rescale = tl.exp(row_max - base)
            p = tl.exp(scores - base[:, None])
            v = tl.load(v_ptr + kv_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            row_sum = row_sum * rescale + tl.sum(p, 1)
            row_max = new_max
        out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
        tl.store(out_ptr + (start + t)[:, None] * o_sn + (h * G + g)[:, None] * o_sh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    from .triton_attention import _kernels as dense_kernels

    return partial_kernel, dense_kernels()[1], tile_kernel  # the splits merge as in the dense decode kernel


TILE_ROWS = 64  # query rows (tokens x grouped heads) a tile program multiplies at once


def tokens_per_tile(group: int) -> int:
    """Tokens of one sequence a tile holds when ``group`` query heads share a KV head.

    >>> tokens_per_tile(4), tokens_per_tile(7), tokens_per_tile(1)
    (16, 9, 64)
    """
    return max(1, TILE_ROWS // group)


def paged_tile_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                         starts: torch.Tensor, counts: torch.Tensor, first_ctx: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """``q`` [N, H, D], the step's tokens (their keys and values already in the cache); tile ``i`` holds
    ``counts[i]`` (<= :func:`tokens_per_tile`) consecutive tokens of one sequence starting at row
    ``starts[i]``, the first of which sees ``first_ctx[i]`` keys, through the block table ``tables[i]``
    -> [N, H, D] in q's dtype. Every row of q belongs to exactly one tile."""
    import triton

    N, H, D = q.shape
    block_size, KV = k_cache.shape[1], k_cache.shape[2]
    G = H // KV
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = q.new_empty(N, H, D)
    tile_kernel = _kernels()[2]
    block_d = triton.next_power_of_2(D)
    tokens = tokens_per_tile(G)
    wrap_triton(tile_kernel)[(tables.shape[0], KV)](
        q, k_cache, v_cache, out, tables, starts, counts, first_ctx, scale, G,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(1), k_cache.stride(2),
        tables.stride(0), block_size,
        D=D, BLOCK_D=block_d, TOKENS=tokens, ROWS=triton.next_power_of_2(tokens * G), BLOCK_N=BLOCK_N,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2)
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, split: int) -> torch.Tensor:
    """``q`` [B, H, D] (one new token per sequence, its key and value already in the cache),
    ``k_cache``/``v_cache`` [num_blocks, block_size, KV, D], ``block_tables`` [B, max_blocks] int32,
    ``context_lens`` [B] int32 or int64 (keys each sequence attends, its new token's included), ``split``
    a multiple of BLOCK_N (:func:`keys_per_split`) -> [B, H, D] in q's dtype."""
    import triton

    B, H, D = q.shape
    block_size, KV = k_cache.shape[1], k_cache.shape[2]
    G = H // KV
    q = q if q.stride(-1) == 1 else q.contiguous()
    splits = max(1, -(-(block_tables.shape[1] * block_size) // split))
    acc = q.new_empty(B * KV * splits * G, D, dtype=torch.float32)
    row_max = q.new_empty(B * KV * splits * G, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    out = q.new_empty(B, H, D)
    partial_kernel, merge_kernel, _ = _kernels()
    block_d = triton.next_power_of_2(D)
    wrap_triton(partial_kernel)[(B * KV, splits)](
        q, k_cache, v_cache, block_tables, context_lens, acc, row_max, row_sum, scale, KV, G, splits,
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), block_size,
        D=D, BLOCK_D=block_d, ROWS=max(16, triton.next_power_of_2(G)), BLOCK_N=BLOCK_N, KEYS_PER_SPLIT=split,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=1 if q.element_size() * block_d > 512 else 2)
    wrap_triton(merge_kernel)[(B * KV, G)](
        acc, row_max, row_sum, out, G, splits, out.stride(0), out.stride(1), KV,
        D=D, BLOCK_D=block_d, BLOCK_SPLITS=max(2, triton.next_power_of_2(splits)), num_warps=4)
    return out


if TRITON_INSTALLED:  # registering without Triton only warns, on every import
    triton_op("nbtrt::paged_decode_attention", paged_decode_attention, mutates_args=())
    triton_op("nbtrt::paged_tile_attention", paged_tile_attention, mutates_args=())
