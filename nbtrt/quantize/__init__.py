"""Post-training quantization of nbtrt checkpoints: INT8 / INT4 weight-only, INT4-AWQ, SmoothQuant W8A8,
FP8, and INT8 / FP8 KV cache — with calibration on real text and quality reports.

>>> import nbtrt.quantize as nq
>>> q = nq.quantize("work/ckpt", "work/ckpt-int4", "int4_awq", num_samples=64)   # doctest: +SKIP
>>> nq.report("work/ckpt", {"int4_awq": q})                                     # doctest: +SKIP

The module itself is callable, so ``nbtrt.quantize(ckpt, out, fmt)`` works too. The layout
of the quantized tensors is documented in :mod:`nbtrt.layouts`.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

from ..layouts import ACTIVATION_SCHEMES, FORMATS, KV_FORMATS, QuantizationError
from .calib import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, Calibration, calibrate
from .ptq import DEFAULT_ALPHA, DEFAULT_GROUP_SIZE, quantize
from .report import QuantReport, report, sensitivity

__all__ = ["quantize", "calibrate", "report", "sensitivity", "QuantReport", "Calibration", "QuantizationError",
           "FORMATS", "KV_FORMATS"]


# ------------------------------------------------------------------------------ CLI
def add_cli(sub) -> None:
    p = sub.add_parser("quantize", help="nbtrt checkpoint -> quantized nbtrt checkpoint")
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--format", dest="fmt", choices=sorted(FORMATS), default=None,
                   help="weight (and activation) format; omit for KV-cache-only quantization")
    p.add_argument("--kv-cache", choices=sorted(KV_FORMATS), default=None)
    p.add_argument("--calib", default="kjv", help="calibration text source: kjv (default) or stdlib")
    p.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES)
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE)
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    p.add_argument("--activation-scheme", choices=ACTIVATION_SCHEMES, default="per_token")
    p.add_argument("--exclude", nargs="*", default=[], help="linears or prefixes kept in high precision")
    p.add_argument("--lm-head", action="store_true", help="quantize lm_head too (untied models only)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing activation")
    p.set_defaults(run=lambda a: print(quantize(
        a.ckpt, a.out, a.fmt, a.calib, kv_cache=a.kv_cache, group_size=a.group_size, alpha=a.alpha,
        activation_scheme=a.activation_scheme, exclude=a.exclude, lm_head=a.lm_head, num_samples=a.num_samples,
        seq_len=a.seq_len, overwrite=a.overwrite, act_order=a.act_order)))


class _CallableModule(types.ModuleType):
    """Lets ``nbtrt.quantize(ckpt, out, fmt)`` call :func:`quantize` while ``nbtrt.quantize.report`` stays reachable."""

    def __call__(self, *args, **kwargs) -> Path:
        return quantize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
