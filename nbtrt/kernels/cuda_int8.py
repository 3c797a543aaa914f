"""INT8 weight-only matmul of 2 to 8 rows (a batched decode step) on CUDA: the INT4 kernel's
design (:mod:`cuda_int4`) on the int8 weight as the checkpoint stores it, ``[N, K]`` row-major,
with a scale per output row.

Why: the Triton kernel (:mod:`triton_int8`) pads the rows to a 16-row tile; here they are the
8 columns of the ``mma`` B operand, and a gated MLP's gate and up weights are read in one launch.
8B config on an H100, decode step: batch 2 took 3.83 ms against 4.09 ms, batch 8 4.20 against
4.22 ms (``gpu_int8-kernel_*``). One row stays on Inductor's fused GEMV, which was faster in the
engine's step (3.52-3.62 ms against 4.01 ms with this kernel for every linear).

How it reads a row-major weight: the inputs of an ``mma`` k-step may be taken in any order, so
long as the weight fragments and the activation fragments take them in the same one. Lane
``(g, t)`` loads 16 contiguous bytes of weight rows g and g + 8 (inputs ``16 t`` to ``16 t + 15``
of a 64-input chunk) and 32 contiguous bytes of activations, the same inputs, as the INT4 kernel
does; byte ``4 j + i`` of a load is input ``2 t + i`` (i = 0, 1) or ``2 t + 8 + i - 2`` of k-step
j. So the weight needs no repacking, and the Triton kernel, a prefill's cuBLAS call and the
debugger keep reading the same tensor.

An int8 ``q`` becomes bf16 exactly through fp32: its byte ``q + 128`` as the low mantissa bits of
2^23, minus 2^23 + 128, then the top half of the float (``q`` has 8 significant bits at most).
The products accumulate in fp32 and are rounded to bf16, then scaled and rounded again, as the
eager path (``linear(x, w) * scale``) does.

``nbtrt::int8_gated_mm`` is a gated MLP's input from the unchanged gate and up weights: a tile's
rows g read the gate, rows g + 8 the up projection of the same output, and the epilogue applies
the activation.

>>> y = torch.ops.nbtrt.int8_mm(x2, weight, scale)  # doctest: +SKIP
"""
from __future__ import annotations

import torch

from . import nvrtc
from .cuda_int4 import (ACTIVATION_CODES, HELPERS, MAX_ROWS, PREFETCH_CHUNKS, WARP_CHOICES, dependent_launch,
                        launch_by_rows)

CHUNK = 64  # inputs per chunk: a lane loads 16 of them from each of its two weight rows
UNROLL = 2  # chunks a warp's loop unrolls

