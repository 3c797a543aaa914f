"""INT8 weight-only matmul of a few rows (a batched decode step, a short prompt) on CUDA, in one
Triton kernel.

Inductor's GEMV for one row runs on the CUDA cores; for more rows its work grows with them
(8B config, H100: 4.6 ms a step at 2 sequences, 12.4 ms at 8, against bf16's 6.7-6.9 ms), and
dequantizing the weight for cuBLAS writes and reads it again in bf16 (15 ms a step). Here each
program converts a [BLOCK_K, BLOCK_N] tile of int8 weights to the activation dtype in registers
and multiplies it on the tensor cores with the rows padded to 16 or 64: the weight is read once,
in int8, whatever the number of rows.

Registered with ``torch.library.triton_op``, so Inductor compiles the kernel into its graph and
the decode step's CUDA graph captures it. Triton ships with PyTorch's CUDA wheels; without it
(or on a CPU) the caller keeps its other paths.

>>> y = torch.ops.nbtrt.int8_weight_mm(x2, weight, scale)  # doctest: +SKIP
"""
from __future__ import annotations

import functools
import importlib.util

import torch
from torch.library import triton_op, wrap_triton

ROW_TILES = (16, 64)  # the rows padded to the smallest that holds them (16 rows ran 1.5x faster than 64)
MAX_ROWS = ROW_TILES[-1]
K_MULTIPLE = 128  # the smallest BLOCK_K; inputs must be a whole number of blocks
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # a constant: compiled code reads it


def block_rows(rows: int) -> int:
    """The row tile for ``rows`` rows (one compiled graph per tile when the rows are symbolic)."""
    return next(t for t in ROW_TILES if rows <= t)


def takes(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel runs ``x2 [rows, K] @ weight [N, K]^T``: CUDA, half-precision activations,
    2..MAX_ROWS rows, K a multiple of K_MULTIPLE."""
    return (x2.is_cuda and x2.dtype in (torch.bfloat16, torch.float16) and 2 <= x2.shape[0] <= MAX_ROWS
            and weight.shape[1] % K_MULTIPLE == 0 and TRITON_INSTALLED)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
               for n in (16, 32, 64) for k in (128, 256) for w, s in ((4, 3), (4, 4))]

    def whole_blocks(configs, named_args, **kwargs):
        return [c for c in configs if named_args["K"] % c.kwargs["BLOCK_K"] == 0]

    @triton.autotune(configs=configs, key=["N", "K", "BLOCK_M"], prune_configs_by={"early_config_prune": whole_blocks})
    @triton.jit
    def int8_weight_mm_kernel(x_ptr, w_ptr, scale_ptr, y_ptr, M, N, K,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        row_ok, col_ok = rm[:, None] < M, rn[None, :] < N
        x_ptrs = x_ptr + rm[:, None] * K + rk[None, :]
        w_ptrs = w_ptr + rn[None, :].to(tl.int64) * K + rk[:, None]  # [BLOCK_K, BLOCK_N] of weight[N, K]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K // BLOCK_K):
            x = tl.load(x_ptrs, mask=row_ok, other=0.0)
            w = tl.load(w_ptrs, mask=col_ok, other=0)
            acc = tl.dot(x, w.to(x.dtype), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.0)
        y = acc.to(y_ptr.dtype.element_ty) * scale[None, :]  # as the eager path: product, then scale
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], y, mask=row_ok & col_ok)

    return int8_weight_mm_kernel


def int8_weight_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` (bf16/fp16) times the int8 ``weight [N, K]`` with per-output ``scale [N]``
    -> ``[M, N]`` in x's dtype (the callers check :func:`takes`)."""
    M, K = x.shape
    N = weight.shape[0]
    x = x.contiguous()
    y = x.new_empty(M, N)
    grid = lambda meta: ((N + meta["BLOCK_N"] - 1) // meta["BLOCK_N"],)  # noqa: E731
    wrap_triton(_kernel())[grid](x, weight, scale, y, M, N, K, BLOCK_M=block_rows(M))
    return y


if TRITON_INSTALLED:  # registering without Triton only warns, on every import
    triton_op("nbtrt::int8_weight_mm", int8_weight_mm, mutates_args=())
