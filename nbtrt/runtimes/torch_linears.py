"""Quantized linears of the torch runtime: each takes a linear's stored tensors (layouts:
:mod:`nbtrt.layouts`) and runs them through PyTorch's own kernels or nbtrt's
(:mod:`nbtrt.kernels`, whose docstring holds the table of which kernel takes how many rows),
plus the swap functions that put them into a decoder in place of ``nn.Linear`` / ``QuantLinear``.

>>> report = quantize_linears(model, "int8_wo")  # float weights, quantized on the fly  # doctest: +SKIP
>>> report = accelerate_quantized(model, torch.bfloat16)  # an nbtrt.quantize checkpoint  # doctest: +SKIP
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cuda_int4, cuda_int8, triton_int4, triton_int8  # noqa: F401  (registers the custom ops)
from ..kernels import INT4_TRITON_MAX_ROWS, MANY_ROWS  # noqa: F401  (the row rule: see nbtrt.kernels)
from ..model import ACTIVATIONS, MLP
from ..layouts import QuantLinear, quantize_weight, unpack_int4


# A quantized checkpoint (layout: nbtrt.layouts) loads into reference QuantLinear modules
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
      (:mod:`nbtrt.kernels.cuda_int8`); ``gemv_unavailable`` says why not where it cannot run;
    - more rows, or where it cannot run, below ``MANY_ROWS`` on CUDA: one Triton kernel that reads
      the int8 weight once (:mod:`nbtrt.kernels.triton_int8`);
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

    >>> mlp.fused_gate_up = Int8GatedInput(mlp.gate, mlp.up, "silu")  # what the engine does  # doctest: +SKIP
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
      (:mod:`nbtrt.kernels.cuda_int4`, the weight pre-shuffled for it), or tinygemm
      (``aten._weight_int4pack_mm``, which computes ``(u - 8) * scale + zero`` with u = q + 8 and
      zero = 0) where that kernel cannot run; ``mma_unavailable`` says why;
    - on CUDA with nbtrt's kernel's layout, ``MANY_ROWS`` to ``INT4_TRITON_MAX_ROWS`` rows: the
      Triton kernel that reads that layout (:mod:`nbtrt.kernels.triton_int4`);
    - on CUDA, more rows (with tinygemm, ``MANY_ROWS`` rows or more of a prefill): the weight
      dequantized to bf16, then one cuBLAS matmul (tinygemm's time grows with the rows: an 8B
      model's linears took 6.9 ms for one row, 65 ms for 128, 959 ms for 2048 on an H100);
    - on a CPU: tinygemm's CPU kernel."""

    GROUP_SIZES = (32, 64, 128, 256)

    def __init__(self, packed: torch.Tensor, weight_scale: torch.Tensor, group_size: int, bias: torch.Tensor | None,
                 dtype: torch.dtype, pre_quant_scale: torch.Tensor | None = None):
        super().__init__()
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

    >>> mlp.fused_gate_up = Int4GatedInput(mlp.gate, mlp.up, "silu")  # what the engine does  # doctest: +SKIP
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


# on-the-fly format (nbtrt.quantize's names, layouts in nbtrt.layouts) -> activation dtypes its CUDA kernel needs
QUANT_FORMATS: dict[str, tuple[torch.dtype, ...]] = {
    "int8_wo": (),
    "int4_wo": (torch.bfloat16,),
    "fp8": (torch.bfloat16,),
    "int8_sq": (),
}
# names the torch engine took before it used nbtrt.quantize's: accepted with a DeprecationWarning
RENAMED_QUANT_FORMATS = {"w8a8": "int8_sq"}
INT4_GROUP_SIZES = (128, 64, 32)  # on-the-fly int4: the largest that divides the input size


def quant_format(fmt: str) -> str:
    """``fmt`` under nbtrt.quantize's name: an old torch-engine name (``w8a8``) is mapped, with a
    DeprecationWarning; other names pass unchanged (unknown ones are reported where they are used).

    >>> quant_format("int8_wo")
    'int8_wo'
    """
    if fmt in RENAMED_QUANT_FORMATS:
        new = RENAMED_QUANT_FORMATS[fmt]
        warnings.warn(f"quant={fmt!r} is now called {new!r} (nbtrt.quantize's name); {fmt!r} will go",
                      DeprecationWarning, stacklevel=3)
        return new
    return fmt


def quant_unavailable(fmt: str, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """None when ``fmt`` runs on ``device`` with activations in ``dtype``, else the reason."""
    fmt = quant_format(fmt)
    if fmt not in QUANT_FORMATS:
        return f"unknown format {fmt!r}; known: {sorted(QUANT_FORMATS)}"
    device = torch.device(device)
    if device.type != "cuda":
        return None
    needs = QUANT_FORMATS[fmt]
    if needs and dtype not in needs:
        return f"{fmt} on CUDA needs {[str(d).replace('torch.', '') for d in needs]} activations; build with dtype='bfloat16'"
    if fmt == "fp8" and torch.cuda.get_device_capability(device) < (8, 9):
        return "fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper)"
    return None


def quantize_linears(model: nn.Module, fmt: str) -> dict:
    """Quantize every ``nn.Linear`` of ``model`` in place with nbtrt.quantize's round-to-nearest
    quantizer (:func:`nbtrt.layouts.quantize_weight`, the same formats and names; no calibration:
    activation scales per token) and swap in the kernel-backed module under the same name, so
    capture and the debugger see the same tree. Unlike a ``nbtrt.quantize`` checkpoint (lm_head
    kept unless ``lm_head=True``), lm_head is quantized too: the GPU benchmarks' figures are of it.

    >>> report = quantize_linears(model, "int8_wo")  # doctest: +SKIP
    """
    layout = fmt = quant_format(fmt)

    def kernel_module(lin: nn.Linear) -> nn.Module | None:
        group = next((g for g in INT4_GROUP_SIZES if lin.in_features % g == 0), INT4_GROUP_SIZES[0])
        return fast_linear(layout, quantize_weight(lin.weight.detach(), layout, group), lin.bias, group,
                           lin.weight.dtype)

    return {"format": fmt, **_swap_in(model, lambda m: type(m) is nn.Linear, kernel_module)}


def accelerate_quantized(model: nn.Module, dtype: torch.dtype) -> dict:
    """Replace the reference QuantLinear modules of a quantized checkpoint by kernel-backed ones.
    Shapes no kernel takes keep the reference module (correct, slower) and are reported."""
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
    for mlp in (m for m in model.modules() if isinstance(m, MLP)):
        if isinstance(mlp.down, Int8WeightOnlyLinear):
            mlp.down.realize_input = True


def _fuse_gate_up(model: nn.Module) -> int:
    """Each gated MLP whose gate and up projections both run nbtrt's INT4 (or INT8) kernel gets them
    as one :class:`Int4GatedInput` (:class:`Int8GatedInput`) as ``mlp.fused_gate_up``. INT4 repacks
    their weights, so ``mlp.gate`` and ``mlp.up`` go; the INT8 module runs the two linears
    themselves, which stay under their names for capture's hooks. Returns how many."""
    fused = 0
    for mlp in (m for m in model.modules() if isinstance(m, MLP)):
        kinds = (Int4GatedInput, Int8GatedInput) if mlp.gated else ()
        kind = next((k for k in kinds if k.takes(mlp.gate, mlp.up, mlp.activation)), None)
        if kind is not None:
            mlp.fused_gate_up = kind(mlp.gate, mlp.up, mlp.activation)
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


