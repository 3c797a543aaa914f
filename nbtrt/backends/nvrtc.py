"""Compile CUDA C at run time (NVRTC, through PyTorch) and launch it with little host time: the
plumbing of nbtrt's own kernels (:mod:`cuda_int4`). No build step and no new dependency; where
NVRTC or the CUDA headers are missing, compiling raises and callers keep PyTorch's kernels.

>>> kernel = compile_kernel(SOURCE, "int4_gemv", WARPS=4, GROUP=128)  # doctest: +SKIP
>>> launch(kernel, blocks, threads, weight, x, y, rows)  # doctest: +SKIP
"""
from __future__ import annotations

import ctypes
import functools

import torch


@functools.cache
def compile_kernel(source: str, name: str, **defines: int):
    """``name`` from ``source`` with ``#define KEY value`` for each of ``defines``, compiled once
    per distinct set (for the current device's architecture)."""
    header = "".join(f"#define {key} {value}\n" for key, value in sorted(defines.items()))
    return torch.cuda._compile_kernel(header + source, name)


_C_TYPES = {int: ctypes.c_int, float: ctypes.c_float}


@functools.cache
def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def launch(kernel, blocks: int, threads: int, *args: torch.Tensor | int | float) -> None:
    """Launch on the current stream: tensors pass their device pointers, ints as C ``int``, floats
    as C ``float``. A prefill makes one call per linear, outside any CUDA graph, and PyTorch's own
    launch call took 34.3 us of host time against 13.8 us here (H200:
    benchmarks/experiments/int4_launch_probe.py)."""
    values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else _C_TYPES[type(a)](a) for a in args]
    argv = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    err = _libcuda().cuLaunchKernel(kernel.func, blocks, 1, 1, threads, 1, 1, 0, stream, argv, None)
    if err:
        raise RuntimeError(f"cuLaunchKernel failed: CUDA error {err}")