SOURCE = HELPERS + r"""
// bytes 0, 1 and 2, 3 of w (int8) -> two bf16x2
__device__ __forceinline__ void int8_to_bf16x2(u32 w, u32& lo, u32& hi) {
    const u32 u = w ^ 0x80808080u;  // q + 128
    float f[4];
    #pragma unroll
    for (int i = 0; i < 4; ++i)  // 2^23 + q + 128, then q
        f[i] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7440 + i)) - 8388736.f;
    lo = __byte_perm(__float_as_uint(f[0]), __float_as_uint(f[1]), 0x7632);
    hi = __byte_perm(__float_as_uint(f[2]), __float_as_uint(f[3]), 0x7632);
}

// the four k-steps of one 64-input chunk: weight bytes of rows g and g + 8, activations xa, xb
__device__ __forceinline__ void mma_chunk(float* d, uint4 lo, uint4 hi, uint4 xa, uint4 xb) {
    const u32 l[4] = {lo.x, lo.y, lo.z, lo.w}, h[4] = {hi.x, hi.y, hi.z, hi.w};
    const u32 b[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
    #pragma unroll
    for (int j = 0; j < 4; ++j) {
        u32 a0, a1, a2, a3;
        int8_to_bf16x2(l[j], a0, a2);
        int8_to_bf16x2(h[j], a1, a3);
        mma_bf16(d, a0, a1, a2, a3, b[2 * j], b[2 * j + 1]);
    }
}

// y[M, N] = (x[M, K] @ W^T) * scale. A block's tile is 16 weight rows: rows g from w_lo, g + 8
// from w_hi, the tile's first row TILE_ROWS * blockIdx.x of each. Plain: w_hi = w_lo + 8 rows,
// TILE_ROWS 16. Gated (ACT): w_lo the gate, w_hi the up weight, TILE_ROWS 8, and N = their rows.
extern "C" __global__ void __launch_bounds__(WARPS * 32, 1)
int8_gemv(const char* __restrict__ w_lo, const char* __restrict__ w_hi, const u16* __restrict__ s_lo,
          const u16* __restrict__ s_hi, const u16* __restrict__ x, u16* __restrict__ y, int M, int N, int K) {
    const int TILE_ROWS = ACT ? 8 : 16;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int per_warp = K / 64 / WARPS, first = warp * per_warp, row0 = blockIdx.x * TILE_ROWS;
    const size_t offset = (size_t)(row0 + g) * K + first * 64 + 16 * t;
    const uint4* lo = reinterpret_cast<const uint4*>(w_lo + offset);
    const uint4* hi = reinterpret_cast<const uint4*>(w_hi + offset);
    const bool live = g < M;  // B column g is activation row g
    const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)(live ? g : 0) * K + first * 64 + 16 * t);
    const uint4 zero = make_uint4(0, 0, 0, 0);
    float d[4] = {0.f, 0.f, 0.f, 0.f};
#if DEPENDENT_LAUNCH
    for (int c = 0; c < per_warp && c < PREFETCH_CHUNKS; ++c) {  // as in int4_gemv
        asm volatile("prefetch.global.L2 [%0];" :: "l"(lo + c * 4));
        asm volatile("prefetch.global.L2 [%0];" :: "l"(hi + c * 4));
    }
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    #pragma unroll UNROLL
    for (int c = 0; c < per_warp; ++c) {
        const uint4 wl = LOAD_WEIGHT(lo + c * 4), wh = LOAD_WEIGHT(hi + c * 4);
        const uint4 xa = live ? xp[c * 8] : zero, xb = live ? xp[c * 8 + 1] : zero;
        mma_chunk(d, wl, wh, xa, xb);
    }
#if DEPENDENT_LAUNCH
    asm volatile("griddepcontrol.launch_dependents;");
#endif
    __shared__ float part[WARPS][8][16];
    store_partials(part, warp, g, t, d);
    __syncthreads();
#if ACT
    for (int o = threadIdx.x; o < M * 8; o += WARPS * 32) {
        const int m = o >> 3, r = o & 7;
        float gate = 0.f, up = 0.f;
        #pragma unroll
        for (int i = 0; i < WARPS; ++i) { gate += part[i][m][r]; up += part[i][m][r + 8]; }
        gate = round_bf16(round_bf16(gate) * bf16_to_float(s_lo[row0 + r]));
        up = round_bf16(round_bf16(up) * bf16_to_float(s_hi[row0 + r]));
        y[(size_t)m * N + row0 + r] = float_to_bf16(round_bf16(activation(gate)) * up);
    }
#else
    for (int o = threadIdx.x; o < M * 16; o += WARPS * 32) {
        const int m = o >> 4, r = o & 15;
        float s = 0.f;
        #pragma unroll
        for (int i = 0; i < WARPS; ++i) s += part[i][m][r];
        y[(size_t)m * N + row0 + r] = float_to_bf16(round_bf16(s) * bf16_to_float(s_lo[row0 + r]));
    }
#endif
}
"""


def takes(x2: torch.Tensor) -> bool:
    """Whether the engine sends these activations to the kernel: 2 to ``MAX_ROWS`` rows of bf16
    (one row stays on Inductor's fused GEMV, which was faster in the step)."""
    return 1 < x2.shape[0] <= MAX_ROWS and x2.dtype == torch.bfloat16


