"""The one generation loop. Batch generation, streaming, the chat widget and the benchmark
all consume :func:`generate_tokens`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from .engine import Engine


class GenerationError(ValueError):
    """A request the engine cannot serve (too long, too many prompts, empty prompt)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``temperature == 0`` (or ``do_sample=False``) is greedy."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0 or self.top_k == 1

    @classmethod
    def from_generation_config(cls, gen: dict, **overrides) -> "SamplingParams":
        """Defaults from a generation_config.json dict (as HF does), then explicit overrides."""
        eos = gen.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        base = {k: gen[k] for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
                if gen.get(k) is not None}
        base["stop_token_ids"] = eos
        names = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise TypeError(f"unknown generation options {bad}; known: {sorted(names)}")
        params = cls(**base)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "temperature" in overrides and "do_sample" not in overrides:
            overrides["do_sample"] = overrides["temperature"] > 0
        for k in ("stop_token_ids", "stop_strings"):
            if k in overrides:
                overrides[k] = tuple(overrides[k])
        return replace(params, **overrides)


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                history: torch.Tensor | None = None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids under ``params``."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and history is not None and history.numel():
        seen = logits.gather(1, history)
        seen = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
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
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # drop a token when the tokens ranked above it already reach top_p (the top one always stays)
    drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


@dataclass
class GenerationState:
    """What the loop knows between steps; callers may mark sequences finished (e.g. stop strings)."""

    prompts: list[list[int]]
    finished: list[bool] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)


def generate_tokens(
    engine: "Engine",
    prompts: list[list[int]],
    params: SamplingParams,
    cancel: threading.Event | None = None,
    state: GenerationState | None = None,
) -> Iterator[list[int | None]]:
    """Prefill then decode; yield, per step, each sequence's new token (None once finished).

    >>> for step in generate_tokens(engine, [[1, 2, 3]], SamplingParams(max_new_tokens=4)):  # doctest: +SKIP
    ...     print(step)
    """
    engine.check_request(prompts, params.max_new_tokens)
    state = state or GenerationState(prompts)
    B = len(prompts)
    state.finished = [False] * B
    state.tokens = [[] for _ in range(B)]
    device = engine.device
    width = max(len(p) for p in prompts)
    pad = engine.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    ids, mask = ids.to(device), mask.to(device)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    history = ids.masked_fill(mask == 0, ids[mask.bool()][0] if mask.any() else 0)
    stop = set(params.stop_token_ids)

    engine.begin(B)
    logits = engine.step(ids, mask)
    for i in range(params.max_new_tokens):
        if cancel is not None and cancel.is_set():
            return
        token = next_tokens(logits, params, generator, history if params.repetition_penalty != 1.0 else None)
        values = token.tolist()
        out: list[int | None] = []
        for b, t in enumerate(values):
            if state.finished[b]:
                out.append(None)
                continue
            out.append(t)
            state.tokens[b].append(t)
            if t in stop:
                state.finished[b] = True
        yield out
        if all(state.finished) or i + 1 == params.max_new_tokens:
            return
        if width + i + 1 >= engine.limits.max_seq_len:
            return
        if params.repetition_penalty != 1.0:
            history = torch.cat([history, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = engine.step(token[:, None], mask)
