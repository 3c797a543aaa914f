"""Benchmarks: HuggingFace vs nbtrt engines on fixed-shape sweeps and a ShareGPT-like request mix.

Every runner is measured the same way: requests run in static batches (all rows start
together, each stops at its own output length), one host synchronisation per generated
token (what a streaming client needs), warm-up first, then repeats. Per runner and workload:

- ``ttft_s``     time to first token (batch start -> first token on the host), P50 / P95 / mean
- ``tpot_s``     time per output token after the first, per request
- ``latency_s``  end-to-end latency per request (batch start -> its last token)
- ``tokens_per_s``   generated tokens / wall time, context phase included (median over repeats)
- ``requests_per_s`` requests / wall time (median over repeats)
- ``peak_memory_bytes``  CUDA allocator peak on GPU; peak resident set size on CPU

A runner that cannot run here is listed with ``status: "skipped"`` and the reason; one whose
build or load raised, with ``status: "failed"`` and the error.

>>> result = bench("smollm2-135m-instruct", runners=["hf-eager", "nbtrt-torch"],
...                workloads=[fixed(batch=1, input_len=32, output_len=16)])  # doctest: +SKIP
>>> print(table(result))  # doctest: +SKIP

The package: :mod:`.stats` (percentiles, per-request metrics), :mod:`.workloads` (fixed shapes, the
ShareGPT-like mix), :mod:`.runners` (HF and engine runners, :func:`measure`), :mod:`.suite` (build
the runners for a model, :func:`run_all`, :func:`bench`), :mod:`.report` (rows, tables, the committed
results: :func:`results_dir`, ``NBTRT_RESULTS``), :mod:`.figures` (plotly), :mod:`.cli` (``nbtrt bench``).
"""
from .cli import add_cli
from .figures import (fig_latency, fig_memory, fig_quality_speed, fig_speedup, fig_tokens_vs_batch,
                      quality_speed)
from .report import BenchReport, gpu_runs, latest, llama8b_rows, markdown, results_dir, rows, table, warnings
from .runners import SHORT_DTYPE, Runner, engine_runner, hf_runner, machine, measure, skipped
from .stats import percentile, request_metrics, summarize
from .suite import RUNNERS, bench, make_runners, run_all
from .workloads import SHAREGPT_SHAPE, Workload, fixed, sharegpt_like

__all__ = ["add_cli", "fig_latency", "fig_memory", "fig_quality_speed", "fig_speedup", "fig_tokens_vs_batch",
           "quality_speed", "BenchReport", "warnings", "gpu_runs", "latest", "llama8b_rows", "markdown", "results_dir", "rows", "table",
           "SHORT_DTYPE", "Runner", "engine_runner", "hf_runner", "machine", "measure", "skipped", "percentile",
           "request_metrics", "summarize", "RUNNERS", "bench", "make_runners", "run_all", "SHAREGPT_SHAPE",
           "Workload", "fixed", "sharegpt_like"]
