"""INT4 weight-only matmul of a few rows (decode, short prompts) on CUDA: one hand-written kernel
that dequantizes into the tensor cores' operands, compiled at run time by NVRTC through PyTorch's
``torch.cuda._compile_kernel``.

Why: a decode step streams every weight once, so its time is the weight bytes. tinygemm, PyTorch's
INT4 kernel, reached 1.3-1.95 TB/s on an H100 with the 8B model's shapes (3.0 TB/s copy), and its
time grows with the rows. In the 8B model's batch-1 decode step on an H100 this kernel's 161 calls
took 1.88 ms against tinygemm's 2.37 ms; with gate and up as one, 129 calls take 1.65 ms. At
batch 8 the step takes 2.8 ms against 6.1 ms (README, "INT4 on nbtrt's own kernel"). It is laid
out Marlin-style:

- each warp multiplies a 16-row tile of the weight with ``mma.m16n8k16`` (bf16 in, fp32 out); the
  activations are the 8 columns of the B operand, so 1 to 8 rows cost the same (more rows: one
  launch per 8);
- the weight is stored pre-shuffled (:func:`pack`): a lane's 16-byte load holds exactly the nibbles
  of its A fragments for four k-steps, and its 32 bytes of activations are contiguous;
- a nibble ``u = q + 8`` becomes the bf16 ``128 + u`` by one AND-OR with 0x4300 (no int-to-float
  conversion), and one packed FMA subtracts 136, exactly;
- a group's products accumulate in fp32 and are scaled once; the warps of a block split the inputs
  and add up through shared memory.

Registered as the custom op ``nbtrt::int4_mm``, so compiled graphs call it and CUDA graphs
capture it; ``nbtrt::int4_gated_mm`` is a gated MLP's input, gate and up rows interleaved by 8
(:func:`interleave_gate_up`) and the activation applied before the write;
``nbtrt::int4_dequantize`` writes the bf16 weight for a long prefill's cuBLAS call.
Where NVRTC cannot compile them (no GPU of sm_80 or newer, no CUDA headers), the caller keeps
tinygemm.

>>> y = torch.ops.nbtrt.int4_mm(x2, pack(u), scale.t().contiguous(), 128)  # doctest: +SKIP
"""
from __future__ import annotations

import functools

import torch

from . import nvrtc

MAX_ROWS = 8  # the B operand's columns
CHUNK = 64  # inputs per lane load: four k-steps of 16
WARP_CHOICES = (16, 8, 4, 2, 1)  # warps per block
WARPS_PER_GPU = 4096  # split the inputs over more warps only up to this many in the grid
UNROLL = 1  # groups a warp's loop unrolls: under the kernel's bounds 2-8 saved 0.5 us at best (int4_regs_probe)
PREFETCH_CHUNKS = 4  # chunks a warp sends to L2 before it waits on the kernel before it (dependent launch)

HELPERS = r"""
typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ u32 nibbles_to_bf16x2(u32 w) {
    // bits 0-3 and 16-19 hold u = q + 8; as the mantissa of 128.0 they read 128 + u, exactly
    u32 v = (w & 0x000F000Fu) | 0x43004300u, out;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(out) : "r"(v), "r"(0x3F803F80u), "r"(0xC308C308u));  // v * 1 - 136
    return out;
}

// d += A B: A fragments a0-a3 (rows g, g + 8; inputs 2t, 2t + 8 of the k-step), B fragments b0-b1
__device__ __forceinline__ void mma_bf16(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_word(float* d, u32 w, u32 b0, u32 b1) {
    mma_bf16(d, nibbles_to_bf16x2(w), nibbles_to_bf16x2(w >> 4), nibbles_to_bf16x2(w >> 8),
             nibbles_to_bf16x2(w >> 12), b0, b1);
}

// a warp's mma accumulators into its block's partial sums [warp][activation row][weight row of the tile]
__device__ __forceinline__ void store_partials(float (*part)[8][16], int warp, int g, int t, const float* d) {
    part[warp][2 * t][g] = d[0];
    part[warp][2 * t + 1][g] = d[1];
    part[warp][2 * t][g + 8] = d[2];
    part[warp][2 * t + 1][g + 8] = d[3];
}

__device__ __forceinline__ float bf16_to_float(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ u16 float_to_bf16(float f) {  // round to nearest even
    u32 b = __float_as_uint(f);
    return (u16)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

__device__ __forceinline__ float activation(float x) {  // ACT: 1 silu, 2 gelu (erf), 3 gelu (tanh)
#if ACT == 1
    return x / (1.f + expf(-x));
#elif ACT == 2
    return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
#else
    return 0.5f * x * (1.f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
#endif
}

// The weight is read once a step: evict-first loads leave the L2 to the activations and scales.
#define LOAD_WEIGHT(p) __ldcs(p)

"""

