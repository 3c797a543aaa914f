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


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, then a 64-byte union at offset 8
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_bytes", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


_DEPENDENT = _LaunchAttribute(id=6, value=1)  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION: allowed


def launch(kernel, blocks: int, threads: int, *args: torch.Tensor | int | float, dependent: bool = False) -> None:
    """Launch on the current stream: tensors pass their device pointers, ints as C ``int``, floats
    as C ``float``. A prefill makes one call per linear, outside any CUDA graph, and PyTorch's own
    launch call took 34.3 us of host time against 13.8 us here (H200:
    benchmarks/experiments/int4_launch_probe.py).

    ``dependent`` (sm_90 and newer): programmatic dependent launch. The kernel may start while the
    one before it on the stream is still running, so it must execute ``griddepcontrol.wait``
    before it touches anything that kernel reads or writes."""
    values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else _C_TYPES[type(a)](a) for a in args]
    argv = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    if dependent:
        config = _LaunchConfig((ctypes.c_uint * 3)(blocks, 1, 1), (ctypes.c_uint * 3)(threads, 1, 1), 0, stream,
                               ctypes.pointer(_DEPENDENT), 1)
        err = _libcuda().cuLaunchKernelEx(ctypes.byref(config), kernel.func, argv, None)
    else:
        err = _libcuda().cuLaunchKernel(kernel.func, blocks, 1, 1, threads, 1, 1, 0, stream, argv, None)
    if err:
        raise RuntimeError(f"cuLaunchKernel{'Ex' if dependent else ''} failed: CUDA error {err}")