def fits(out_features: int, in_features: int) -> bool:
    """Whether the kernel takes an [N, K] weight: whole 16-row tiles, whole 64-input chunks."""
    return out_features % 16 == 0 and in_features % CHUNK == 0


def warps_for(in_features: int) -> int:
    """Warps per block: the most that split the inputs in whole chunks. On the 8B decode shapes 16
    warps ran fastest, or within 1.1 us a call, of 4, 8 and 16 (H100: int8_gemv_probe)."""
    return max(w for w in WARP_CHOICES if in_features % (w * CHUNK) == 0)


def _compiled(warps: int, act: int = 0, unroll: int = UNROLL, dependent: bool | None = None):
    if dependent is None:
        dependent = dependent_launch(torch.cuda.current_device())
    return nvrtc.compile_kernel(SOURCE, "int8_gemv", WARPS=warps, ACT=act, UNROLL=unroll,
                                DEPENDENT_LAUNCH=int(dependent), PREFETCH_CHUNKS=PREFETCH_CHUNKS)


def unavailable_reason(device: torch.device, out_features: int, in_features: int) -> str | None:
    """None when the kernel runs this weight on ``device`` (compiling it now, outside any CUDA
    graph capture), else why not."""
    if device.type != "cuda":
        return f"the kernel runs on CUDA, not on {device.type}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "the kernel needs bf16 tensor cores (sm_80 or newer)"
    if not fits(out_features, in_features):
        return f"a [{out_features}, {in_features}] weight does not fit its 16-row, 64-input tiles"
    try:
        with torch.cuda.device(device):
            _compiled(warps_for(in_features))
    except Exception as err:  # NVRTC or the CUDA headers missing: the caller keeps its other paths
        return f"NVRTC could not compile it ({err})"
    return None


def _gemv(x2: torch.Tensor, w_lo: torch.Tensor, w_hi: torch.Tensor, s_lo: torch.Tensor, s_hi: torch.Tensor,
          tiles: int, out_features: int, act: int, op: str) -> torch.Tensor:
    if x2.dtype != torch.bfloat16:
        raise TypeError(f"{op} takes bf16 activations, got {x2.dtype}")
    M, K = x2.shape
    warps = warps_for(K)
    dependent = dependent_launch(x2.device.index)
    kernel = _compiled(warps, act, dependent=dependent)
    y = x2.new_empty(M, out_features)
    launch_by_rows(kernel, tiles, warps * 32, (w_lo, w_hi, s_lo, s_hi), x2.contiguous(), y, out_features, dependent)
    return y


@torch.library.custom_op("nbtrt::int8_mm", mutates_args=())
def int8_mm(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x2 [M, K]`` (bf16) times the int8 ``weight [N, K]`` (contiguous) with per-row ``scale [N]``
    (bf16) -> ``[M, N]`` bf16. One launch per 8 rows."""
    N, K = weight.shape
    return _gemv(x2, weight, weight[8:], scale, scale[8:], N // 16, N, 0, "nbtrt::int8_mm")


@int8_mm.register_fake
def _(x2, weight, scale):
    return x2.new_empty(x2.shape[0], weight.shape[0])


@torch.library.custom_op("nbtrt::int8_gated_mm", mutates_args=())
def int8_gated_mm(x2: torch.Tensor, gate: torch.Tensor, gate_scale: torch.Tensor, up: torch.Tensor,
                  up_scale: torch.Tensor, activation: str) -> torch.Tensor:
    """A gated MLP's input in one launch: ``act(x2 @ gate^T * gate_scale) * (x2 @ up^T * up_scale)``,
    ``[M, I]`` bf16, from the int8 ``gate`` and ``up`` weights ``[I, K]`` as stored."""
    I = gate.shape[0]
    return _gemv(x2, gate, up, gate_scale, up_scale, I // 8, I, ACTIVATION_CODES[activation], "nbtrt::int8_gated_mm")


@int8_gated_mm.register_fake
def _(x2, gate, gate_scale, up, up_scale, activation):
    return x2.new_empty(x2.shape[0], gate.shape[0])
