"""The PyTorch engine: the nbtrt decoder with a static KV cache, eager or compiled.

Compiled (the default on CUDA), gpt-fast style but *regional*:

- each decoder block goes through ``torch.compile`` (Inductor) once and that one graph serves
  every layer, so compile time does not grow with depth;
- prefill has a dynamic sequence length and attends over the filled cache slots only (an
  unpadded prefill with no past runs plain causal attention: no [T, T] mask to build);
- opt-in (``graph_prefill=True`` at load), a causal prompt of up to ``GRAPH_PREFILL_TOKENS``
  is padded to a bucketed length and prefilled by one CUDA graph replay (first token off the host);
- decode has static shapes and the whole step is captured in one CUDA graph per batch size,
  so a token costs one graph replay instead of hundreds of kernel launches; on Hopper its
  kernels are programmatic dependent launches, each starting as the one before it ends, and its
  attention is nbtrt's flash-decoding kernels (``triton_attention``);
- quantized linears (INT8 / INT4 weight-only, FP8, W8A8; from an nbtrt.quantize checkpoint or
  quantized at load) replace ``nn.Linear`` in place and run through PyTorch's own kernels
  (tinygemm, ``_scaled_mm``, ``_int_mm``) or nbtrt's own; for the batch-1 decode GEMV Inductor
  fuses the INT8 dequantization into the reduction (``coordinate_descent_tuning`` turns ``mm``
  with M=1 into one), INT8 with 2-8 rows and INT4 with a few rows take CUDA kernels compiled by
  NVRTC (``cuda_int8``, ``cuda_int4``; a gated MLP's gate and up become one ``Int8GatedInput`` /
  ``Int4GatedInput`` on them), INT8 with more rows a Triton kernel (``triton_int8``), INT4 of
  ``MANY_ROWS`` to ``INT4_TRITON_MAX_ROWS`` rows (a short prefill) a Triton kernel that reads the
  packed weight (``triton_int4``), and weight-only calls of more rows dequantize inside the
  graph, then call cuBLAS.

Inductor tunes every kernel it generates the first time it runs; on CUDA the engine has it time
them as the graph runs them, without the host's launch (``inductor_timing``). Inductor's on-disk
cache (FX graph cache) makes a reload compile in seconds. Capture (the debugger) runs the same
modules eagerly through forward hooks.

>>> engine = nbtrt.load(nbtrt.build(ckpt, "work/engine", backend="torch", quant="int8_wo"))  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._io import link_or_copy
from ..checkpoint import WEIGHTS
from ..config import check_dtype
from ..engine import Engine, EngineLimits, register_backend
from ..generate import GenerationError
from ..model import ACTIVATIONS, TORCH_DTYPES, Decoder, StaticKVCache, dense_attention, positions_from_mask
from . import cuda_int4, cuda_int8, inductor_timing, triton_attention, triton_int4, triton_int8

# From this many rows (tokens of all sequences in one call) weight-only linears on CUDA dequantize
# the weight and call cuBLAS; fewer take nbtrt's INT4 kernel (or tinygemm), nbtrt's INT8 kernel
# (2-8 rows) or the Triton INT8 kernel. Measured on an H100, 8B config: README, "Quantized linears by rows".
MANY_ROWS = 64
# INT4 calls of MANY_ROWS up to this many rows take the Triton kernel that reads the packed weight
# (triton_int4), more dequantize it for cuBLAS. On an H100 the 8B shapes' 128-row calls took the
# same GPU time either way within 0.85-1.25x, 512 rows 1.5-2.6x as long in Triton, and the kernel
# saves the host the dequantization op's call (a short prefill is bound by the host).
INT4_TRITON_MAX_ROWS = 128
DYNAMO_RECOMPILE_LIMIT = 64  # every engine in a process shares the compiled functions' caches
# renamed from cache_size_limit in recent PyTorch
_LIMIT_KEY = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
# Every attention backend but cuDNN's, which builds a plan for each new sequence length: on an H100
# a prompt of a length not seen before took 56-277 ms to prefill (qwen2.5-0.5b config), against
# 9-12 ms for any length without it (README, "The first token").
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# With graphed prefills on, prompts up to this many tokens a sequence prefill through a CUDA graph
# (past it the GPU's time hides the host's): a compiled prefill launches ~30 kernels a layer from
# Python, and the 8B config's 128-token prefill took 13-35 ms of host time for 7-14 ms of kernels
# (README, "Graphed prefills").
GRAPH_PREFILL_TOKENS = 512


def _pick_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ------------------------------------------------------------------------------ quantized linears
# A quantized checkpoint (layout: nbtrt.quantize.formats) loads into reference QuantLinear modules
# that dequantize on every call. The classes below take the same stored tensors and lay them out for
# PyTorch's own kernels; on-the-fly quantization of float weights (``quant=``) goes through the
# same quantizers and the same classes. One difference: ``quant=`` takes every linear, lm_head
# included, where nbtrt.quantize keeps lm_head in high precision unless asked.
@torch.library.custom_op("nbtrt::realize", mutates_args=())
def _realize(x: torch.Tensor) -> torch.Tensor:
    """A copy Inductor cannot see through, so that ``x`` is computed once into memory."""
    return x.clone()


@_realize.register_fake
def _(x):
    return torch.empty_like(x)


class Int8WeightOnlyLinear(nn.Module):
    """int8 weight [out, in] x per-channel scale; activations stay in the model dtype (W8A16).
    Where it runs:

    - one row (batch-1 decode), compiled: Inductor fuses the dequantization into the GEMV
      reduction (8B decode step on an H100: 3.52-3.62 ms, against 4.01 ms with nbtrt's kernel
      for every linear; ``gpu_int8-kernel_*``);
    - 2 to 8 rows on CUDA in bf16 (batched decode): nbtrt's kernel on the stored weight
      (:mod:`nbtrt.backends.cuda_int8`); ``gemv_unavailable`` says why not where it cannot run;
    - more rows, or where it cannot run, below ``MANY_ROWS`` on CUDA: one Triton kernel that reads
      the int8 weight once (:mod:`nbtrt.backends.triton_int8`);
    - ``MANY_ROWS`` rows and more (prefill), compiled: the weight is dequantized and scaled in one
      fused pass, then one cuBLAS matmul (written as ``linear(x, w) * scale``, the many-row product
      was lowered by Inductor to a kernel that ran 2 s per 128-token prefill of an 8B model on an
      H200, measured). Eager, where nothing fuses, scaling the product instead saves a pass over
      the weight."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", weight_scale.to(dtype))
        self.bias = bias
        self.realize_input = False  # True: the one-row input is computed into memory first (_realize_down_inputs)
        self.gemv_unavailable = (cuda_int8.unavailable_reason(weight.device, *weight.shape) if dtype == torch.bfloat16
                                 else f"the kernel takes bf16 activations, not {dtype}")
        self.gemv = self.gemv_unavailable is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] == 1:
            if self.realize_input:
                x2 = torch.ops.nbtrt.realize(x2)
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scale
        elif self.gemv and cuda_int8.takes(x2):
            y = torch.ops.nbtrt.int8_mm(x2, self.weight, self.scale)
        elif x2.shape[0] < MANY_ROWS and triton_int8.takes(x2, self.weight):
            y = torch.ops.nbtrt.int8_weight_mm(x2, self.weight, self.scale)
        elif torch.compiler.is_compiling():
            y = F.linear(x2, self.weight.to(x.dtype) * self.scale[:, None])
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scale
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class Int8GatedInput(nn.Module):
    """A gated MLP's two INT8 projections and its activation as one module, ``act(gate(x)) * up(x)``:
    2 to 8 rows, one launch of nbtrt's INT8 kernel reads both stored weights and applies the
    activation before it writes; other row counts run the two linears (one row: Inductor fuses
    them into one GEMV kernel).

    >>> mlp.gate_input = Int8GatedInput(mlp.gate, mlp.up, "silu")  # what the engine does  # doctest: +SKIP
    """

    def __init__(self, gate: Int8WeightOnlyLinear, up: Int8WeightOnlyLinear, activation: str):
        super().__init__()
        self.gate, self.up, self.activation = gate, up, activation

    @staticmethod
    def takes(gate: nn.Module, up: nn.Module, activation: str) -> bool:
        """Whether ``gate`` and ``up`` fuse: both on nbtrt's INT8 kernel, alike, without biases."""
        return (isinstance(gate, Int8WeightOnlyLinear) and isinstance(up, Int8WeightOnlyLinear) and gate.gemv
                and up.gemv and gate.bias is None and up.bias is None and gate.weight.shape == up.weight.shape
                and activation in cuda_int8.ACTIVATION_CODES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if not cuda_int8.takes(x2):
            return ACTIVATIONS[self.activation](self.gate(x)) * self.up(x)
        h = torch.ops.nbtrt.int8_gated_mm(x2, self.gate.weight, self.gate.scale, self.up.weight, self.up.scale,
                                          self.activation)
        return h.reshape(*x.shape[:-1], -1)


def _pack_for_tinygemm(u: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """uint values in [0, 15], [out, in] on CUDA -> tinygemm's packed int32 tiles (the kernel takes
    two values per byte, the even input index in the high nibble)."""
    return torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8), inner_k_tiles)


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 words -> their 8 nibbles (lowest first) in a new last dimension."""
    return (words.unsqueeze(-1) >> torch.arange(0, 32, 4, device=words.device, dtype=torch.int32)) & 0xF


@functools.cache
def tinygemm_tile_order(inner_k_tiles: int, device: str) -> torch.Tensor | None:
    """For each weight of one tinygemm tile (8 outputs x ``inner_k_tiles * 16`` inputs, row-major),
    the index of the nibble that holds it among ``_nibbles(packed)``; None when the packing is not
    tiled that way (prefills then stay on tinygemm).

    ``_convert_weight_to_int4pack``'s layout is not documented, so it is read off the kernel itself:
    probe tiles whose values spell out each weight's position, 4 bits at a time, are packed and
    their nibbles read back. A random matrix of two by two tiles then checks the result."""
    rows, cols = 8, inner_k_tiles * 16
    position = torch.arange(rows * cols, device=device).view(rows, cols)
    held = torch.zeros(rows * cols, dtype=torch.long, device=device)  # nibble -> the position it holds
    for digit in range((int(rows * cols - 1).bit_length() + 3) // 4):
        packed = _pack_for_tinygemm((position >> 4 * digit) & 0xF, inner_k_tiles)
        if packed.numel() * 8 != rows * cols:
            return None
        held |= _nibbles(packed).reshape(-1).long() << 4 * digit
    if not torch.equal(held.sort().values, position.view(-1)):
        return None
    order = held.argsort()  # the inverse permutation: position -> nibble
    u = torch.randint(0, 16, (2 * rows, 2 * cols), device=device, dtype=torch.int32)
    if not torch.equal(_unpack_tinygemm(_pack_for_tinygemm(u, inner_k_tiles), order, *u.shape), u):
        return None
    return order


def _unpack_tinygemm(packed: torch.Tensor, order: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """tinygemm's packed tiles -> the int32 values [out, in] in [0, 15] (see :func:`tinygemm_tile_order`)."""
    cols = order.numel() // 8
    tiles = _nibbles(packed).reshape(out_features // 8, in_features // cols, -1)[..., order]
    return tiles.view(out_features // 8, in_features // cols, 8, cols).transpose(1, 2).reshape(out_features, in_features)


class Int4WeightOnlyLinear(nn.Module):
    """int4 weight (signed, per-group scale, no zero point); AWQ checkpoints also scale the input
    by ``pre_quant_scale``. Where it runs:

    - on CUDA, fewer than ``MANY_ROWS`` rows (decode, short prompts): nbtrt's own kernel
      (:mod:`nbtrt.backends.cuda_int4`, the weight pre-shuffled for it), or tinygemm
      (``aten._weight_int4pack_mm``, which computes ``(u - 8) * scale + zero`` with u = q + 8 and
      zero = 0) where that kernel cannot run; ``mma_unavailable`` says why;
    - on CUDA with nbtrt's kernel's layout, ``MANY_ROWS`` to ``INT4_TRITON_MAX_ROWS`` rows: the
      Triton kernel that reads that layout (:mod:`nbtrt.backends.triton_int4`);
    - on CUDA, more rows (with tinygemm, ``MANY_ROWS`` rows or more of a prefill): the weight
      dequantized to bf16, then one cuBLAS matmul (tinygemm's time grows with the rows: an 8B
      model's linears took 6.9 ms for one row, 65 ms for 128, 959 ms for 2048 on an H100);
    - on a CPU: tinygemm's CPU kernel."""

    GROUP_SIZES = (32, 64, 128, 256)

    def __init__(self, packed: torch.Tensor, weight_scale: torch.Tensor, group_size: int, bias: torch.Tensor | None,
                 dtype: torch.dtype, pre_quant_scale: torch.Tensor | None = None):
        super().__init__()
        from ..quantize.formats import unpack_int4

        N, K = packed.shape[0], packed.shape[1] * 2
        u = unpack_int4(packed).to(torch.int32) + 8
        self.mma_unavailable = cuda_int4.unavailable_reason(packed.device, N, K, group_size)
        self.mma = self.mma_unavailable is None
        order = None
        if self.mma:
            weight, scales = cuda_int4.pack(u), weight_scale.t().contiguous().to(torch.bfloat16)  # [in / g, out]
        else:
            tiles = self.inner_k_tiles(K, N, group_size)
            act = torch.bfloat16 if packed.is_cuda else dtype  # the CUDA kernel takes bf16 activations
            sz = torch.stack([weight_scale.float(), torch.zeros_like(weight_scale, dtype=torch.float32)], -1)
            scales = sz.transpose(0, 1).contiguous().to(act)  # scales and zeros [in / g, out, 2]
            if packed.is_cuda:
                weight, order = _pack_for_tinygemm(u, tiles), tinygemm_tile_order(tiles, str(packed.device))
            else:
                weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, tiles)
        self.register_buffer("packed", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("pre_quant_scale", None if pre_quant_scale is None else pre_quant_scale.to(dtype))
        self.register_buffer("tile_order", order, persistent=False)
        self.group_size, self.in_features, self.out_features, self.bias = group_size, K, N, bias

    @classmethod
    def inner_k_tiles(cls, in_features: int, out_features: int, group_size: int) -> int | None:
        """The tinygemm tiling for this shape, or None when the kernel cannot take it."""
        if group_size not in cls.GROUP_SIZES or in_features % group_size or out_features % 8:
            return None
        return next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), None)

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] in bf16, as the CUDA kernels compute it.

        >>> torch.testing.assert_close(x @ lin.dequantize().t(), lin(x))  # doctest: +SKIP
        """
        N, K, g = self.out_features, self.in_features, self.group_size
        if self.mma:
            return torch.ops.nbtrt.int4_dequantize(self.packed, self.scales, g)
        u = _unpack_tinygemm(self.packed, self.tile_order, N, K).view(N, K // g, g)
        scale, zero = self.scales.transpose(0, 1).unsqueeze(2).unbind(-1)  # [out, in / g, 1] each
        return ((u - 8).to(scale.dtype) * scale + zero).view(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        x2 = x.reshape(-1, self.in_features)
        many = x2.shape[0] >= MANY_ROWS
        prefill = many and x.dim() == 3 and x.shape[1] > 1  # tinygemm keeps many one-token rows (not measured)
        if not self.packed.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales.to(x.dtype))
        elif self.mma and not many:
            y = torch.ops.nbtrt.int4_mm(x2.to(torch.bfloat16), self.packed, self.scales, self.group_size).to(x.dtype)
        elif self.mma:
            y = _int4_many_rows(x2.to(torch.bfloat16), self.packed, self.scales, self.group_size).to(x.dtype)
        elif prefill and self.tile_order is not None:
            y = F.linear(x2.to(torch.bfloat16), self.dequantize()).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.packed, self.group_size,
                                                   self.scales).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def _int4_many_rows(x2: torch.Tensor, words: torch.Tensor, scales_t: torch.Tensor, group: int) -> torch.Tensor:
    """bf16 ``x2`` (``MANY_ROWS`` rows or more) times a weight in nbtrt's INT4 layout."""
    if x2.shape[0] <= INT4_TRITON_MAX_ROWS and triton_int4.takes(x2):
        return torch.ops.nbtrt.int4_weight_mm(x2, words, scales_t, group)
    return F.linear(x2, torch.ops.nbtrt.int4_dequantize(words, scales_t, group))


