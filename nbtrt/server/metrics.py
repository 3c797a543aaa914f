"""Prometheus text exposition (format 0.0.4) for the server: the engine's gauges read from
``llm.stats()`` at scrape time, plus the server's own counters and latency histograms.

Written by hand rather than with prometheus_client: a dozen series, one scrape function, and
no process-global registry to collide when a notebook starts two servers.

>>> m = ServerMetrics()
>>> m.observe_finished({"ttft_s": 0.02, "tpot_s": 0.004, "num_prompt_tokens": 5}, "stop", 0.1)
>>> "nbtrt_time_to_first_token_seconds_count 1" in m.render({"running": 0})
True
"""
from __future__ import annotations

import bisect
import threading
from collections import Counter

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)

# llm.stats() key -> (metric name, type, help)
ENGINE_SERIES = {
    "running": ("nbtrt_num_requests_running", "gauge", "Requests in the running batch."),
    "waiting": ("nbtrt_num_requests_waiting", "gauge", "Requests queued for admission."),
    "kv_blocks_used": ("nbtrt_kv_cache_blocks_used", "gauge", "KV cache blocks in use."),
    "kv_blocks_total": ("nbtrt_kv_cache_blocks_total", "gauge", "KV cache blocks in the pool."),
    "kv_blocks_cached": ("nbtrt_kv_cache_blocks_cached", "gauge",
                         "KV cache blocks nobody holds that keep a prefix for reuse (evictable)."),
    "prefix_cached_tokens": ("nbtrt_prefix_cache_hit_tokens_total", "counter",
                             "Prompt tokens taken from the prefix cache instead of computed."),
    "steps": ("nbtrt_engine_steps_total", "counter", "Engine steps run."),
    "tokens_generated": ("nbtrt_generation_tokens_total", "counter", "Tokens generated."),
    "requests_finished": ("nbtrt_engine_requests_finished_total", "counter", "Requests the engine retired."),
    "preemptions": ("nbtrt_preemptions_total", "counter", "Requests preempted to free KV blocks."),
}


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: le buckets, +Inf, _sum, _count)."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for le, c in zip([*map(repr, self.buckets), "+Inf"], self.counts):
            total += c
            out.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        out += [f"{self.name}_sum {self.sum!r}", f"{self.name}_count {total}"]
        return out


class ServerMetrics:
    """Thread-safe counters the app updates; :meth:`render` is the /metrics body."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ttft = Histogram("nbtrt_time_to_first_token_seconds", "Time from arrival to the first token.", TTFT_BUCKETS)
        self.tpot = Histogram("nbtrt_time_per_output_token_seconds", "Mean time between output tokens of a request.",
                              TPOT_BUCKETS)
        self.e2e = Histogram("nbtrt_e2e_request_latency_seconds", "Time from arrival to the last token.", E2E_BUCKETS)
        self.finished = Counter()   # finish_reason -> requests
        self.rejected = Counter()   # reason (bad_request, queue_full, unauthorized) -> requests
        self.prompt_tokens = 0
        self.in_flight = 0          # accepted by the server, not yet answered

    def observe_finished(self, metrics: dict, finish_reason: str | None, e2e_s: float) -> None:
        with self._lock:
            self.finished[finish_reason or "abort"] += 1
            self.prompt_tokens += int(metrics.get("num_prompt_tokens") or 0)
            if metrics.get("ttft_s") is not None:
                self.ttft.observe(float(metrics["ttft_s"]))
            if metrics.get("tpot_s") is not None:
                self.tpot.observe(float(metrics["tpot_s"]))
            self.e2e.observe(e2e_s)

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def render(self, stats: dict) -> str:
        lines = []
        for key, (name, kind, help) in ENGINE_SERIES.items():
            if key in stats:
                lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {stats[key]}"]
        with self._lock:
            lines += ["# HELP nbtrt_server_requests_in_flight Requests accepted by the HTTP server and not yet answered.",
                      "# TYPE nbtrt_server_requests_in_flight gauge", f"nbtrt_server_requests_in_flight {self.in_flight}",
                      "# HELP nbtrt_prompt_tokens_total Prompt tokens of finished requests.",
                      "# TYPE nbtrt_prompt_tokens_total counter", f"nbtrt_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP nbtrt_requests_total Requests answered, by finish reason.",
                      "# TYPE nbtrt_requests_total counter"]
            lines += [f'nbtrt_requests_total{{finish_reason="{r}"}} {c}' for r, c in sorted(self.finished.items())]
            lines += ["# HELP nbtrt_requests_rejected_total Requests refused before generation, by reason.",
                      "# TYPE nbtrt_requests_rejected_total counter"]
            lines += [f'nbtrt_requests_rejected_total{{reason="{r}"}} {c}' for r, c in sorted(self.rejected.items())]
            for h in (self.ttft, self.tpot, self.e2e):
                lines += h.lines()
        return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """Samples of a Prometheus text body as ``{"name{labels}": value}`` (for tests and notebooks).

    >>> parse('# TYPE x gauge\\nx 3\\ny{a="b"} 1.5\\n')
    {'x': 3.0, 'y{a="b"}': 1.5}
    """
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
