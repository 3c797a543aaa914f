"""Inductor's autotuner timing each kernel as the decode step's CUDA graph runs it: back to back.

Inductor tunes the launch config of every kernel it generates (coordinate descent) the first time
the kernel runs, timing single launches between CUDA events. The host launches each one after the
start event, so a kernel shorter than the launch (a decode GEMV: 10-40 µs) is timed together with
the GPU waiting for Python. On an 8B config (H200) the qkv GEMV's configs benchmarked 21-28 µs and
ran 12-20 µs in the graph, and the host's jitter decided which config won: the same INT8 engine's
decode step ran 0.546, 0.564 and 0.580 ms (4 layers) over three fresh compiles
(``benchmarks/results/gpu_gemv-tuning_*``). Here the GPU sleeps while the host queues every
repetition, so the events time the kernel alone.

>>> with kernel_timing():  # doctest: +SKIP
...     compiled_fn(*args)  # first call: Inductor compiles and tunes
"""
from __future__ import annotations

import contextlib

import torch

REPEATS = 20
# ~2 ms at H100/H200 clocks: time enough for the host to queue all repetitions (each ~20-50 µs)
SLEEP_CYCLES = 4_000_000


def kernel_ms(fn, **_ignored) -> float:
    """The fastest of REPEATS launches of ``fn``, each after an L2 flush, queued behind a GPU sleep."""
    torch.cuda.synchronize()
    fn()  # warm-up; a config that cannot launch raises here, as in Inductor's own timing
    flush = torch.empty(torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size // 4,
                        dtype=torch.int32, device="cuda")
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(REPEATS)]
    torch.cuda._sleep(SLEEP_CYCLES)
    for start, end in pairs:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return min(start.elapsed_time(end) for start, end in pairs)


@contextlib.contextmanager
def kernel_timing():
    """Inside, Inductor's benchmarker times GPU kernels with :func:`kernel_ms`. Where this PyTorch
    has no such benchmarker object, nothing changes."""
    try:
        from torch._inductor.runtime.benchmarking import benchmarker
    except ImportError:
        benchmarker = None
    if benchmarker is None or not hasattr(benchmarker, "benchmark_gpu"):
        yield
        return
    saved = benchmarker.__dict__.get("benchmark_gpu")  # nested use keeps the outer patch
    benchmarker.benchmark_gpu = kernel_ms  # an instance attribute shadows the method
    try:
        yield
    finally:
        if saved is None:
            del benchmarker.benchmark_gpu
        else:
            benchmarker.benchmark_gpu = saved