class Int4GatedInput(nn.Module):
    """A gated MLP's two INT4 projections and its activation as one module, ``act(gate(x)) * up(x)``,
    for nbtrt's INT4 kernel: one launch reads both weights (rows interleaved by
    :func:`cuda_int4.interleave_gate_up`) and applies the activation before it writes, where the
    unfused step took two launches and a third kernel for the activation. ``MANY_ROWS`` rows or
    more: one matmul of the interleaved weight (as :class:`Int4WeightOnlyLinear` chooses it), then
    the activation.

    >>> mlp.gate_input = Int4GatedInput(mlp.gate, mlp.up, "silu")  # what the engine does  # doctest: +SKIP
    """

    def __init__(self, gate: Int4WeightOnlyLinear, up: Int4WeightOnlyLinear, activation: str):
        super().__init__()
        I, K = gate.out_features, gate.in_features
        nibbles = cuda_int4.interleave_gate_up(cuda_int4.unpack(gate.packed, I, K), cuda_int4.unpack(up.packed, I, K))
        self.register_buffer("packed", cuda_int4.pack(nibbles))
        self.register_buffer("scales", cuda_int4.interleave_gate_up(gate.scales.t(), up.scales.t()).t().contiguous())
        self.register_buffer("pre_quant_scale", gate.pre_quant_scale)
        self.group_size, self.in_features, self.out_features, self.activation = gate.group_size, K, I, activation

    @staticmethod
    def takes(gate: nn.Module, up: nn.Module, activation: str) -> bool:
        """Whether ``gate`` and ``up`` fuse: both on nbtrt's INT4 kernel, alike, without biases."""
        if not (isinstance(gate, Int4WeightOnlyLinear) and isinstance(up, Int4WeightOnlyLinear)):
            return False
        a, b = gate.pre_quant_scale, up.pre_quant_scale  # AWQ: one input, so one scale for both
        same_input_scale = a is b or (a is not None and b is not None and torch.equal(a, b))
        return (gate.mma and up.mma and gate.bias is None and up.bias is None and gate.group_size == up.group_size
                and gate.packed.shape == up.packed.shape and activation in cuda_int4.ACTIVATION_CODES
                and same_input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        I = self.out_features
        if x2.shape[0] < MANY_ROWS:
            h = torch.ops.nbtrt.int4_gated_mm(x2, self.packed, self.scales, self.group_size, self.activation)
        else:
            both = _int4_many_rows(x2, self.packed, self.scales, self.group_size).view(-1, I // 8, 2, 8)
            h = ACTIVATIONS[self.activation](both[:, :, 0].reshape(-1, I)) * both[:, :, 1].reshape(-1, I)
        return h.to(x.dtype).reshape(*x.shape[:-1], I)


def _act_scale(x2: torch.Tensor, static: torch.Tensor | None, qmax: float) -> torch.Tensor:
    """The activation scale: calibrated per tensor, or per token at run time ([M, 1])."""
    if static is not None:
        return static
    return x2.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax


class FP8Linear(nn.Module):
    """float8 e4m3 weight and activations through ``torch._scaled_mm`` (Hopper / Ada on CUDA).
    Calibrated checkpoints: per-tensor scales (tensor-wise kernel). Without calibration: the
    activation scale per token (row-wise kernel, the weight scale broadcast over rows)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
                 bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight)
        ws = weight_scale.float()
        if input_scale is None:  # row-wise scaling wants [1, out]
            ws = ws.expand(1, weight.shape[0]).contiguous() if ws.dim() == 0 else ws.reshape(1, -1)
        self.register_buffer("weight_scale", ws)
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float())
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        xs = _act_scale(x2, self.input_scale, 448.0)
        xq = (x2 / xs).clamp(-448, 448).to(torch.float8_e4m3fn)
        if x.is_cuda:
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale, out_dtype=x.dtype)
        else:  # no fp8 units on a CPU (and older PyTorch has no row-wise _scaled_mm there): same math in fp32
            y = (xq.float() * xs) @ self.weight.float().t() * self.weight_scale
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class W8A8Linear(nn.Module):
    """int8 weight (per output channel) x int8 activations (per token at run time, or a calibrated
    per-tensor scale): ``torch._int_mm`` with int32 accumulation, as SmoothQuant runs."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
                 bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float())
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        xs = _act_scale(x2, self.input_scale, 127.0)
        xq = (x2 / xs).round().clamp(-127, 127).to(torch.int8)
        M = xq.shape[0]
        if x.is_cuda and M <= 16:  # cuBLASLt int8 needs more than 16 rows
            xq = F.pad(xq, (0, 0, 0, 17 - M))
        acc = torch._int_mm(xq, self.weight.t())[:M]
        y = (acc.float() * xs * self.weight_scale).to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def fast_linear(fmt: str, t: dict[str, torch.Tensor], bias: torch.Tensor | None, group_size: int,
                dtype: torch.dtype) -> nn.Module | None:
    """The kernel-backed module for one quantized linear stored in ``fmt``'s checkpoint layout
    (tensors ``t``: weight, weight_scale, maybe input_scale / pre_quant_scale), or None when
    PyTorch has no kernel for that shape."""
    bias = None if bias is None else bias.to(dtype)
    out, n = t["weight"].shape[0], t["weight"].shape[1] * (2 if fmt.startswith("int4") else 1)
    if fmt == "int8_wo":
        return Int8WeightOnlyLinear(t["weight"], t["weight_scale"], bias, dtype)
    if fmt in ("int4_wo", "int4_awq"):
        if Int4WeightOnlyLinear.inner_k_tiles(n, out, group_size) is None:
            return None
        return Int4WeightOnlyLinear(t["weight"], t["weight_scale"], group_size, bias, dtype, t.get("pre_quant_scale"))
    if fmt == "int8_sq":
        return W8A8Linear(t["weight"], t["weight_scale"], t.get("input_scale"), bias, dtype) if n % 8 == 0 == out % 8 else None
    if fmt == "fp8":
        return FP8Linear(t["weight"], t["weight_scale"], t.get("input_scale"), bias, dtype) if n % 16 == 0 == out % 16 else None
    raise ValueError(f"no fast kernel mapping for quantization format {fmt!r}")


# on-the-fly option -> (checkpoint layout it produces, activation dtypes the CUDA kernel needs)
QUANT_FORMATS: dict[str, tuple[str, tuple[torch.dtype, ...]]] = {
    "int8_wo": ("int8_wo", ()),
    "int4_wo": ("int4_wo", (torch.bfloat16,)),
    "fp8": ("fp8", (torch.bfloat16,)),
    "w8a8": ("int8_sq", ()),
}
INT4_GROUP_SIZES = (128, 64, 32)  # on-the-fly int4: the largest that divides the input size


def quant_unavailable(fmt: str, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """None when ``fmt`` runs on ``device`` with activations in ``dtype``, else the reason."""
    if fmt not in QUANT_FORMATS:
        return f"unknown format {fmt!r}; known: {sorted(QUANT_FORMATS)}"
    device = torch.device(device)
    if device.type != "cuda":
        return None
    needs = QUANT_FORMATS[fmt][1]
    if needs and dtype not in needs:
        return f"{fmt} on CUDA needs {[str(d).replace('torch.', '') for d in needs]} activations; build with dtype='bfloat16'"
    if fmt == "fp8" and torch.cuda.get_device_capability(device) < (8, 9):
        return "fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper)"
    return None


def quantize_linears(model: nn.Module, fmt: str) -> dict:
    """Quantize every ``nn.Linear`` of ``model`` in place, lm_head included, with nbtrt.quantize's
    round-to-nearest quantizers (no calibration: activation scales per token) and swap in the
    kernel-backed module under the same name, so capture and the debugger see the same tree.

    >>> report = quantize_linears(model, "int8_wo")  # doctest: +SKIP
    """
    from ..quantize.formats import quantize_weight

    layout = QUANT_FORMATS[fmt][0]

    def kernel_module(lin: nn.Linear) -> nn.Module | None:
        group = next((g for g in INT4_GROUP_SIZES if lin.in_features % g == 0), INT4_GROUP_SIZES[0])
        return fast_linear(layout, quantize_weight(lin.weight.detach(), layout, group), lin.bias, group,
                           lin.weight.dtype)

    return {"format": fmt, **_swap_in(model, lambda m: type(m) is nn.Linear, kernel_module)}


def accelerate_quantized(model: nn.Module, dtype: torch.dtype) -> dict:
    """Replace the reference QuantLinear modules of a quantized checkpoint by kernel-backed ones.
    Shapes no kernel takes keep the reference module (correct, slower) and are reported."""
    from ..quantize.formats import QuantLinear

    return {"format": "checkpoint", **_swap_in(
        model, lambda m: isinstance(m, QuantLinear),
        lambda q: fast_linear(q.fmt, dict(q.named_buffers(recurse=False)), q.bias, q.group_size, dtype))}


def _swap_in(model: nn.Module, selected: Callable[[nn.Module], bool],
             kernel_module: Callable[[nn.Module], nn.Module | None]) -> dict:
    """Replace each selected module by its kernel-backed one, under the same name; those without
    one (None: no kernel for that shape) stay, and are reported as kept."""
    done, kept = 0, []
    for name, module in [(n, m) for n, m in model.named_modules() if selected(m)]:
        fast = kernel_module(module)
        if fast is None:
            kept.append(name)
        else:
            model.set_submodule(name, fast)
            done += 1
    _realize_down_inputs(model)
    fused = _fuse_gate_up(model)
    return {"quantized": done, "kept": kept, **({"fused_gate_up": fused} if fused else {})}


def _realize_down_inputs(model: nn.Module) -> None:
    """An MLP's INT8 down projection reads ``silu(gate) * up`` from memory: fused into its GEMV,
    Inductor would recompute it for every output row (measured: 1.5 against 3 TB/s on an 8B model)."""
    from ..model import MLP

    for mlp in (m for m in model.modules() if isinstance(m, MLP)):
        if isinstance(mlp.down, Int8WeightOnlyLinear):
            mlp.down.realize_input = True


def _fuse_gate_up(model: nn.Module) -> int:
    """Each gated MLP whose gate and up projections both run nbtrt's INT4 (or INT8) kernel gets them
    as one :class:`Int4GatedInput` (:class:`Int8GatedInput`) as ``mlp.gate_input``. INT4 repacks
    their weights, so ``mlp.gate`` and ``mlp.up`` go; the INT8 module runs the two linears
    themselves, which stay under their names for capture's hooks. Returns how many."""
    from ..model import MLP

    fused = 0
    for mlp in (m for m in model.modules() if isinstance(m, MLP)):
        kinds = (Int4GatedInput, Int8GatedInput) if mlp.gated else ()
        kind = next((k for k in kinds if k.takes(mlp.gate, mlp.up, mlp.activation)), None)
        if kind is not None:
            mlp.gate_input = kind(mlp.gate, mlp.up, mlp.activation)
            if kind is Int4GatedInput:
                del mlp.gate, mlp.up
            fused += 1
    return fused


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step must read: every tensor except embedding tables
    (a step gathers a few rows), unless the table doubles as an unquantized lm_head."""
    skip = {id(t) for name, t in model.named_parameters(remove_duplicate=False) if name.startswith("embed.")}
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        skip.discard(id(head.weight))
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen and id(t) not in skip:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------ forward pieces
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


class _LayerKV:
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


def _prelude(model: Decoder, input_ids, attention_mask, cache_position, causal: bool = False):
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


def _head(model: Decoder, x):
    return model.lm_head(model.final_norm(x[:, -1:]))[:, -1]


# Two copies of each piece: torch.compile keeps one cache per code object, and prefill
# (dynamic length, attends over filled slots) and decode (static, full cache width) differ.
def _prefill_prelude(model, input_ids, attention_mask, cache_position, causal=False):
    return _prelude(model, input_ids, attention_mask, cache_position, causal)


def _prefill_block(block, x, rope, mask, k, v, cache_position):
    width = x.shape[1] if mask is None else mask.shape[-1]  # no mask: no past, just the new tokens
    return block(x, rope, mask, _LayerKV(k, v, width), cache_position)


def _prefill_head(model, x):
    return _head(model, x)


def _decode_prelude(model, input_ids, attention_mask, cache_position, causal=False):
    return _prelude(model, input_ids, attention_mask, cache_position, causal)


def _decode_block(block, x, rope, mask, k, v, cache_position):
    return block(x, rope, mask, _LayerKV(k, v, decode_attention=decode_attention), cache_position)


def _decode_head(model, x):
    return _head(model, x)


@contextlib.contextmanager
def _compiling(desc: str, enabled: bool = True):
    """A progress line around a step that may compile (first time only; Inductor caches it)."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=1, desc=desc, bar_format="{desc}: {elapsed}", leave=False)
    try:
        yield
        bar.update(1)
    finally:
        bar.close()


# ------------------------------------------------------------------------------ the engine
@register_backend
class TorchEngine(Engine):
    """The nbtrt decoder run by PyTorch with a static KV cache; compiled with CUDA graphs on GPU.

    Build options (recorded in engine.json, overridable at load): ``compile`` (True / False /
    "auto": on for CUDA), ``quant`` (None or one of :data:`QUANT_FORMATS`, applied to the float
    weights at load; a quantized checkpoint brings its own), ``dtype`` (cast the weights, e.g.
    "bfloat16"). Load only: ``graph_prefill`` (short causal prompts prefilled by CUDA graph
    replays: a first token sooner, decode a few percent slower; README, "Graphed prefills").

    >>> engine = nbtrt.load(nbtrt.build(ckpt, "work/e", backend="torch", dtype="bfloat16"))  # doctest: +SKIP
    >>> chat_engine = nbtrt.load("work/e", graph_prefill=True)  # doctest: +SKIP
    >>> engine = TorchEngine.from_decoder(model, max_seq_len=512)  # in memory, no files  # doctest: +SKIP
    """

    backend = "torch"

    @classmethod
    def _build_files(cls, ckpt_dir, out, cfg, limits, options):
        unknown = sorted(set(options) - {"compile", "quant", "dtype"})
        if unknown:
            raise ValueError(f"unknown torch build options {unknown}; known: compile, quant, dtype")
        if options.get("quant") and options["quant"] not in QUANT_FORMATS:
            raise ValueError(f"quant={options['quant']!r} is not one of {sorted(QUANT_FORMATS)}")
        check_dtype(options.get("dtype"))
        link_or_copy(ckpt_dir / WEIGHTS, out / WEIGHTS)
        link_or_copy(ckpt_dir / "config.json", out / "config.json")
        return dict(options)

    def __init__(self, engine_dir: Path, manifest: dict, device: str | None = None, dtype: str | None = None,
                 compile: bool | str | None = None, quant: str | None = None, warmup: bool = True,
                 model: Decoder | None = None, graph_prefill: bool = False):
        super().__init__(engine_dir, manifest)
        opts = manifest.get("options", {})
        self.device = _pick_device(device)
        self.queues_steps = self.device.type == "cuda"
        dtype = dtype or opts.get("dtype")
        if model is None:
            from ..model import load_decoder

            model = load_decoder(engine_dir, device=self.device, dtype=dtype)
        else:
            model = model.to(device=self.device, dtype=TORCH_DTYPES[dtype] if dtype else None)
        self.model = model.eval().requires_grad_(False)
        self.dtype = self.model.float_dtype
        self.quant = quant if quant is not None else opts.get("quant")
        self.quant_report = None
        if self.config.quantization:
            if self.quant:
                raise RuntimeError(f"{engine_dir} holds a quantized checkpoint ({self.config.quantization.get('format')}); "
                                   f"quant={self.quant!r} applies to float checkpoints only")
            self.quant = self.config.quantization.get("format")
            self.quant_report = accelerate_quantized(self.model, self.dtype)
        elif self.quant:
            reason = quant_unavailable(self.quant, self.device, self.dtype)
            if reason:
                raise RuntimeError(f"cannot load {engine_dir} with quant={self.quant!r}: {reason}")
            self.quant_report = quantize_linears(self.model, self.quant)
        flag = compile if compile is not None else opts.get("compile", "auto")
        self.compiled = self.device.type == "cuda" if flag in (None, "auto") else bool(flag)
        self.cache: StaticKVCache | None = None
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._past = 0
        self._static: dict[int, SimpleNamespace] = {}
        self._pool = None
        self._prefill_kinds: set[tuple] = set()  # (batch > 1, causal): the prefill graphs compiled so far
        self.causal_prefill = True  # False: every prefill takes the masked path (for comparison)
        # True: causal prefills at bucketed lengths through static buffers and, on CUDA, captured
        # graphs (prefill_bucket). Off by default: once a prefill graph is captured in a process,
        # the decode graph's dependent launches stop overlapping (README, "Graphed prefills")
        self.graph_prefill = graph_prefill
        self._prefill_static: dict[tuple[int, int], SimpleNamespace] = {}
        self._quiet = False  # inside warmup(), which shows one line for everything
        self.compile_seconds = 0.0
        eager = (_prelude, _prefill_block, _head)
        self._prefill_fns = self._decode_fns = eager
        if self.compiled:
            # M=1 matmuls become fused reductions (with any dequantization inlined) only with this on;
            # the prefill head is one row per sequence too
            options = {"coordinate_descent_tuning": True} if self.device.type == "cuda" else {}
            # Decode launches its kernels as programmatic dependent launches (sm_90+; Inductor leaves
            # them out elsewhere): each may start while the one before it ends. 8B config on an H100,
            # ms a token: bf16 5.72-5.74 -> 5.54-5.65; INT4 (its own kernel launched so too) 2.32-2.36
            # -> 2.15-2.18, or 2.28 after an INT8 engine in the same process (gpu_pdl_*). Not the
            # prefill, whose kernels run in many waves: with it the 2048-token prefill took 1.47-1.64x
            # its floor, against 1.36-1.51x.
            decode_options = {**options, "triton.enable_pdl": True} if self.device.type == "cuda" else {}
            self._prefill_fns = (torch.compile(_prefill_prelude, dynamic=True, fullgraph=True),
                                 torch.compile(_prefill_block, dynamic=True, fullgraph=True),
                                 torch.compile(_prefill_head, dynamic=True, fullgraph=True, options=options))
            self._decode_fns = tuple(torch.compile(f, dynamic=None, fullgraph=True, options=decode_options)
                                     for f in (_decode_prelude, _decode_block, _decode_head))
            if warmup:
                self.warmup()

    @classmethod
    def from_decoder(cls, model: Decoder, *, max_batch_size: int = 1, max_input_len: int | None = None,
                     max_seq_len: int = 2048, generation_config: dict | None = None, **options) -> "TorchEngine":
        """An engine around an in-memory decoder (no engine directory): benchmarks, tests, the lab.
        The engine takes the decoder over: ``device``, ``dtype`` and ``quant`` change it in place
        (pass ``copy.deepcopy(model)`` to keep the original, e.g. as a debugger reference)."""
        limits = EngineLimits(max_batch_size, max_input_len or max_seq_len, max_seq_len)
        manifest = {"backend": cls.backend, "decoder": model.cfg.to_dict(), "limits": limits.__dict__,
                    "options": {}}
        device = options.pop("device", None) or next(model.parameters()).device
        engine = cls(Path("<memory>"), manifest, device=str(device), model=model, **options)
        engine.generation_config = dict(generation_config or {})
        return engine

    # ------------------------------------------------------------------ compile
    def warmup(self, batch_size: int = 1) -> float:
        """Compile prefill and decode (and capture the decode graph) now rather than at the first
        request. Returns the seconds it took; a reload with Inductor's cache takes a few."""
        start = time.perf_counter()
        with _compiling(f"torch.compile {self.config.architecture} prefill + decode (cached after)"):
            self._quiet = True
            prompt = torch.zeros(batch_size, 2, dtype=torch.long, device=self.device)
            mask = torch.ones_like(prompt)
            self.begin(batch_size)
            self.step(prompt, mask)
            self.step(prompt[:, :1], torch.ones(batch_size, 3, dtype=torch.long, device=self.device))
            for length in self._longer_prefill_lengths(batch_size):
                longer = torch.zeros(batch_size, length, dtype=torch.long, device=self.device)
                self.begin(batch_size)
                self.step(longer, torch.ones_like(longer))
            self.begin(batch_size)
            self._quiet = False
        seconds = time.perf_counter() - start
        self.compile_seconds += seconds
        return seconds

    def _longer_prefill_lengths(self, batch_size: int) -> list[int]:
        """Prompt lengths past 2 tokens that warm-up also prefills. Without a second length the
        first real prompt could compile the prefill again (seen on a config with 2 KV heads);
        and on CUDA, weight-only linears choose their kernel (INT8 its row tile too) by rows."""
        rows = {triton_int8.ROW_TILES[0] + 1}
        weight_only = [m for m in self.model.modules() if isinstance(m, (Int8WeightOnlyLinear, Int4WeightOnlyLinear))]
        if self.device.type == "cuda" and weight_only:
            rows |= {cuda_int8.MAX_ROWS + 1, MANY_ROWS}
            if any(getattr(m, "mma", False) for m in weight_only):  # INT4 in nbtrt's layout: Triton, then cuBLAS
                rows.add(INT4_TRITON_MAX_ROWS + 1)
        lengths = {min(self.limits.max_input_len, -(-r // batch_size)) for r in rows}
        return sorted(n for n in lengths if n > 2)

    def _run(self, fns, input_ids, attention_mask, cache_position, causal: bool = False,
             last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at the last position, or at position ``last`` ([1]) where the prompt was padded."""
        prelude, block, head = fns
        # a first call compiles and tunes its kernels; inductor_timing says why it times them itself
        tuning = (inductor_timing.kernel_timing() if self.compiled and self.device.type == "cuda"
                  else contextlib.nullcontext())
        with torch._dynamo.config.patch(**{_LIMIT_KEY: DYNAMO_RECOMPILE_LIMIT}), tuning, sdpa_kernel(ATTENTION_BACKENDS):
            x, rope, mask = prelude(self.model, input_ids, attention_mask, cache_position, causal)
            for layer, (k, v) in zip(self.model.layers, self._kv):
                x = block(layer, x, rope, mask, k, v, cache_position)
            return head(self.model, x if last is None else x.index_select(1, last))

    # ------------------------------------------------------------------ Engine API
    @torch.inference_mode()
    def begin(self, batch_size: int) -> None:
        if self.cache is None or self.cache.batch_size != batch_size:
            # free the old buffers and the graphs that point into them (with their memory pool) first
            self.cache, self._kv, self._static, self._prefill_static, self._pool = None, [], {}, {}, None
            self.cache = StaticKVCache(self.config, batch_size, self.limits.max_seq_len, dtype=self.dtype,
                                       device=self.device)
            self._kv = [(getattr(self.cache, f"k{i}"), getattr(self.cache, f"v{i}")) for i in range(self.config.num_layers)]
        for st in self._static.values():
            st.mask.zero_()
        self._past = 0

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise GenerationError("call begin(batch_size) before step()")
        B, T = input_ids.shape
        if B != self.cache.batch_size:
            raise GenerationError(f"step got {B} sequences but begin() was called for {self.cache.batch_size}")
        self.check_step(self._past, T)
        if attention_mask.shape != (B, self._past + T):
            raise GenerationError(f"attention_mask must be [batch, past + new] = [{B}, {self._past + T}], "
                                  f"got {list(attention_mask.shape)}")
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device, torch.long)
        if T == 1 and self.compiled:
            logits = self._decode(input_ids, attention_mask)
        else:
            cache_position = torch.arange(self._past, self._past + T, device=self.device)
            window = self.config.sliding_window
            # a [T, T] mask costs a T x T bias per layer and a slower attention kernel; without
            # padding and past, plain causal attention is the same function (one host sync here)
            causal = (self.causal_prefill and self._past == 0 and T > 1 and (window is None or window >= T)
                      and bool(attention_mask.all()))
            bucket = prefill_bucket(T, self.limits.max_seq_len) if causal and self.graph_prefill else None
            if bucket:
                logits = self._graphed_prefill(input_ids, bucket)
            else:
                kind = (B > 1, causal)
                first = self.compiled and kind not in self._prefill_kinds
                with _compiling(f"torch.compile prefill (batch {'>1' if B > 1 else 1})",
                                enabled=first and not self._quiet):
                    logits = self._run(self._prefill_fns, input_ids, attention_mask, cache_position, causal)
                self._prefill_kinds.add(kind)
        self._past += T
        return logits

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One token per sequence through static buffers; on CUDA, one graph replay."""
        B, W = attention_mask.shape
        st = self._static.get(B)
        new = st is None
        if new:
            S = self.limits.max_seq_len
            st = self._static[B] = SimpleNamespace(
                ids=torch.zeros(B, 1, dtype=torch.long, device=self.device),
                mask=torch.zeros(B, S, dtype=torch.long, device=self.device),
                cache_position=torch.zeros(1, dtype=torch.long, device=self.device), graph=None, logits=None)
        st.ids.copy_(input_ids)
        st.mask[:, :W].copy_(attention_mask)
        st.cache_position.fill_(self._past)
        run = lambda: self._run(self._decode_fns, st.ids, st.mask, st.cache_position)  # noqa: E731
        return self._replay(st, run, f"decode (batch {B})", new)

    def _graphed_prefill(self, input_ids: torch.Tensor, length: int) -> torch.Tensor:
        """A causal prefill (no past, no padding) padded on the right to ``length``, through static
        buffers and one CUDA graph per (batch, length). Causal attention keeps the padding out of
        the prompt's rows; its cache slots lie past the prompt, masked until decode overwrites them.
        The logits are the last real token's."""
        B, T = input_ids.shape
        st = self._prefill_static.get((B, length))
        new = st is None
        if new:
            st = self._prefill_static[B, length] = SimpleNamespace(
                ids=torch.zeros(B, length, dtype=torch.long, device=self.device),
                mask=torch.ones(B, length, dtype=torch.long, device=self.device),
                cache_position=torch.arange(length, device=self.device),
                last=torch.zeros(1, dtype=torch.long, device=self.device), graph=None, logits=None)
        st.ids[:, :T].copy_(input_ids)  # the rows past T keep what they held: no real row attends to them
        st.last.fill_(T - 1)
        run = lambda: self._run(self._prefill_fns, st.ids, st.mask, st.cache_position, True, st.last)  # noqa: E731
        return self._replay(st, run, f"prefill (batch {B}, {length} tokens)", new)

    def _replay(self, st: SimpleNamespace, run: Callable[[], torch.Tensor], what: str, new: bool) -> torch.Tensor:
        """``run()`` (one step through ``st``'s static buffers) as a CUDA graph replay; the graph is
        captured on the first call. Off CUDA, ``run()`` itself."""
        if self.device.type != "cuda":
            with _compiling(f"torch.compile {what}", enabled=new and self.compiled and not self._quiet):
                return run()
        if st.graph is None:
            # warm up (compiles) on a side stream, then capture; these runs write the step's keys
            # and values at the step's slots, so they leave the cache as the replay will
            with _compiling(f"torch.compile + CUDA graph {what}", enabled=not self._quiet):
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        run()
                torch.cuda.current_stream(self.device).wait_stream(side)
                # one pool for every graph of this cache: they never run at once, and each keeps its output
                self._pool = self._pool or torch.cuda.graph_pool_handle()
                st.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(st.graph, pool=self._pool):
                    st.logits = run()
        st.graph.replay()
        return st.logits.clone()

    @torch.inference_mode()
    def _capture(self, prompts, names):
        from ..model import capture_outputs

        ids = torch.tensor(prompts, device=self.device)
        with capture_outputs(self.model, names) as captured:
            logits = self.model(ids)
        return logits.float().cpu(), captured
