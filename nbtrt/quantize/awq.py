"""AWQ (Lin et al., 2024): activation-aware scales before INT4 group-wise rounding.

Not every weight matters equally: the input channels whose activations are large carry
most of the output, and rounding their weights to 16 levels hurts most. Scaling those
weight columns up by ``s_j`` before rounding (and the activations down by ``1 / s_j``,
stored as ``pre_quant_scale``) gives them finer relative steps. The scales follow the
mean activation magnitude, ``s = mean|x|^alpha`` (normalised), and ``alpha`` is chosen per
linear by grid search on the calibration tokens, minimising the output error

    loss(alpha) = mean((x W^T - (x / s) Q(W * s)^T)^2)

``alpha = 0`` gives ``s = 1``, plain round-to-nearest, so the search never does worse than
RTN on this objective. (This is the scale search of AWQ / ModelOpt's ``awq_lite``; AWQ's
optional weight-clipping search is not done.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layouts import fake_quant_int4

DEFAULT_GRID = 10  # alpha step 0.1, as ModelOpt's awq_lite (llm-awq searches 20 points)


@dataclass(frozen=True)
class AwqResult:
    scale: torch.Tensor  # s [in]; the stored pre_quant_scale is 1 / s
    alpha: float
    loss: float
    rtn_loss: float  # the loss at alpha = 0 (round-to-nearest)


def output_loss(w: torch.Tensor, x: torch.Tensor, s: torch.Tensor, group_size: int, y: torch.Tensor | None = None) -> float:
    """Mean squared output error of INT4 group-wise ``Q(W * s) / s`` against ``W`` on inputs ``x``."""
    y = x @ w.T if y is None else y
    wq = fake_quant_int4(w * s, group_size) / s
    return float((x @ wq.T - y).pow(2).mean())


def awq_scale(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    s = mean_abs.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search(w: torch.Tensor, x: torch.Tensor, mean_abs: torch.Tensor, group_size: int,
           grid: int = DEFAULT_GRID) -> AwqResult:
    """Grid-search ``alpha`` in {0, 1/grid, ..., grid/grid} for one linear.

    ``w`` [out, in] fp32 weight, ``x`` [n, in] calibration inputs, ``mean_abs`` [in] mean |x|
    over all calibration tokens.

    >>> r = search(layer.weight, rows, stats.chan_mean, group_size=128)  # doctest: +SKIP
    >>> r.loss <= r.rtn_loss
    True
    """
    w, x = w.float(), x.float()
    y = x @ w.T
    best = None
    for k in range(grid + 1):
        alpha = k / grid
        s = awq_scale(mean_abs, alpha)
        loss = output_loss(w, x, s, group_size, y)
        if k == 0:
            rtn = loss
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
    return AwqResult(best[2], best[1], best[0], rtn)
