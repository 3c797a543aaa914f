"""Triton kernels for weight-only quantized linears on CUDA: INT8 (per output channel) and INT4
(per group of inputs), read in the checkpoint's own byte layout (nbtrt.quantize.formats).

One row of activations (batch-1 decode) is a GEMV whose time is the weight bytes it streams, so
the kernel spends as few instructions per weight as it can: each 32-bit word holds 4 int8 or 8
int4 values; a field is shifted into the top mantissa bits of 1.0 and its sign bit flipped, all
in one AND-XOR, which makes the float ``1 + (q + 2^(b-1)) / 2^b`` without an int-to-float
conversion. Then ``sum(x * q) = 2^b * (sum(x * f) - 1.5 * sum(x))``: one FMA per weight, and the
correction costs one sum over x per block, shared by every row. More rows (prefill, batched
decode) dequantize the weight once into the activation dtype and call cuBLAS.

On a machine without CUDA the same kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
set before this module is imported): that is how CI checks them.

>>> y = weight_only_mm(x, int8_weight.view(torch.int32), scale, bits=8, group=0)  # doctest: +SKIP
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

# Candidates for the GEMV autotuner (rows per program, inputs per step, warps, pipeline depth).
# Chosen on an H200 by benchmarks/gpu.py's gemv section over the 8B shapes (see the README); a
# config whose block does not divide the input size is pruned for that shape.
GEMV_CONFIGS = [(4, 512, 4, 3), (8, 256, 4, 4), (8, 512, 4, 3), (8, 1024, 8, 2), (16, 256, 4, 3),
                (16, 512, 8, 3), (32, 256, 8, 3), (4, 1024, 4, 2)]


@functools.cache
def triton_available() -> bool:
    """True when Triton is importable (it ships with PyTorch's CUDA wheels on Linux)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else why not."""
    if not triton_available():
        return "Triton is not installed (it comes with PyTorch's CUDA wheels on Linux)"
    if device.type != "cuda" and not interpreting():
        return f"the Triton kernels run on CUDA (or in Triton's interpreter), not on {device.type}"
    return None


# ------------------------------------------------------------------------------ reference (torch)
def unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [N, K*bits/32] -> the signed integers [N, K] (int32), field i of word j = element
    ``j * 32/bits + i``: the little-endian view of int8 [N, K], or of the int4 byte layout."""
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    u = (words[:, :, None] >> shifts) & ((1 << bits) - 1)
    half = 1 << (bits - 1)
    return ((u ^ half) - half).reshape(words.shape[0], -1)


def dequantize_words(words: torch.Tensor, scales: torch.Tensor, bits: int, group: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """The float weight [N, K]: per-channel ``scales [N]`` (group 0) or per-group ``[N, K/group]``."""
    q = unpack_words(words, bits).float()
    s = scales.float()[:, None] if group == 0 else scales.float().repeat_interleave(group, 1)
    return (q * s).to(dtype)


# ------------------------------------------------------------------------------ Triton
@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_w, stride_s,
             BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        PER_WORD: tl.constexpr = 32 // BITS
        FIELD: tl.constexpr = 23 - BITS  # the field lands in the top mantissa bits of 1.0
        MASK: tl.constexpr = ((1 << BITS) - 1) << FIELD
        G: tl.constexpr = BLOCK_K if GROUP == 0 else GROUP  # inputs sharing a scale within a block
        NG: tl.constexpr = BLOCK_K // G
        WPG: tl.constexpr = G // PER_WORD
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = rows < N
        groups = tl.arange(0, NG)
        word = groups[:, None] * WPG + tl.arange(0, WPG)[None, :]  # [NG, WPG] words of one block
        w_ptrs = w_ptr + rows[:, None, None].to(tl.int64) * stride_w + word[None, :, :]
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = tl.load(w_ptrs + k0 // PER_WORD, mask=live[:, None, None], other=0)
            xf = tl.zeros([BLOCK_N, NG, WPG], dtype=tl.float32)
            xs = tl.zeros([NG, WPG], dtype=tl.float32)
            for i in tl.static_range(PER_WORD):
                xi = tl.load(x_ptr + k0 + word * PER_WORD + i).to(tl.float32)
                if BITS * i <= FIELD:
                    t = w << (FIELD - BITS * i)
                else:
                    t = w >> (BITS * i - FIELD)
                # AND keeps the field, XOR sets 1.0's exponent and flips the field's sign bit
                f = ((t & MASK) ^ 0x3FC00000).to(tl.float32, bitcast=True)
                xf += f * xi[None, :, :]
                xs += xi
            dot = tl.sum(xf, 2) - 1.5 * tl.sum(xs, 1)[None, :]  # [BLOCK_N, NG]: sum(x * q) / 2^BITS
            if GROUP == 0:
                acc += tl.sum(dot, 1)
            else:
                sc = tl.load(s_ptr + rows[:, None] * stride_s + (k0 // GROUP + groups)[None, :],
                             mask=live[:, None], other=0).to(tl.float32)
                acc += tl.sum(dot * sc, 1)
        if GROUP == 0:
            acc = acc * tl.load(s_ptr + rows, mask=live, other=0).to(tl.float32)
        tl.store(y_ptr + rows, (acc * (1 << BITS)).to(y_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def dequant(w_ptr, s_ptr, out_ptr, N, KW, stride_s,
                BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_W: tl.constexpr):
        PER_WORD: tl.constexpr = 32 // BITS
        HALF: tl.constexpr = 1 << (BITS - 1)
        row = tl.program_id(0)
        word = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        live = word < KW
        w = tl.load(w_ptr + row.to(tl.int64) * KW + word, mask=live, other=0)
        field = tl.arange(0, PER_WORD)
        q = ((w[:, None] >> (field * BITS)[None, :]) & ((1 << BITS) - 1)) ^ HALF
        k = word[:, None] * PER_WORD + field[None, :]
        if GROUP == 0:
            s = tl.load(s_ptr + row).to(tl.float32)
        else:
            s = tl.load(s_ptr + row * stride_s + k // GROUP, mask=live[:, None], other=0).to(tl.float32)
        out = (q - HALF).to(tl.float32) * s
        tl.store(out_ptr + row.to(tl.int64) * KW * PER_WORD + k, out.to(out_ptr.dtype.element_ty), mask=live[:, None])

    def prune(configs, named_args, **constexprs):
        K, group = named_args["K"], constexprs["GROUP"]
        return [c for c in configs if _block_fits(c.kwargs["BLOCK_K"], K, group)]

    tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                 for bn, bk, w, s in GEMV_CONFIGS],
        key=["N", "K", "BITS", "GROUP"], prune_configs_by={"early_config_prune": prune})(gemv)
    return gemv, tuned, dequant


def _block_fits(block_k: int, K: int, group: int) -> bool:
    return K % block_k == 0 and (group == 0 or block_k % group == 0)


def gemv_block_k(K: int, group: int, candidates=(1024, 512, 256, 128, 64, 32)) -> int | None:
    """The largest GEMV input block that divides K (and is a multiple of the group), or None."""
    return next((b for b in candidates if _block_fits(b, K, group)), None)


def supports(K: int, bits: int, group: int) -> bool:
    """Whether the kernels take a weight with K inputs (whole words, whole groups, a block that fits)."""
    if bits not in (4, 8) or K % (32 // bits) or (group and (K % group or group % (32 // bits))):
        return False
    return gemv_block_k(K, group) is not None


def gemv(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bits: int, group: int,
         config: tuple[int, int] | None = None) -> torch.Tensor:
    """x [1, K] (float) times the quantized weight -> [1, N] in x's dtype. ``config`` (BLOCK_N,
    BLOCK_K) bypasses the autotuner (the interpreter, benchmarks)."""
    plain, tuned, _ = _kernels()
    N, K = words.shape[0], x.shape[-1]
    y = torch.empty(1, N, device=x.device, dtype=x.dtype)
    x = x.contiguous()
    stride_s = scales.stride(0) if group else 0
    if config is None and (interpreting() or not any(_block_fits(c[1], K, group) for c in GEMV_CONFIGS)):
        config = (16, gemv_block_k(K, group))  # the interpreter cannot autotune; odd sizes: one block that fits
    if config is not None:
        bn, bk = config
        plain[(_cdiv(N, bn),)](x, words, scales, y, N, K, words.stride(0), stride_s,
                                     BITS=bits, GROUP=group, BLOCK_N=bn, BLOCK_K=bk)
    else:
        tuned[lambda meta: (_cdiv(N, meta["BLOCK_N"]),)](x, words, scales, y, N, K, words.stride(0),
                                                               stride_s, BITS=bits, GROUP=group)
    return y


def dequantize(words: torch.Tensor, scales: torch.Tensor, bits: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The float weight [N, K] written by one Triton kernel (what :func:`dequantize_words` computes)."""
    _, _, kernel = _kernels()
    N, KW = words.shape
    out = torch.empty(N, KW * (32 // bits), device=words.device, dtype=dtype)
    block = 128
    kernel[(N, _cdiv(KW, block))](words, scales, out, N, KW, scales.stride(0) if group else 0,
                                        BITS=bits, GROUP=group, BLOCK_W=block)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@torch.library.custom_op("nbtrt::weight_only_mm", mutates_args=())
def weight_only_mm(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """x [M, K] times a weight-only quantized [N, K] -> [M, N]: the GEMV kernel for one row, else
    the weight dequantized once and cuBLAS. Opaque to Inductor (it would re-fuse the dequantization)."""
    if x.shape[0] == 1:
        return gemv(x, words, scales, bits, group)
    w = dequantize(words, scales, bits, group, x.dtype)
    return torch.mm(x, w.t())


@weight_only_mm.register_fake
def _(x, words, scales, bits, group):
    return x.new_empty(x.shape[0], words.shape[0])
