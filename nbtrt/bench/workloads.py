"""Benchmark workloads: fixed shapes and a ShareGPT-like request mix (lengths only)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import is_whole


@dataclass(frozen=True)
class Workload:
    """A list of requests: (prompt length, output length) pairs; prompt tokens are drawn at run time."""

    name: str
    lengths: tuple[tuple[int, int], ...]
    batch_size: int | None = None  # None: the runner's max batch size (static batching)
    repeats: int = 3
    seed: int = 0

    def prompts(self, vocab_size: int) -> list[list[int]]:
        g = np.random.default_rng(self.seed)
        return [g.integers(0, vocab_size, n).tolist() for n, _ in self.lengths]


def fixed(batch: int, input_len: int, output_len: int, repeats: int = 3) -> Workload:
    """``batch`` identical-shape requests run as one batch."""
    sizes = dict(batch=batch, input_len=input_len, output_len=output_len, repeats=repeats)
    bad = {k: v for k, v in sizes.items() if not is_whole(v, 1)}
    if bad:
        raise ValueError(f"{', '.join(f'{k}={v!r}' for k, v in bad.items())}: each must be an integer >= 1")
    return Workload(f"fixed b{batch} in{input_len} out{output_len}", ((input_len, output_len),) * batch,
                    batch_size=batch, repeats=repeats)


# ShareGPT as summarised by the vLLM paper (Kwon et al., SOSP 2023, Fig. 11): mean prompt 161.31
# tokens, mean output 337.99 tokens, both long-tailed. We draw log-normal lengths with those
# means; the spreads (sigma) are our assumption, chosen to give medians near 100 and 250.
SHAREGPT_SHAPE = {"input_mean": 161.31, "input_sigma": 1.0, "output_mean": 337.99, "output_sigma": 0.8}


def sharegpt_like(num_prompts: int = 100, seed: int = 0, scale: float = 1.0, max_input_len: int = 1024,
                  max_output_len: int = 1024, batch_size: int | None = None) -> Workload:
    """A ShareGPT-shaped request mix (no dataset download). ``scale`` shrinks both lengths (e.g. 0.125
    for a CPU run); lengths are clipped to [4, max_input_len] and [2, max_output_len].

    >>> w = sharegpt_like(100, seed=0)
    >>> len(w.lengths), w.lengths == sharegpt_like(100, seed=0).lengths
    (100, True)
    """
    if num_prompts < 1 or scale <= 0:
        raise ValueError(f"num_prompts={num_prompts} and scale={scale} must be >= 1 and > 0 (a mix of at least "
                         "one request, lengths scaled by a positive factor)")
    g = np.random.default_rng(seed)

    def draw(mean: float, sigma: float, lo: int, hi: int) -> np.ndarray:
        mu = math.log(mean * scale) - sigma ** 2 / 2  # so that the mean is mean * scale
        return np.clip(np.round(g.lognormal(mu, sigma, num_prompts)), lo, hi).astype(int)

    s = SHAREGPT_SHAPE
    ins = draw(s["input_mean"], s["input_sigma"], 4, max_input_len)
    outs = draw(s["output_mean"], s["output_sigma"], 2, max_output_len)
    return Workload(f"sharegpt-like n{num_prompts} seed{seed} scale{scale:g}",
                    tuple(zip(ins.tolist(), outs.tolist())), batch_size=batch_size, repeats=1, seed=seed)