SOURCE = HELPERS + r"""
// y[M, N] = x[M, K] @ W^T, W int4 [N, K] pre-shuffled by nbtrt's pack(), scales [K / GROUP, N].
// The bounds' minimum of one block an SM lets the compiler schedule for latency, not occupancy.
// With it, evict-first loads and no unroll, each call on the 8B decode shapes took 8-13 % less
// time than with the thread count alone, plain loads and 4 groups unrolled (H100;
// benchmarks/experiments/int4_regs_probe.py, int4_loads_ab.py).
extern "C" __global__ void __launch_bounds__(WARPS * 32, 1)
int4_gemv(const uint4* __restrict__ w, const u16* __restrict__ scales, const u16* __restrict__ x,
          u16* __restrict__ y, int M, int N, int K) {
    const int CPG = GROUP / 64;  // chunks per group
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int chunks = K / 64, per_warp = chunks / WARPS, first = warp * per_warp, tile = blockIdx.x;
    const uint4* wp = w + ((size_t)tile * chunks + first) * 32 + lane;
    const bool live = g < M;  // B column g is activation row g
    const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)(live ? g : 0) * K + first * 64 + 16 * t);
    const u16* sp = scales + (size_t)(first / CPG) * N + tile * 16 + g;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#if DEPENDENT_LAUNCH
    // launched while the kernel before it finishes: the weight and scales are constants, so the
    // first chunks head for the L2 now; x and y are that kernel's, so touch them only after it ends
    for (int c = 0; c < per_warp && c < PREFETCH_CHUNKS; ++c)
        asm volatile("prefetch.global.L2 [%0];" :: "l"(wp + c * 32));
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    #pragma unroll UNROLL
    for (int c = 0; c < per_warp; c += CPG) {
        float d[4] = {0.f, 0.f, 0.f, 0.f};
        #pragma unroll
        for (int i = 0; i < CPG; ++i) {
            const uint4 q = LOAD_WEIGHT(wp + (c + i) * 32);
            const uint4 xa = live ? xp[(c + i) * 8] : zero, xb = live ? xp[(c + i) * 8 + 1] : zero;
            mma_word(d, q.x, xa.x, xa.y);
            mma_word(d, q.y, xa.z, xa.w);
            mma_word(d, q.z, xb.x, xb.y);
            mma_word(d, q.w, xb.z, xb.w);
        }
        const float s_lo = bf16_to_float(sp[0]), s_hi = bf16_to_float(sp[8]);
        sp += N;
        acc[0] += d[0] * s_lo; acc[1] += d[1] * s_lo; acc[2] += d[2] * s_hi; acc[3] += d[3] * s_hi;
    }
#if DEPENDENT_LAUNCH
    asm volatile("griddepcontrol.launch_dependents;");  // the next kernel may start its launch
#endif
    __shared__ float part[WARPS][8][16];
    store_partials(part, warp, g, t, acc);
    __syncthreads();
#if ACT
    // a gated MLP's input: tile rows 0-7 are gate rows, 8-15 the up rows of the same 8 outputs;
    // y [M, N / 2] = act(gate) * up, rounded to bf16 at each step as the unfused ops round
    for (int o = threadIdx.x; o < M * 8; o += WARPS * 32) {
        const int m = o >> 3, r = o & 7;
        float gate = 0.f, up = 0.f;
        #pragma unroll
        for (int i = 0; i < WARPS; ++i) { gate += part[i][m][r]; up += part[i][m][r + 8]; }
        const float a = round_bf16(activation(round_bf16(gate)));
        y[(size_t)m * (N / 2) + tile * 8 + r] = float_to_bf16(a * round_bf16(up));
    }
#else
    for (int o = threadIdx.x; o < M * 16; o += WARPS * 32) {
        const int m = o >> 4, r = o & 15;
        float s = 0.f;
        #pragma unroll
        for (int i = 0; i < WARPS; ++i) s += part[i][m][r];
        y[(size_t)m * N + tile * 16 + r] = float_to_bf16(s);
    }
#endif
}

// the bf16 weight [N, K] (a prefill's cuBLAS operand): one thread per 16-byte load of int4_gemv,
// which holds 16 inputs of weight rows g and g + 8; each is written as 32 contiguous bytes
extern "C" __global__ void int4_dequant(const uint4* __restrict__ w, const u16* __restrict__ scales,
                                        uint4* __restrict__ out, int N, int K) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    const int chunks = K / 64;
    if (i >= (long)(N / 16) * chunks * 32) return;
    const int lane = i & 31, g = lane >> 2, t = lane & 3, chunk = (i >> 5) % chunks, tile = (i >> 5) / chunks;
    const int row = tile * 16 + g, k0 = chunk * 64 + 16 * t;
    const uint4 q = w[i];
    const u32 words[4] = {q.x, q.y, q.z, q.w};
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float s = bf16_to_float(scales[(size_t)(k0 / GROUP) * N + row + 8 * h]);
        u32 pairs[8];  // inputs k0 + 4j + 2p + e sit at nibble 4e + 2p + h of word j
        #pragma unroll
        for (int j = 0; j < 4; ++j)
            #pragma unroll
            for (int p = 0; p < 2; ++p) {
                const float lo = (float)((int)((words[j] >> (4 * (2 * p + h))) & 0xFu) - 8) * s;
                const float hi = (float)((int)((words[j] >> (4 * (4 + 2 * p + h))) & 0xFu) - 8) * s;
                pairs[2 * j + p] = (u32)float_to_bf16(lo) | ((u32)float_to_bf16(hi) << 16);
            }
        uint4* dst = out + ((size_t)(row + 8 * h) * K + k0) / 8;
        dst[0] = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
        dst[1] = make_uint4(pairs[4], pairs[5], pairs[6], pairs[7]);
    }
}
"""


