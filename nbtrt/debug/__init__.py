"""Layer-by-layer diffs against the HuggingFace reference.

>>> import nbtrt
>>> report = nbtrt.debug.compare("smollm2-135m-instruct", "work/ckpt", "Hello")  # doctest: +SKIP
>>> report.first_divergence, report.figure()  # doctest: +SKIP

- :func:`compare` -> :class:`Report` (table, logits metrics, first divergence, figures)
- :func:`bisect`: the first divergence, running each model only as far as needed
- :mod:`metrics`: the error metrics and the per-precision tolerance table
- :mod:`lab`: inject real conversion bugs and watch the diff find them
"""
from . import lab, metrics
from .capture import DEFAULT_KINDS, KINDS, as_source, probes
from .compare import Bisection, Divergence, Report, TensorDiff, bisect, compare
from .figures import error_vs_layer, heatmap, histogram, topk_table

__all__ = ["compare", "bisect", "Report", "TensorDiff", "Divergence", "Bisection", "lab", "metrics",
           "KINDS", "DEFAULT_KINDS", "as_source", "probes", "error_vs_layer", "heatmap", "histogram", "topk_table"]
