"""Watch in-flight batching happen: fire a burst of requests at a running server (all at once,
or in static waves), sample the engine's counters while it runs, and draw what happened per
engine step — each request's phases (queued / prefill / decode), the batch's occupancy and the
KV block pool — for 06_serve.ipynb.

Request phases come from the LLM's own per-request metrics (arrival, scheduled, first token,
finish: ``time.perf_counter()`` in this process); they are placed on the step axis through the
engine's step counter, sampled every few milliseconds by :class:`StatsSampler`.

>>> inflight = run_burst(server, REQUESTS)  # doctest: +SKIP
>>> static = run_burst(server, REQUESTS, waves_of=8, name="static batches of 8")  # doctest: +SKIP
>>> compare([static, inflight]).show()  # doctest: +SKIP
"""
from __future__ import annotations

import asyncio
import bisect
import statistics
import threading
import time
from dataclasses import dataclass, field

import plotly.graph_objects as go
from plotly.subplots import make_subplots

PHASE_COLORS = {"queued": "#c7c7c7", "prefill": "#ff7f0e", "decode": "#1f77b4"}


class StatsSampler:
    """Poll ``llm.stats()`` from a thread every ``every_s`` seconds while a burst runs."""

    def __init__(self, llm, every_s: float = 0.005):
        self.llm, self.every_s, self.samples = llm, every_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nbtrt-stats-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append({"t": time.perf_counter(), **self.llm.stats()})
            self._stop.wait(self.every_s)

    def __enter__(self) -> "StatsSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append({"t": time.perf_counter(), **self.llm.stats()})


@dataclass
class Burst:
    """One burst's record. Request times are seconds since the burst began (when every request
    was handed to the client); ``*_step`` are the engine steps they fell in (0 = the first step
    of the burst)."""

    name: str
    requests: list[dict]
    samples: list[dict]
    wall_s: float
    max_batch_size: int
    steps: int = 0
    per_step: list[dict] = field(default_factory=list)  # step, running, waiting, kv_used, kv_total

    @property
    def tokens(self) -> int:
        return sum(r["tokens"] for r in self.requests)

    def ttft(self, q: float) -> float:
        values = sorted(r["first"] for r in self.requests)
        return values[min(len(values) - 1, int(q * len(values)))]

    def summary(self) -> str:
        mean_occ = statistics.fmean(s["running"] for s in self.per_step) if self.per_step else 0.0
        return (f"{self.name}: {len(self.requests)} requests, {self.tokens} tokens in {self.wall_s:.2f} s "
                f"({self.tokens / self.wall_s:.0f} tok/s) over {self.steps} steps; TTFT p50 {self.ttft(0.5):.2f} s, "
                f"p90 {self.ttft(0.9):.2f} s; mean batch occupancy {mean_occ:.1f}/{self.max_batch_size}")


