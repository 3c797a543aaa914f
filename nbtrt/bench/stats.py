"""Statistics of a benchmark: percentiles and per-request TTFT / TPOT / latency from step times."""
from __future__ import annotations

import numpy as np


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks (numpy's)."""
    if not values:
        raise ValueError("percentile of no values")
    return float(np.percentile(values, q))


def summarize(values: list[float]) -> dict:
    """P50, P95, mean, min, max and count of a list of timings."""
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "mean": sum(values) / len(values),
            "min": min(values), "max": max(values), "n": len(values)}


def request_metrics(start: float, step_times: list[float], lengths: list[int]) -> list[dict]:
    """Per-request TTFT / TPOT / latency from one static batch: row b's k-th token arrived at step k."""
    out = []
    for n in lengths:
        first, last = step_times[0] - start, step_times[n - 1] - start
        out.append({"ttft": first, "latency": last, "tpot": (last - first) / (n - 1) if n > 1 else None})
    return out
