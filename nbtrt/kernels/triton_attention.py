"""Attention of one new token per sequence over a static KV cache (a decode step) on CUDA, in two
Triton kernels: flash-decoding.

The matmul path (:func:`nbtrt.runtimes.torch_attention.grouped_decode_attention`) takes three kernels a
layer, two cuBLAS GEMMs and a softmax, each too small to fill the GPU; on the 8B config they were
0.24 ms of a 2.09 ms INT4 decode step (H100, ``benchmarks/experiments/decode_attention.py``).
Here the cache is cut into splits of ``keys_per_split`` slots; one program per (sequence, KV
head, split) multiplies the query heads that share that KV head (padded to 16 rows for the
tensor cores) with its keys, keeps a running maximum and sum (online softmax) and weights the
values; a second kernel merges the splits. Scores are float32, as in SDPA; masked slots are left
out. Registered with ``torch.library.triton_op`` so Inductor compiles both kernels into the
decode graph.

>>> out = torch.ops.nbtrt.decode_attention(q, k, v, seen, scale, keys_per_split(k.shape[2]))  # doctest: +SKIP
"""
from __future__ import annotations

import functools

import torch
from torch.library import triton_op, wrap_triton

from .triton_int8 import TRITON_INSTALLED

BLOCK_S = 64  # cache slots a loop iteration reads
MAX_SPLITS = 64  # the merge kernel holds every split's partial row at once


def takes(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the kernels run this step: CUDA, Triton, a head size the tensor cores take (16..256)."""
    return (q.is_cuda and TRITON_INSTALLED and q.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and k.dtype == q.dtype and 16 <= q.shape[-1] <= 256)


def keys_per_split(slots: int) -> int:
    """The cache slots each split reads for a cache of ``slots``: one block while that makes at
    most MAX_SPLITS splits, longer splits past that. (8B config, 384 slots, H100: one split a
    sequence and KV head, with no merge kernel, made the INT4 step 2.135 ms against 2.001;
    blocks of 32 slots 2.008.)

    >>> keys_per_split(384), keys_per_split(8192)
    (64, 128)
    """
    return BLOCK_S * -(-slots // (BLOCK_S * MAX_SPLITS))


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def partial_kernel(q_ptr, k_ptr, v_ptr, seen_ptr, acc_ptr, max_ptr, sum_ptr, scale, S, KV, G, SPLITS,
                       q_sb, q_sh, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, seen_sb, seen_ss,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr,
                       KEYS_PER_SPLIT: tl.constexpr, PRECISION: tl.constexpr):
        seq_head, split = tl.program_id(0), tl.program_id(1)
        b, h = seq_head // KV, seq_head % KV
        scale = tl.cast(scale, tl.float32)  # Inductor passes a Python float as float64
        rows, d = tl.arange(0, ROWS), tl.arange(0, BLOCK_D)
        row_ok, d_ok = rows < G, d < D
        q = tl.load(q_ptr + b * q_sb + (h * G + rows)[:, None] * q_sh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        row_max = tl.full((ROWS,), float("-inf"), tl.float32)
        row_sum = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
        for start in range(split * KEYS_PER_SPLIT, (split + 1) * KEYS_PER_SPLIT, BLOCK_S):
            s = start + tl.arange(0, BLOCK_S)
            s_ok = s < S
            seen = tl.load(seen_ptr + b * seen_sb + s * seen_ss, mask=s_ok, other=0) != 0
            k = tl.load(k_ptr + b * k_sb + h * k_sh + s[:, None] * k_ss + d[None, :],
                        mask=s_ok[:, None] & d_ok[None, :], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            scores = tl.where(seen[None, :], scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            base = tl.where(new_max == float("-inf"), 0.0, new_max)  # nothing seen yet: no NaN from -inf - -inf
            rescale = tl.exp(row_max - base)
            p = tl.exp(scores - base[:, None])
            v = tl.load(v_ptr + b * v_sb + h * v_sh + s[:, None] * v_ss + d[None, :],
                        mask=s_ok[:, None] & d_ok[None, :], other=0.0)
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
        top = tl.where(top == float("-inf"), 0.0, top)  # a row that saw nothing (a padded paged row): zeros, not NaN
        weight = tl.exp(split_max - top)  # a split that saw nothing: exp(-inf) = 0
        total = tl.sum(weight * tl.load(sum_ptr + part, mask=sp_ok, other=0.0), 0)
        total = tl.where(total == 0.0, 1.0, total)
        acc = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=sp_ok[:, None] & (d[None, :] < D), other=0.0)
        out = tl.sum(acc * weight[:, None], 0) / total
        b, h = seq_head // KV, seq_head % KV
        tl.store(out_ptr + b * out_sb + (h * G + g) * out_sh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)

    return partial_kernel, merge_kernel


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: torch.Tensor,
                     scale: float, split: int) -> torch.Tensor:
    """``q`` [B, H, 1, D], ``k``/``v`` [B, KV, S, D] (the cache, last dim contiguous), ``seen`` [B, S]
    (bool, True: the slot is attended), ``split`` a multiple of BLOCK_S (:func:`keys_per_split`)
    -> [B, H, 1, D] in q's dtype (callers check :func:`takes`)."""
    import triton

    B, H, _, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    G = H // KV
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    splits = -(-S // split)
    acc = q.new_empty(B * KV * splits * G, D, dtype=torch.float32)
    row_max = q.new_empty(B * KV * splits * G, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    out = q.new_empty(B, H, 1, D)
    partial_kernel, merge_kernel = _kernels()
    block_d = triton.next_power_of_2(D)
    wrap_triton(partial_kernel)[(B * KV, splits)](
        q, k, v, seen, acc, row_max, row_sum, scale, S, KV, G, splits,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        seen.stride(0), seen.stride(1),
        D=D, BLOCK_D=block_d, ROWS=max(16, triton.next_power_of_2(G)), BLOCK_S=BLOCK_S,
        KEYS_PER_SPLIT=split, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=1 if q.element_size() * block_d > 512 else 3)  # fp32 x 256: one stage fits
    wrap_triton(merge_kernel)[(B * KV, G)](
        acc, row_max, row_sum, out, G, splits, out.stride(0), out.stride(1), KV,
        D=D, BLOCK_D=block_d, BLOCK_SPLITS=max(2, triton.next_power_of_2(splits)), num_warps=4)
    return out


if TRITON_INSTALLED:  # registering without Triton only warns, on every import
    triton_op("nbtrt::decode_attention", decode_attention, mutates_args=())
