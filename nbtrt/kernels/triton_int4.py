"""INT4 weight-only matmul of many rows (a prefill) on CUDA, in one Triton kernel that reads the
weight in :mod:`cuda_int4`'s layout.

Why: a prefill used to dequantize each weight to bf16 (``nbtrt::int4_dequantize``, an NVRTC kernel
called from Python) and then called cuBLAS. That writes and reads the weight again in bf16, and each
call of the custom op cost about 42 us of host time, 128 of them in the 8B model's prefill, which
is bound by the host (README, "The first token"). Here each program loads its tile of packed words
once, takes the nibbles apart in registers and multiplies them on the tensor cores, and the kernel
is a ``torch.library.triton_op``, so Inductor launches it from its own generated code.

The packed layout holds a word per (16-row tile, 64-input chunk, lane g t, k-step j); its 8 nibbles
are weight rows ``16 tile + 8 h + g`` and inputs ``64 chunk + 16 t + 4 j + 2 p + e`` at nibble
``4 e + 2 p + h``. With ``kk = 16 chunk + 4 t + j`` the input is ``4 kk + 2 p + e``, so a block of
words [kk, row pair] is a contiguous load, and shifting each word by the 8 nibbles' offsets
broadcast as [kk, p, e, row pair, h] gives the weight tile [inputs, columns] with the inputs in
their natural order: the activations load as they are, and only the output columns are permuted
(column ``2 pair + h`` is row ``16 tile + 8 h + g``), which the store undoes.

>>> y = torch.ops.nbtrt.int4_weight_mm(x2, words, scales_t, 128)  # doctest: +SKIP
"""
from __future__ import annotations

import functools

import torch
from torch.library import triton_op, wrap_triton

from .triton_int8 import TRITON_INSTALLED

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) the autotuner chooses from, once a weight shape: on
# an H100 the best of a wide search for 128 rows of every 8B shape was one of these, and 64 to 128
# rows (the calls that take this kernel) share them (benchmarks/experiments/int4_prefill_gemm.py)
CONFIGS = ((64, 64, 64, 4, 3), (64, 64, 64, 4, 4), (64, 32, 128, 4, 4), (64, 128, 128, 4, 3))


@functools.cache
def _kernel(configs: tuple = CONFIGS):
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
               for m, n, k, w, s in configs]

    def whole_blocks(configs, named_args, **kwargs):
        return [c for c in configs if named_args["GROUP"] % c.kwargs["BLOCK_K"] == 0]

    @triton.autotune(configs=configs, key=["N", "K"], prune_configs_by={"early_config_prune": whole_blocks})
    @triton.jit
    def int4_weight_mm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, GROUP,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        KW: tl.constexpr = BLOCK_K // 4  # words along k a row pair holds in the block
        NW: tl.constexpr = BLOCK_N // 2  # row pairs (g, g + 8) of the block's tiles
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.program_id(1) * NW + tl.arange(0, NW)
        tile, g = pair // 8, pair % 8
        # the block's column 2 pair + h is weight row 16 tile + 8 h + g
        rows = tl.reshape((tile * 16 + g)[:, None] + 8 * tl.arange(0, 2)[None, :], (BLOCK_N,))
        row_ok = rows < N
        kk = tl.arange(0, KW)
        word_k = tl.max_contiguous(tl.multiple_of((kk // 16) * 128 + kk % 16, 16), 16)
        w_ptrs = w_ptr + word_k[:, None] + (tile.to(tl.int64) * (K // 64) * 128 + g * 16)[None, :]
        # nibble 4 e + 2 p + h of a word is input 4 kk + 2 p + e: [KW, p, e, NW, h] is [BLOCK_K, BLOCK_N]
        p = tl.arange(0, 2)[None, :, None, None, None]
        e = tl.arange(0, 2)[None, None, :, None, None]
        h = tl.arange(0, 2)[None, None, None, None, :]
        shifts = 16 * e + 8 * p + 4 * h
        x_ptrs = x_ptr + rm[:, None].to(tl.int64) * K + tl.arange(0, BLOCK_K)[None, :]
        m_ok = rm[:, None] < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, K // BLOCK_K):
            words = tl.load(w_ptrs, mask=(tile < N // 16)[None, :], other=0)  # [KW, NW] int32
            x = tl.load(x_ptrs, mask=m_ok, other=0.0)
            nibbles = (words[:, None, None, :, None] >> shifts) & 0xF
            w = tl.reshape(nibbles - 8, (BLOCK_K, BLOCK_N)).to(x.dtype)
            # a group's products in fp32, scaled once (BLOCK_K divides the group)
            scale = tl.load(s_ptr + (step * BLOCK_K // GROUP) * N + rows, mask=row_ok, other=0.0)
            acc += tl.dot(x, w) * scale.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K // 64 * 128
            x_ptrs += BLOCK_K
        tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rows[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok & row_ok[None, :])

    return int4_weight_mm_kernel


def takes(x2: torch.Tensor) -> bool:
    """Whether the kernel runs ``x2 [rows, K]`` (the callers pass it in bf16): on CUDA, K whole
    64-input chunks."""
    return x2.is_cuda and x2.shape[1] % 64 == 0 and TRITON_INSTALLED


def int4_weight_mm(x2: torch.Tensor, words: torch.Tensor, scales_t: torch.Tensor, group: int) -> torch.Tensor:
    """``x2 [M, K]`` (bf16) times the packed int4 weight (:func:`cuda_int4.pack`) -> ``[M, N]``
    bf16; ``scales_t`` is the per-group scale transposed, ``[K / group, N]`` bf16."""
    M, K = x2.shape
    N = scales_t.shape[1]
    y = x2.new_empty(M, N)
    grid = lambda meta: ((M + meta["BLOCK_M"] - 1) // meta["BLOCK_M"], (N + meta["BLOCK_N"] - 1) // meta["BLOCK_N"])  # noqa: E731
    wrap_triton(_kernel())[grid](x2.contiguous(), words, scales_t, y, M, N, K, group)
    return y


if TRITON_INSTALLED:  # registering without Triton only warns, on every import
    triton_op("nbtrt::int4_weight_mm", int4_weight_mm, mutates_args=())