def run_burst(server, requests: list[tuple[str, int]], *, waves_of: int | None = None, name: str | None = None,
              chat: bool = True, sample_every_s: float = 0.005) -> Burst:
    """Send ``requests`` (``(text, max_tokens)`` pairs, greedy, streamed) to ``server`` (a
    :class:`~nbtrt.server.run.ServerHandle`) all at once — or, with ``waves_of=B``, as static
    batching does: B at a time, the next B only when all of the previous B have finished.

    >>> burst = run_burst(server, [("Name a colour.", 8), ("Count to ten.", 40)])  # doctest: +SKIP
    """
    import openai

    name = name or (f"static batches of {waves_of}" if waves_of else "in-flight batching")
    model = server.app.state.server.model_name
    server.llm.reset_prefix_cache()  # every burst starts cold: an earlier burst's prompts are not free

    async def one(client, text: str, max_tokens: int, t0: float) -> dict:
        kwargs = ({"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text})
        create = client.chat.completions.create if chat else client.completions.create
        stream = await create(model=model, max_tokens=max_tokens, temperature=0, stream=True, **kwargs)
        first, rid = None, None
        async for c in stream:
            rid = c.id
            delta = (c.choices[0].delta.content if chat else c.choices[0].text) if c.choices else None
            if delta and first is None:
                first = time.perf_counter() - t0
        return {"id": rid, "max_tokens": max_tokens, "first": first, "done": time.perf_counter() - t0}

    async def burst(t0: float) -> list[dict]:
        client = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=600)
        try:
            size = waves_of or len(requests)
            out = []
            for start in range(0, len(requests), size):
                out += await asyncio.gather(*(one(client, t, n, t0) for t, n in requests[start:start + size]))
            return out
        finally:
            await client.close()

    result: dict = {}

    def in_thread() -> None:  # a fresh event loop: a notebook's own loop is already running
        try:
            result["records"] = asyncio.run(burst(result["t0"]))
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            result["error"] = e

    with StatsSampler(server.llm, sample_every_s) as sampler:
        result["t0"] = t0 = time.perf_counter()
        worker = threading.Thread(target=in_thread, name="nbtrt-burst")
        worker.start()
        worker.join()
        wall = time.perf_counter() - t0
    if "error" in result:
        raise result["error"]
    records = result["records"]
    for rec, m in zip(records, server.request_metrics([r["id"] for r in records])):
        m = m or {}
        rec["tokens"] = m.get("num_generated_tokens", 0)
        for key, src in (("arrival", "arrival_time"), ("first_token", "first_token_time"), ("finish", "finish_time")):
            rec[key] = m[src] - t0 if m.get(src) is not None else None
        queued = m.get("queued_s")
        rec["scheduled"] = rec["arrival"] + queued if queued is not None and rec["arrival"] is not None else rec["arrival"]
    return _on_steps(Burst(name, records, sampler.samples, wall, server.llm.limits.max_batch_size), t0)


def _on_steps(b: Burst, t0: float) -> Burst:
    """Place every request time on the engine-step axis and count, per step, running / waiting requests."""
    times = [s["t"] - t0 for s in b.samples]
    step0 = b.samples[0]["steps"]

    def step_at(t: float | None) -> int:
        if t is None:
            return 0
        i = max(0, bisect.bisect_right(times, t) - 1)
        return b.samples[i]["steps"] - step0

    for r in b.requests:
        r["arrival_step"] = 0  # every request of the burst was handed over at its start
        r["scheduled_step"] = step_at(r["scheduled"])
        r["first_step"] = max(step_at(r["first_token"]), r["scheduled_step"] + 1)  # prefill takes >= 1 step
        r["finish_step"] = max(step_at(r["finish"]), r["first_step"])
    b.steps = max((r["finish_step"] for r in b.requests), default=0)
    kv: dict[int, int] = {}
    for s in b.samples:  # the first sample after a step: finished requests retired, the next ones not yet admitted
        kv.setdefault(s["steps"] - step0, s["kv_blocks_used"])
    total = b.samples[-1]["kv_blocks_total"]
    b.per_step, last = [], 0
    for s in range(b.steps + 1):
        last = kv.get(s, last)  # a step no sample fell in keeps the count seen before it
        b.per_step.append({"step": s, "running": sum(r["scheduled_step"] <= s < r["finish_step"] for r in b.requests),
                           "waiting": sum(s < r["scheduled_step"] for r in b.requests), "kv_used": last,
                           "kv_total": total})
    # one step past the end: the pool after the burst (the sample taken once every request had finished)
    b.per_step.append({"step": b.steps + 1, "running": 0, "waiting": 0, "kv_used": b.samples[-1]["kv_blocks_used"],
                       "kv_total": total})
    return b


# ------------------------------------------------------------------ figures
def _timeline_traces(b: Burst, legend: bool) -> list[go.Bar]:
    order = sorted(range(len(b.requests)), key=lambda i: (b.requests[i]["scheduled_step"], i))
    labels = [f"req {i} ({b.requests[i]['max_tokens']} tok)" for i in order]
    phases = {"queued": ("arrival_step", "scheduled_step"), "prefill": ("scheduled_step", "first_step"),
              "decode": ("first_step", "finish_step")}
    traces = []
    for phase, (a, z) in phases.items():
        starts = [b.requests[i][a] for i in order]
        widths = [b.requests[i][z] - b.requests[i][a] for i in order]
        traces.append(go.Bar(y=labels, x=widths, base=starts, orientation="h", name=phase, legendgroup=phase,
                             marker_color=PHASE_COLORS[phase], showlegend=legend,
                             hovertemplate=f"%{{y}}: {phase} from step %{{base}} for %{{x}} steps<extra></extra>"))
    return traces


def _occupancy_traces(b: Burst, legend: bool) -> list:
    steps = [r["step"] for r in b.per_step]
    return [go.Bar(x=steps, y=[r["running"] for r in b.per_step], name="running (in the batch)", marker_color="#2ca02c",
                   legendgroup="running", showlegend=legend),
            go.Scatter(x=steps, y=[r["waiting"] for r in b.per_step], name="waiting", line_color="#7f7f7f",
                       legendgroup="waiting", showlegend=legend),
            go.Scatter(x=[0, b.steps], y=[b.max_batch_size] * 2, name="max_batch_size", mode="lines",
                       line={"dash": "dash", "color": "black"}, legendgroup="max", showlegend=legend)]


def _kv_traces(b: Burst, legend: bool) -> list:
    steps = [r["step"] for r in b.per_step]
    return [go.Scatter(x=steps, y=[r["kv_used"] for r in b.per_step], fill="tozeroy", name="KV blocks used",
                       line_color="#9467bd", legendgroup="kv", showlegend=legend),
            go.Scatter(x=[0, b.steps], y=[b.per_step[-1]["kv_total"]] * 2 if b.per_step else [], mode="lines",
                       name="KV blocks in the pool", line={"dash": "dot", "color": "#9467bd"},
                       legendgroup="kvt", showlegend=legend)]


def timeline(b: Burst) -> go.Figure:
    """Each request's phases against engine steps."""
    fig = go.Figure(_timeline_traces(b, True))
    fig.update_layout(barmode="overlay", title=f"{b.name}: requests over engine steps", xaxis_title="engine step",
                      height=max(300, 22 * len(b.requests)), yaxis={"autorange": "reversed"})
    return fig


def occupancy(b: Burst) -> go.Figure:
    """Requests in the batch (and waiting) at each step."""
    fig = go.Figure(_occupancy_traces(b, True))
    fig.update_layout(title=f"{b.name}: batch occupancy per step", xaxis_title="engine step", yaxis_title="requests",
                      height=320)
    return fig


def kv_pool(b: Burst) -> go.Figure:
    """KV blocks in use at each step: the pool filling as requests prefill and emptying as they finish."""
    fig = go.Figure(_kv_traces(b, True))
    fig.update_layout(title=f"{b.name}: KV block pool", xaxis_title="engine step", yaxis_title="blocks", height=320)
    return fig


def compare(bursts: list[Burst]) -> go.Figure:
    """The same burst under each policy, side by side: timeline, occupancy, KV pool (one column each)."""
    cols = len(bursts)
    fig = make_subplots(rows=3, cols=cols, shared_xaxes="all", shared_yaxes="rows", vertical_spacing=0.06,
                        row_heights=[0.55, 0.225, 0.225],
                        subplot_titles=[f"{b.name}: {b.steps} steps, {b.wall_s:.1f} s" for b in bursts]
                        + [""] * (2 * cols))
    for c, b in enumerate(bursts, start=1):
        for row, traces in enumerate((_timeline_traces(b, c == 1), _occupancy_traces(b, c == 1),
                                      _kv_traces(b, c == 1)), start=1):
            for t in traces:
                fig.add_trace(t, row=row, col=c)
    fig.update_yaxes(autorange="reversed", showticklabels=False, row=1)
    fig.update_yaxes(title_text="requests", row=2, col=1)
    fig.update_yaxes(title_text="KV blocks", row=3, col=1)
    fig.update_xaxes(title_text="engine step", row=3)
    fig.update_layout(barmode="overlay", height=760, title="the same burst: static batches vs in-flight batching")
    return fig
