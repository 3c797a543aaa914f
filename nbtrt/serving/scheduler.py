"""In-flight batching: which sequences run in the next step, and how many tokens each feeds.

Every step gets a token budget (``max_num_tokens``) and a sequence budget (``max_batch_size``):

1. the running sequences first, oldest first: a decoding one feeds 1 token, one still
   prefilling feeds the next chunk of its prompt (what is left of the budget), so a long
   prompt never stalls everyone else's decode (chunked prefill);
2. then waiting requests are admitted in arrival order while tokens, sequence slots and free
   KV blocks last (admission control); a new prompt may start with a chunk.

A finished request leaves the batch at once; the next step fills its place.

When a running sequence needs a block and none is free, the most recently admitted running
sequence is **preempted by recompute**: its blocks are freed and it goes back to the front of
the queue, to be prefilled again later from its prompt and the tokens it had generated (no swap to
host memory: recomputing a prefill is cheap next to moving the KV over PCIe). Greedy outputs do
not change. A request that could never fit the pool on its own is refused at submit
(:meth:`Scheduler.check_fits`), so nothing waits forever.

With prefix caching, a request being admitted first takes the pool's remembered blocks that
match the start of its tokens (:meth:`BlockPool.share`) and is fed from the first token after
them; at least its last token is always fed, since its logits give the first new token. Blocks a
step has filled are remembered when the next step is scheduled, and when their sequence ends.

>>> sched = Scheduler(pool, max_batch_size=64, max_num_tokens=2048)  # doctest: +SKIP
>>> batch = sched.schedule()  # doctest: +SKIP
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..generate import GenerationError
from .block_pool import BlockPool
from .sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """One step's work: ``seqs[i]`` feeds ``num_new[i]`` tokens. One-token rows (decodes) come
    first, then prefill chunks."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_decodes(self) -> int:
        return sum(1 for n in self.num_new if n == 1)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, pool: BlockPool, max_batch_size: int, max_num_tokens: int):
        if max_num_tokens < 1 or max_batch_size < 1:
            raise ValueError(f"max_num_tokens={max_num_tokens} and max_batch_size={max_batch_size} must be >= 1")
        self.pool, self.max_batch_size, self.max_num_tokens = pool, max_batch_size, max_num_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.cached_tokens = 0  # prompt tokens admitted from the prefix cache, not computed

    def check_fits(self, seq: Sequence) -> None:
        """Refuse a request that could not fit the KV pool even alone (it would wait forever)."""
        need = -(-seq.max_tokens // self.pool.block_size)
        if need > self.pool.capacity:
            raise GenerationError(
                f"request {seq.request_id!r} needs {seq.max_tokens} tokens of KV cache ({need} blocks of "
                f"{self.pool.block_size}), more than the whole pool ({self.pool.capacity} blocks); shorten the "
                "prompt or max_new_tokens, or give the cache more memory (num_blocks / gpu_memory_utilization)")

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_tokens
        for seq in self.running:
            self._remember(seq)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.remaining, budget)
            while not self.pool.can_grow(seq.block_table, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            self.pool.grow(seq.block_table, seq.num_computed + n)
            batch.seqs.append(seq)
            batch.num_new.append(n)
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size and not batch.preempted:
            seq = self.waiting[0]
            if not seq.block_table and self.pool.prefix_caching:
                self._share_prefix(seq)
            n = min(seq.remaining, budget)
            if not self.pool.can_grow(seq.block_table, seq.num_computed + n):
                self._unshare(seq)  # it waits holding nothing
                break
            self.waiting.popleft()
            self._admitted(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.pool.grow(seq.block_table, seq.num_computed + n)
            batch.seqs.append(seq)
            batch.num_new.append(n)
            budget -= n
        # decodes first: the runner sends them through the batched decode kernel in one go
        order = sorted(range(len(batch.seqs)), key=lambda j: batch.num_new[j] != 1)
        batch.seqs = [batch.seqs[j] for j in order]
        batch.num_new = [batch.num_new[j] for j in order]
        return batch

    def _share_prefix(self, seq: Sequence) -> None:
        """Start ``seq`` on the remembered blocks that hold the start of its tokens (all but the last)."""
        blocks = self.pool.share(seq.block_hashes(self.pool.block_size, seq.num_tokens - 1))
        seq.block_table.extend(blocks)
        seq.remembered, seq.num_computed = len(blocks), len(blocks) * self.pool.block_size

    def _unshare(self, seq: Sequence) -> None:
        self.pool.release(seq.block_table)
        seq.num_computed = seq.remembered = 0

    def _admitted(self, seq: Sequence) -> None:
        if seq.preemptions == 0:
            seq.cached_tokens = seq.num_computed
            self.cached_tokens += seq.num_computed

    def _remember(self, seq: Sequence) -> None:
        """Tell the pool about ``seq``'s blocks filled since the last time (full and computed)."""
        if not self.pool.prefix_caching or seq.num_computed // self.pool.block_size <= seq.remembered:
            return  # no block filled since: the usual decode step costs nothing here
        hashes = seq.block_hashes(self.pool.block_size, seq.num_computed)
        for i in range(seq.remembered, len(hashes)):
            self.pool.remember(seq.block_table[i], hashes[i])
        seq.remembered = max(seq.remembered, len(hashes))

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: free the blocks, back to the front of the queue."""
        self.running.remove(seq)
        self._remember(seq)  # what it computed stays in the pool: its re-admission may share it back
        self.pool.release(seq.block_table)
        seq.num_computed = seq.remembered = 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire ``seq`` (finished, stopped or aborted) and free its blocks now."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        if seq.status is not Status.WAITING:
            self._remember(seq)
        self.pool.release(seq.block_table)
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or reason