def fits(out_features: int, in_features: int, group: int) -> bool:
    """Whether the kernel takes an [N, K] weight: N whole 16-row tiles, K whole groups of a
    multiple of 64 inputs."""
    return out_features % 16 == 0 and group % CHUNK == 0 and in_features % group == 0


def warps_for(out_features: int, in_features: int, group: int) -> int:
    """Warps per block: each takes whole groups of the inputs. Few output tiles (o, down) split
    the inputs over more warps, so the GPU holds enough loads in flight; many tiles keep 4 or fewer
    (chosen on an H100 over the 8B shapes: benchmarks/results/gpu_int4-kernel_*)."""
    tiles = out_features // 16
    return max(w for w in WARP_CHOICES if in_features % (w * group) == 0 and (w <= 4 or tiles * w <= WARPS_PER_GPU))


ACTIVATION_CODES = {"silu": 1, "gelu": 2, "gelu_tanh": 3}  # the kernel's ACT: a gated MLP's, in its epilogue


@functools.cache
def dependent_launch(device_index: int) -> bool:
    """Whether the GEMV is launched as a programmatic dependent launch on this GPU (sm_90 or newer:
    ``griddepcontrol``). With Inductor's decode kernels launched the same way (``TorchEngine``), the
    8B INT4 decode took 2.15-2.18 ms a token against 2.32-2.35 ms, or 2.28 ms after an INT8 engine
    in the same process (H100, ``benchmarks/results/gpu_pdl_*``)."""
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def _compiled(warps: int, group: int, unroll: int = UNROLL, name: str = "int4_gemv", act: int = 0,
              dependent: bool | None = None):
    # dependent: with griddepcontrol, as a kernel launched dependent must be (default: whether the
    # current GPU launches it so)
    if dependent is None:
        dependent = dependent_launch(torch.cuda.current_device())
    return nvrtc.compile_kernel(SOURCE, name, WARPS=warps, GROUP=group, UNROLL=unroll, ACT=act,
                                DEPENDENT_LAUNCH=int(dependent), PREFETCH_CHUNKS=PREFETCH_CHUNKS)


