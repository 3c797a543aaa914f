"""The one generation loop. Batch generation, streaming, the chat widget and the benchmark
all consume :func:`generate_tokens` (token ids per step); :func:`generate_text` adds
incremental detokenization and stop strings on top of it.

Prefill runs every prompt token through the model at once and fills the KV cache; each
decode step then feeds one new token per sequence and reads the cache for the rest.
Prompts of different lengths are left-padded so that all sequences decode in lockstep.

>>> params = SamplingParams(max_new_tokens=4)
>>> for step in generate_tokens(engine, [[1, 2, 3], [4, 5]], params):  # doctest: +SKIP
...     print(step)  # one new id per sequence, None once a sequence has finished
"""
from __future__ import annotations

import math
import numbers
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from .errors import GenerationError

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["GenerationError", "SamplingParams", "GenerationStats", "GenerationState", "Detokenizer",
           "generate_tokens", "generate_text", "next_tokens", "check_text"]


def check_text(name: str, text) -> str:
    """``text`` if it is a string that can be tokenized (valid Unicode), else a GenerationError
    naming ``name``: a lone surrogate such as "\\ud800" has no UTF-8 form, and tokenizers fail on it
    deep inside with an error that names nothing."""
    if not isinstance(text, str):
        raise GenerationError(f"{name} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GenerationError(f"{name} is not valid Unicode text: a lone surrogate {text[e.start]!r} at "
                              f"character {e.start}; decode the text with errors='replace' first") from None
    return text


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``do_sample=False`` or ``temperature == 0`` is greedy.

    Defaults are HF's (top_k=50 applies only when sampling); :meth:`from_generation_config`
    overlays a model's generation_config.json, then explicit options, as ``model.generate`` does.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        # the one place options are checked, for type and range: bools are not numbers here,
        # floats must be finite, counts must be integers, and each error names its option
        def refuse(name: str, rule: str):
            raise GenerationError(f"{name}={getattr(self, name)!r} is invalid: it must be {rule}")

        def put(name: str, value) -> None:
            object.__setattr__(self, name, value)  # normalise (numpy scalars, lists) on a frozen dataclass

        for name in ("max_new_tokens", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                refuse(name, "an integer")
            put(name, int(value))
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                refuse(name, "a finite number")
            put(name, float(value))
        if not isinstance(self.do_sample, bool):
            refuse("do_sample", "True or False")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) \
                    or not 0 <= self.seed < 2**64:
                refuse("seed", "None or an integer in [0, 2**64)")
            put("seed", int(self.seed))
        checks = {
            "max_new_tokens": (self.max_new_tokens >= 1, "an integer >= 1"),
            "temperature": (self.temperature >= 0, ">= 0 (0 means greedy)"),
            "top_k": (self.top_k >= 0, ">= 0 (0 disables top-k)"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1] (1 disables top-p)"),
            "repetition_penalty": (self.repetition_penalty > 0, "> 0 (1 disables it)"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                refuse(name, rule)
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, Iterable):
            refuse("stop_token_ids", "a sequence of token ids")
        put("stop_token_ids", tuple(self.stop_token_ids))
        bad = [t for t in self.stop_token_ids if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0]
        if bad:
            raise GenerationError(f"stop_token_ids must be token ids (integers >= 0), got {bad[:5]!r}")
        put("stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if isinstance(self.stop_strings, (str, bytes)) or not isinstance(self.stop_strings, Iterable):
            refuse("stop_strings", "a sequence of non-empty strings")
        put("stop_strings", tuple(self.stop_strings))
        bad = [s for s in self.stop_strings if not isinstance(s, str) or not s]
        if bad:
            raise GenerationError(f"stop_strings must be non-empty strings, got {bad!r}")
        for s in self.stop_strings:
            check_text("a stop string", s)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_generation_config(cls, gen: dict, **overrides) -> "SamplingParams":
        """Defaults from a generation_config.json dict (as HF does), then explicit overrides.

        >>> p = SamplingParams.from_generation_config({"eos_token_id": [2, 0], "temperature": 0.7}, top_k=5)
        >>> p.stop_token_ids, p.temperature, p.top_k, p.greedy
        ((2, 0), 0.7, 5, True)
        """
        eos = gen.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        base = {k: gen[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                                    "repetition_penalty") if gen.get(k) is not None}
        base["stop_token_ids"] = eos
        names = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise TypeError(f"unknown generation options {bad}; known: {sorted(names)}")
        params = cls(**base)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        temperature = overrides.get("temperature")
        if isinstance(temperature, numbers.Real) and "do_sample" not in overrides:
            overrides["do_sample"] = bool(temperature > 0)  # (a bad temperature is named by __post_init__)
        for k in ("stop_token_ids", "stop_strings"):
            if k in overrides:
                value = overrides[k]
                # one id or one string stands for a list of one; anything else is checked as a sequence
                overrides[k] = (value,) if isinstance(value, (str, numbers.Integral)) else value
        return replace(params, **overrides)


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                history: torch.Tensor | None = None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids under ``params``, in HF's order: repetition penalty,
    temperature, top-k, top-p, then a draw (or argmax when greedy)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and history is not None and history.numel():
        seen = logits.gather(1, history)
        seen = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if params.greedy:
        return logits.argmax(dim=-1)
    # an extreme (finite) temperature or penalty overflows float32: keep the order, drop the infinities,
    # or softmax would turn inf - inf into NaN
    big = torch.finfo(logits.dtype).max
    logits = (logits / params.temperature).clamp(-big, big)
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose cumulative probability reaches ``top_p``."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # drop a token when the tokens ranked above it already reach top_p (the top one always stays)
    drop = (probs.cumsum(dim=-1) - probs) >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


@dataclass
class GenerationStats:
    """Wall-clock timing of one request, filled in while it runs (read it live from another thread).

    >>> stats = GenerationStats()
    >>> for delta in engine.stream("Hi!", stats=stats): pass  # doctest: +SKIP
    >>> stats.ttft_s, stats.tokens_per_s  # doctest: +SKIP
    """

    prompt_tokens: int = 0
    new_tokens: int = 0  # over the whole batch
    start: float | None = None
    step_times: list[float] = field(default_factory=list)  # when each step's tokens were known
    first_step_tokens: int = 0

    def begin(self, prompt_tokens: int) -> None:
        self.prompt_tokens, self.new_tokens, self.start, self.step_times = prompt_tokens, 0, time.perf_counter(), []

    def record(self, n_tokens: int) -> None:
        """One step produced ``n_tokens`` tokens (one per unfinished sequence)."""
        if not self.step_times:
            self.first_step_tokens = n_tokens
        self.new_tokens += n_tokens
        self.step_times.append(time.perf_counter())

    @property
    def ttft_s(self) -> float | None:
        """Time to first token: the prefill plus one sampling step."""
        return self.step_times[0] - self.start if self.step_times else None

    @property
    def tokens_per_s(self) -> float | None:
        """Decode rate after the first token (all sequences of a batch counted)."""
        if len(self.step_times) < 2:
            return None
        return (self.new_tokens - self.first_step_tokens) / (self.step_times[-1] - self.step_times[0])

    @property
    def total_s(self) -> float | None:
        return self.step_times[-1] - self.start if self.step_times else None

    def summary(self) -> str:
        parts = [f"{self.new_tokens} token{'s' * (self.new_tokens != 1)}"]
        if self.ttft_s is not None:
            parts.append(f"TTFT {self.ttft_s * 1000:.0f} ms")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tokens/s")
        return " · ".join(parts)


@dataclass
class GenerationState:
    """What the loop knows between steps. A caller may set ``finished[b] = True`` between steps
    (e.g. on a stop string) to end sequence ``b``; the loop ends when all are finished."""

    prompts: list[list[int]]
    finished: list[bool] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    cancelled: bool = False


def generate_tokens(
    engine: "Engine",
    prompts: list[list[int]],
    params: SamplingParams,
    cancel: threading.Event | None = None,
    state: GenerationState | None = None,
) -> Iterator[list[int | None]]:
    """Prefill then decode; yield, per step, each sequence's new token (None once finished).

    ``cancel`` (set from any thread) is checked before every model step, so a request stops
    within one step; the next request starts a fresh batch (``engine.begin``), so nothing leaks.

    >>> for step in generate_tokens(engine, [[1, 2, 3]], SamplingParams(max_new_tokens=4)):  # doctest: +SKIP
    ...     print(step)
    """
    engine.check_request(prompts, params.max_new_tokens)
    state = state or GenerationState(prompts)
    B = len(prompts)
    state.finished = [False] * B
    state.tokens = [[] for _ in range(B)]
    state.cancelled = False
    state.stats.begin(sum(len(p) for p in prompts))
    device = engine.device
    width = max(len(p) for p in prompts)
    pad = engine.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    # repetition penalty looks at each row's own tokens: padding repeats the row's first real token
    first_real = ids.gather(1, mask.argmax(dim=1, keepdim=True))
    history = torch.where(mask.bool(), ids, first_real) if params.repetition_penalty != 1.0 else None
    stop = set(params.stop_token_ids)

    def cancelled() -> bool:
        state.cancelled = cancel is not None and cancel.is_set()
        return state.cancelled

    def feed(token: torch.Tensor) -> torch.Tensor:
        nonlocal history, mask
        if history is not None:
            history = torch.cat([history, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return engine.step(token[:, None], mask)

    if cancelled():
        return
    engine.begin(B)
    logits = engine.step(ids, mask)
    for i in range(params.max_new_tokens):
        token = next_tokens(logits, params, generator, history)
        last = i + 1 == params.max_new_tokens
        # On a device that queues work, the next step goes in before this step's tokens come back:
        # the device then runs it while the host hands these tokens out, instead of waiting for the
        # host between steps. If every sequence stops here, that step's result is dropped.
        ahead = engine.queues_steps and not last and not cancelled()
        tokens = _copy_to_host(token)
        if ahead:
            logits = feed(token)
        out: list[int | None] = []
        for b, t in enumerate(tokens()):
            if state.finished[b]:
                out.append(None)
                continue
            out.append(t)
            state.tokens[b].append(t)
            state.finished[b] = t in stop
        state.stats.record(sum(t is not None for t in out))
        yield out
        if all(state.finished) or last or cancelled():
            return
        if not ahead:
            logits = feed(token)


def _copy_to_host(token: torch.Tensor) -> Callable[[], list[int]]:
    """Start copying ``token`` to the host ahead of work queued after it; the returned call waits
    for the copy alone (``tolist()`` would wait for everything queued before it). Off CUDA the
    values are read at once."""
    if not token.is_cuda:
        values = token.tolist()
        return lambda: values
    stream = torch.cuda.current_stream(token.device)  # where the copy runs: the source's stream
    host = torch.empty(token.shape, dtype=token.dtype, pin_memory=True)
    host.copy_(token, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(stream)

    def wait() -> list[int]:
        copied.synchronize()
        return host.tolist()

    return wait


class Detokenizer:
    """Token ids in, text deltas out, for one sequence — the contract of transformers'
    ``TextIteratorStreamer``: the deltas concatenate to ``tokenizer.decode(all ids)``.

    Decoding a token on its own breaks text (a leading space is a property of the merge, a
    multi-byte character can span tokens: TensorRT-LLM issue 1414), and re-decoding everything
    each step is O(n^2). So each step decodes a short window starting at ``prefix`` (tokens
    already shown) and emits what it adds beyond the window's known text, holding back an
    incomplete character (U+FFFD). Text that could be the start of a stop string is held back
    too; once a stop string appears, the text ends before it and ``stopped`` is set.

    >>> d = Detokenizer(tokenizer, stop_strings=["\\nUser:"])  # doctest: +SKIP
    >>> "".join(d.add(t) for t in ids) + d.flush()  # doctest: +SKIP
    """

    def __init__(self, tokenizer, stop_strings: tuple[str, ...] | list[str] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids[:prefix] are shown and no longer decoded
        self.read = 0  # ids[prefix:read] decode to the window's known text
        self.text = ""  # everything decoded so far (before any stop string)
        self.emitted = 0  # len of text already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Feed one id; return the new text that is safe to show (may be "")."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        known = self._decode(self.ids[self.prefix:self.read])
        window = self._decode(self.ids[self.prefix:])
        if window.endswith("\ufffd") or len(window) <= len(known):
            return ""  # an incomplete character, or a token that adds no text yet
        self.text += window[len(known):]
        self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of generation: whatever is still held back."""
        if not self.stopped:
            window = self._decode(self.ids[self.prefix:])
            known = self._decode(self.ids[self.prefix:self.read])
            self.text += window[len(known):]
            self.prefix = self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop_strings and not self.stopped:
            # search only where a stop string could newly complete
            start = max(0, self.emitted - max(map(len, self.stop_strings)) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop_strings) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
        end = len(self.text)
        if self.stop_strings and not (final or self.stopped):
            end -= _partial_stop(self.text, self.stop_strings)
        delta, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return delta


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


def generate_text(
    engine: "Engine",
    prompts: list[list[int]],
    params: SamplingParams,
    cancel: threading.Event | None = None,
    state: GenerationState | None = None,
) -> Iterator[list[str]]:
    """:func:`generate_tokens` as text: per step, each sequence's new text ("" when none).
    A sequence whose text reaches one of ``params.stop_strings`` ends there (the stop string
    is not part of the text). The last item flushes what was held back.

    >>> for deltas in generate_text(engine, [[1, 2, 3]], engine.sampling(max_new_tokens=8)):  # doctest: +SKIP
    ...     print(deltas[0], end="")
    """
    state = state or GenerationState(prompts)
    detoks = [Detokenizer(engine.tokenizer, params.stop_strings) for _ in prompts]
    for step in generate_tokens(engine, prompts, params, cancel=cancel, state=state):
        deltas = []
        for b, t in enumerate(step):
            deltas.append(detoks[b].add(t) if t is not None else "")
            if detoks[b].stopped:
                state.finished[b] = True  # the loop sees this before its next step
        yield deltas
    yield [d.flush() for d in detoks]
