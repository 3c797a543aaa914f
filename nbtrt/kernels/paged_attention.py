"""Decode attention over a paged KV cache on CUDA, in two Triton kernels (flash-decoding through
block tables).

One program per (sequence, KV head, split) multiplies the query heads that share that KV head
(padded to 16 rows for the tensor cores) with the keys of its split of the sequence's context,
found through the sequence's block table, and keeps a running maximum and sum (online softmax);
a second kernel merges the splits. Scores are float32. ``context_lens`` and ``block_tables`` are
read on the device, so one captured CUDA graph serves every step of a batch size. A row of context
length 0 (padding of a graph bucket) comes out as zeros.

The plain torch path every test checks it against is
:func:`nbtrt.serving.runner.paged_attention_reference`.

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
    def merge_kernel(acc_ptr, max_ptr, sum_ptr, out_ptr, G, SPLITS, out_sb, out_sh, KV,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
        seq_head, g = tl.program_id(0), tl.program_id(1)
        sp, d = tl.arange(0, BLOCK_SPLITS), tl.arange(0, BLOCK_D)
        sp_ok = sp < SPLITS
        part = (seq_head * SPLITS + sp) * G + g
        split_max = tl.load(max_ptr + part, mask=sp_ok, other=float("-inf"))
        top = tl.max(split_max, 0)
        top = tl.where(top == float("-inf"), 0.0, top)  # an empty row (context 0): zeros, not NaN
        weight = tl.exp(split_max - top)
        total = tl.sum(weight * tl.load(sum_ptr + part, mask=sp_ok, other=0.0), 0)
        total = tl.where(total == 0.0, 1.0, total)
        acc = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=sp_ok[:, None] & (d[None, :] < D), other=0.0)
        out = tl.sum(acc * weight[:, None], 0) / total
        b, h = seq_head // KV, seq_head % KV
        tl.store(out_ptr + b * out_sb + (h * G + g) * out_sh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)

    return partial_kernel, merge_kernel


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
    partial_kernel, merge_kernel = _kernels()
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