def unavailable_reason(device: torch.device, out_features: int, in_features: int, group: int) -> str | None:
    """None when the kernel runs this weight on ``device`` (compiling it now, outside any CUDA
    graph capture), else why not."""
    if device.type != "cuda":
        return f"the kernel runs on CUDA, not on {device.type}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "the kernel needs bf16 tensor cores (sm_80 or newer)"
    if not fits(out_features, in_features, group):
        return f"a [{out_features}, {in_features}] weight in groups of {group} does not fit its tiles"
    try:
        with torch.cuda.device(device):
            _compiled(warps_for(out_features, in_features, group), group)
            _compiled(1, group, name="int4_dequant")
    except Exception as err:  # NVRTC or the CUDA headers missing: the caller keeps tinygemm
        return f"NVRTC could not compile it ({err})"
    return None


def pack(u: torch.Tensor, rows_per_step: int = 1024) -> torch.Tensor:
    """The nibbles ``u = q + 8`` (ints in [0, 15], [N, K]) -> the kernel's int32 words.

    Word ``((tile * K/64 + chunk) * 32 + lane) * 4 + j`` holds lane ``(g, t) = divmod(lane, 4)``'s
    A fragments of k-step j: weight rows ``16 tile + {g, g + 8}`` (h = 0, 1), inputs
    ``64 chunk + 16 t + 4 j + 2 p + e``, at nibble ``4 e + 2 p + h``. Done in slices of rows so an
    lm_head does not need a 64-bit copy of itself.
    """
    N, K = u.shape
    shifts = torch.arange(0, 32, 4, device=u.device, dtype=torch.int64)
    out = []
    for start in range(0, N, rows_per_step):
        v = u[start:start + rows_per_step].to(torch.int64)
        v = v.view(-1, 2, 8, K // 64, 4, 4, 2, 2)  # tile, h, g, chunk, t, j, p, e
        v = v.permute(0, 3, 2, 4, 5, 7, 6, 1).reshape(-1, 8)  # tile, chunk, g, t, j | e, p, h
        words = (v << shifts).sum(-1)
        out.append(torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))
    return torch.cat(out)


