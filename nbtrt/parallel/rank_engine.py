"""The generation loop's engine interface over one rank's decoder, so every rank runs the shared loop
(:func:`nbtrt.generate.generate_tokens`) in step: each rank's lm_head gathers the whole vocabulary, so
all ranks see the same logits, pick the same tokens and feed the same next step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import GenerationError
from ..generate import SamplingParams, generate_tokens
from ..model import Decoder, StaticKVCache, positions_from_mask


class RankEngine:
    """``begin`` / ``step`` / ``check_request`` over a :class:`Decoder` with a static KV cache (a
    rank's decoder, or a plain one: then it is the TP=1 reference). Prompts may be left-padded.

    >>> tokens = generate_greedy(RankEngine(model, max_seq_len=64), [[1, 2, 3]], 8)  # doctest: +SKIP
    """

    queues_steps = False  # the loop's look-ahead is for devices that queue work

    def __init__(self, model: Decoder, max_seq_len: int, pad_token_id: int = 0):
        self.model, self.max_seq_len, self.pad_token_id = model, max_seq_len, pad_token_id
        self.device = model.embed.tok.weight.device
        # a rank's lm_head knows the whole vocabulary; its config holds only the rank's slice
        self.vocab_size = getattr(model.lm_head, "vocab_size", model.cfg.vocab_size)
        self.cache: StaticKVCache | None = None
        self._past = 0

    def check_request(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        if not prompts or not all(prompts):
            raise GenerationError("every prompt needs at least one token")
        bad = [t for p in prompts for t in p if not 0 <= t < self.vocab_size]
        if bad:  # a vocabulary-parallel embedding would look such an id up as zeros, silently
            raise GenerationError(f"token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if max(len(p) for p in prompts) + max_new_tokens > self.max_seq_len:
            raise GenerationError(f"prompt + max_new_tokens exceeds max_seq_len={self.max_seq_len}")

    def begin(self, batch_size: int) -> None:
        self.cache = StaticKVCache(self.model.cfg, batch_size, self.max_seq_len, dtype=self.model.float_dtype,
                                   device=self.device)
        self._past = 0

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of the last position; ``attention_mask`` [B, past + new]."""
        T = input_ids.shape[1]
        positions = positions_from_mask(attention_mask)[:, -T:]
        slots = F.pad(attention_mask, (0, self.max_seq_len - attention_mask.shape[1]))
        cache_position = torch.arange(self._past, self._past + T, device=self.device)
        logits = self.model(input_ids, position_ids=positions, attention_mask=slots, cache_position=cache_position,
                            kv=self.cache, last_only=True)
        self._past += T
        return logits[:, -1]


def generate_greedy(engine: RankEngine, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens per prompt through the shared generation loop (no stop tokens: all ``max_new_tokens``)."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in generate_tokens(engine, prompts, SamplingParams(max_new_tokens=max_new_tokens, do_sample=False)):
        for row, token in zip(out, step):
            if token is not None:
                row.append(token)
    return out


@torch.inference_mode()
def prefill_logits(model: Decoder, prompts: list[list[int]], pad_token_id: int = 0) -> torch.Tensor:
    """Logits [B, T, vocab] (fp32) of every position of the left-padded prompts, in one forward pass."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return model(ids, position_ids=positions_from_mask(mask), attention_mask=mask).float()
