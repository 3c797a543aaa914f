"""A request's state while the scheduler serves it: its tokens, where its KV lives, how far the
model has read it, and what it has sent back.

``num_computed`` counts the tokens whose keys and values are in the cache. A step feeds
``tokens[num_computed:num_computed + n]``; when that reaches the end of ``tokens`` the step's
logits give the next token. Prefill and decode are the same thing seen this way: a prompt is
fed in chunks, a decode feeds one token. Preemption (recompute) frees the blocks and sets
``num_computed`` back to 0: the sequence's prompt and the tokens it generated are fed again.

``pending`` (0 or 1) is a token sampled on the device and not read back yet: when steps overlap
(:class:`~nbtrt.serving.llm.LLM`), the next step feeds it straight from the device while the host
reads it. It counts in ``num_tokens``; :meth:`Sequence.feed` gives it as 0, a placeholder the
runner overwrites on the device.

``block_hashes`` name the contents of the sequence's full blocks for prefix caching
(:class:`~nbtrt.serving.block_pool.BlockPool`): each hashes its block's tokens and the hash
before it, so two sequences with equal hashes up to block ``i`` have the same first ``(i + 1) *
block_size`` tokens, and the same keys and values there.

>>> seq = Sequence("r1", [1, 2, 3], SamplingParams(max_new_tokens=4))  # doctest: +SKIP
"""
from __future__ import annotations

import enum
import hashlib
import time
from array import array
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..generate import Detokenizer, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted
    RUNNING = "running"  # holds blocks; prefilling or decoding
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    detokenizer: Detokenizer | None = None
    on_output: Callable[["Sequence", list[int], str], None] | None = None  # called by the loop after a step
    generator: torch.Generator | None = None
    output: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    text: str = ""
    arrival_time: float = field(default_factory=time.perf_counter)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    preemptions: int = 0
    pending: int = 0  # sampled on the device, not read back yet (overlapped steps)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache at admission
    remembered: int = 0  # leading blocks of block_table the pool already knows by their hash
    _hashes: list[bytes] = field(default_factory=list, repr=False)

    @property
    def tokens(self) -> list[int]:
        """The tokens known on the host: the prompt and every generated token read back."""
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output) + self.pending

    def feed(self, start: int, end: int) -> list[int]:
        """Token ids ``start:end`` as a step feeds them; the pending token (not read back yet) is 0."""
        n = len(self.prompt)
        if end <= n:
            return self.prompt[start:end]
        known = (self.prompt[start:] if start < n else []) + self.output[max(0, start - n):end - n]
        return known + [0] * (end - start - len(known))

    def token_at(self, p: int) -> int:
        """The token id at position ``p`` as a decode step feeds it (0 for the pending token):
        :meth:`feed` of one position, without building lists on the hot path."""
        n = len(self.prompt)
        if p < n:
            return self.prompt[p]
        return self.output[p - n] if p - n < len(self.output) else 0

    def block_hashes(self, block_size: int, upto: int) -> list[bytes]:
        """Content hashes of the full blocks among the first ``upto`` tokens known on the host
        (computed once per block: a sequence's tokens only grow)."""
        upto = min(upto, len(self.prompt) + len(self.output))
        while len(self._hashes) < upto // block_size:
            i = len(self._hashes) * block_size
            block = (self.prompt[i:i + block_size] if i + block_size <= len(self.prompt)
                     else self.tokens[i:i + block_size])
            before = self._hashes[-1] if self._hashes else b""
            self._hashes.append(hashlib.blake2b(before + array("q", block).tobytes(), digest_size=16).digest())
        return self._hashes[:upto // block_size]

    @property
    def remaining(self) -> int:
        """Tokens still to feed before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def max_tokens(self) -> int:
        """The most tokens this sequence can ever hold in the cache (prompt + all but the last output)."""
        return len(self.prompt) + self.params.max_new_tokens - 1

    def metrics(self) -> dict:
        n = len(self.output)
        ttft = None if self.first_token_time is None else self.first_token_time - self.arrival_time
        tpot = None
        if self.finish_time is not None and self.first_token_time is not None and n > 1:
            tpot = (self.finish_time - self.first_token_time) / (n - 1)
        queued = None if self.scheduled_time is None else self.scheduled_time - self.arrival_time
        return {"arrival_time": self.arrival_time, "first_token_time": self.first_token_time,
                "finish_time": self.finish_time, "ttft_s": ttft, "tpot_s": tpot, "queued_s": queued,
                "num_prompt_tokens": len(self.prompt), "num_generated_tokens": n, "preemptions": self.preemptions,
                "num_cached_tokens": self.cached_tokens}