def unpack(words: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the nibbles [N, K] (int32), in torch ops, as the layout's
    reference (the engine dequantizes with ``nbtrt::int4_dequantize``)."""
    N, K = out_features, in_features
    n = torch.arange(N, device=words.device, dtype=torch.int32)[:, None]
    k = torch.arange(K, device=words.device, dtype=torch.int32)[None, :]
    lane = n % 8 * 4 + k % 64 // 16
    index = ((n // 16 * (K // 64) + k // 64) * 32 + lane) * 4 + k % 16 // 4
    shift = 4 * (k % 2 * 4 + k % 4 // 2 * 2 + n % 16 // 8)
    return (words[index] >> shift) & 0xF


def _gemv(x2: torch.Tensor, words: torch.Tensor, scales_t: torch.Tensor, group: int, act: int, op: str) -> torch.Tensor:
    if x2.dtype != torch.bfloat16:
        raise TypeError(f"{op} takes bf16 activations, got {x2.dtype}")
    M, K = x2.shape
    N = scales_t.shape[1]
    warps = warps_for(N, K, group)
    dependent = dependent_launch(x2.device.index)
    kernel = _compiled(warps, group, act=act, dependent=dependent)
    y = x2.new_empty(M, N // 2 if act else N)
    launch_by_rows(kernel, N // 16, warps * 32, (words, scales_t), x2.contiguous(), y, N, dependent)
    return y


def launch_by_rows(kernel, blocks: int, threads: int, weights: tuple, x2: torch.Tensor, y: torch.Tensor,
                   out_features: int, dependent: bool) -> None:
    """One launch of a GEMV kernel (this module's or :mod:`cuda_int8`'s) per ``MAX_ROWS`` rows of
    ``x2``, into the same rows of ``y``: arguments ``*weights, x rows, y rows, rows, N, K``."""
    M, K = x2.shape
    for start in range(0, M, MAX_ROWS):
        rows = min(MAX_ROWS, M - start)
        nvrtc.launch(kernel, blocks, threads, *weights, x2[start:start + rows], y[start:start + rows],
                     rows, out_features, K, dependent=dependent)


@torch.library.custom_op("nbtrt::int4_mm", mutates_args=())
def int4_mm(x2: torch.Tensor, words: torch.Tensor, scales_t: torch.Tensor, group: int) -> torch.Tensor:
    """``x2 [M, K]`` (bf16) times the packed int4 weight (:func:`pack`) -> ``[M, N]`` bf16;
    ``scales_t`` is the per-group scale transposed, ``[K / group, N]`` bf16. One launch per 8 rows."""
    return _gemv(x2, words, scales_t, group, 0, "nbtrt::int4_mm")


@int4_mm.register_fake
def _(x2, words, scales_t, group):
    return x2.new_empty(x2.shape[0], scales_t.shape[1])


@torch.library.custom_op("nbtrt::int4_gated_mm", mutates_args=())
def int4_gated_mm(x2: torch.Tensor, words: torch.Tensor, scales_t: torch.Tensor, group: int,
                  activation: str) -> torch.Tensor:
    """A gated MLP's input in one launch: ``act(x2 @ gate^T) * (x2 @ up^T)``, ``[M, N / 2]`` bf16,
    from the weight :func:`interleave_gate_up` made (gate and up rows alternating by 8)."""
    return _gemv(x2, words, scales_t, group, ACTIVATION_CODES[activation], "nbtrt::int4_gated_mm")


@int4_gated_mm.register_fake
def _(x2, words, scales_t, group, activation):
    return x2.new_empty(x2.shape[0], scales_t.shape[1] // 2)


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Rows of ``gate`` and ``up`` (``[I, ...]`` each) alternating in blocks of 8 -> ``[2 I, ...]``:
    each 16-row tile of the kernel then holds the gate and up rows of the same 8 outputs, so its
    epilogue applies the activation. Works on nibbles [I, K] and on transposed scales alike
    (``interleave_gate_up(g.t(), u.t()).t()``)."""
    I = gate.shape[0]
    return torch.stack([gate.reshape(I // 8, 8, -1), up.reshape(I // 8, 8, -1)], 1).reshape(2 * I, *gate.shape[1:])


@torch.library.custom_op("nbtrt::int4_dequantize", mutates_args=())
def int4_dequantize(words: torch.Tensor, scales_t: torch.Tensor, group: int) -> torch.Tensor:
    """The bf16 weight ``[N, K]`` of the packed words, ``bf16(q * scale)`` as the checkpoint's
    reference computes it: the operand of a prefill's one cuBLAS matmul. (The same in torch ops,
    :func:`unpack` then a multiply, which Inductor fused into one kernel, made the 8B model's
    128-token INT4 prefill take 28.2-28.6 ms on an H200; this kernel, 24.4-26.3 ms.)"""
    N = scales_t.shape[1]
    K = words.numel() * 8 // N
    out = scales_t.new_empty(N, K)
    threads = N * K // 32
    nvrtc.launch(_compiled(1, group, name="int4_dequant"), (threads + 255) // 256, 256, words, scales_t, out, N, K)
    return out


@int4_dequantize.register_fake
def _(words, scales_t, group):
    N = scales_t.shape[1]
    return scales_t.new_empty(N, words.numel() * 8 // N)
