"""The paged KV cache: a pool of fixed-size blocks per layer, and the block tables that map each
sequence's positions onto them.

Layout: per layer one key and one value tensor ``[num_blocks, block_size, kv_heads, head_dim]``.
Token ``i`` of a sequence lives in block ``table[i // block_size]`` at offset ``i % block_size``;
its *slot* is ``block * block_size + offset``, the row of the flattened ``[num_blocks * block_size,
kv_heads, head_dim]`` view that a step writes its new keys and values into.

Block 0 is never handed out: padded rows of a CUDA-graph decode step write there (a scratch block).
Blocks are allocated as a sequence grows and given back when it finishes, is cancelled or is
preempted; ``used`` counts those held and :meth:`BlockPool.check_no_leaks` asserts every block came back.

**Prefix caching** (on unless ``prefix_caching=False``): a full block whose keys and values are
computed is *remembered* by the hash of its contents and of everything before it
(:meth:`Sequence.block_hashes`). A new request whose prompt starts with remembered blocks *shares*
them: held by several sequences at once (a count per block), never written again (only full
blocks are shared, and a sequence writes past its shared ones), and its prefill starts after
them: a chat's system prompt, or the earlier turns of a conversation, are computed once. A
remembered block nobody holds stays in the pool as *evictable* and keeps its contents until a
new block is needed and no free one is left: then the least recently released goes first.

>>> pool = BlockPool(cfg, num_blocks=64, block_size=16, dtype=torch.float32, device="cpu")  # doctest: +SKIP
>>> table = []; pool.grow(table, 40); len(table)  # doctest: +SKIP
3
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ..config import DecoderConfig

GIB = 1 << 30
CPU_KV_TOKENS = 32768  # the pool's size on a CPU, in tokens (a fixed default: no "free memory" to size from)


def bytes_per_block(cfg: DecoderConfig, block_size: int, dtype: torch.dtype) -> int:
    """Key + value bytes one block holds over all layers."""
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()


def blocks_for_memory(cfg: DecoderConfig, block_size: int, dtype: torch.dtype, device: torch.device,
                      gpu_memory_utilization: float = 0.9, reserve_bytes: int = 0) -> int:
    """How many blocks fit: on CUDA, ``gpu_memory_utilization`` of the device's total memory less
    what is in use now (weights, other processes) and ``reserve_bytes`` (a step's activations);
    on a CPU a fixed :data:`CPU_KV_TOKENS`."""
    per_block = bytes_per_block(cfg, block_size, dtype)
    if device.type != "cuda":
        return CPU_KV_TOKENS // block_size + 1
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1]")
    torch.cuda.empty_cache()  # memory the allocator holds but no tensor uses counts as free
    free, total = torch.cuda.mem_get_info(device)
    budget = gpu_memory_utilization * total - (total - free) - reserve_bytes
    blocks = int(budget // per_block)
    if blocks < 2:
        raise RuntimeError(f"no GPU memory left for the KV cache: {free / GIB:.1f} of {total / GIB:.1f} GiB free, "
                           f"gpu_memory_utilization={gpu_memory_utilization}; raise it or free memory")
    return blocks


class BlockPool:
    """KV blocks for every layer and the free list that hands them out.

    ``k[layer]`` / ``v[layer]``: ``[num_blocks, block_size, kv_heads, head_dim]``. A sequence's block
    table is a plain list of block ids the pool appends to (:meth:`grow`, :meth:`share`) and empties
    (:meth:`release`).
    """

    def __init__(self, cfg: DecoderConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str, prefix_caching: bool = True):
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1 (tokens a KV block holds)")
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks} must be >= 2 (block 0 is never handed out: padded rows write there)")
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free_blocks = list(range(num_blocks - 1, 0, -1))  # a stack of blocks with nothing worth keeping
        self.holders = [0] * num_blocks  # how many sequences hold each block
        self.by_hash: dict[bytes, int] = {}  # remembered contents -> the block holding them
        self.hash_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # remembered, held by nobody; oldest first
        self.bytes = bytes_per_block(cfg, block_size, dtype) * num_blocks

    @property
    def capacity(self) -> int:
        """Blocks a sequence may ever use (all but the scratch block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks a sequence could take now: the free ones and the evictable ones."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def used(self) -> int:
        """Blocks some sequence holds."""
        return self.capacity - self.num_free

    def blocks_needed(self, table: list[int], tokens: int) -> int:
        """Blocks ``table`` lacks to hold ``tokens`` tokens."""
        return max(0, -(-tokens // self.block_size) - len(table))

    def can_grow(self, table: list[int], tokens: int) -> bool:
        return self.blocks_needed(table, tokens) <= self.num_free

    def grow(self, table: list[int], tokens: int) -> None:
        """Append blocks to ``table`` until it holds ``tokens`` tokens (check :meth:`can_grow` first)."""
        need = self.blocks_needed(table, tokens)
        if need > self.num_free:
            raise RuntimeError(f"KV pool exhausted: {need} blocks needed, {self.num_free} free")
        for _ in range(need):
            if self.free_blocks:
                block = self.free_blocks.pop()
            else:  # the least recently released remembered block: its contents are forgotten
                block, _ = self.evictable.popitem(last=False)
                del self.by_hash[self.hash_of.pop(block)]
            self.holders[block] = 1
            table.append(block)

    def release(self, table: list[int]) -> None:
        """Give back every block of ``table`` and empty it; a remembered block nobody else holds
        becomes evictable (its last blocks first: a prefix outlives its tail)."""
        for block in reversed(table):
            self.holders[block] -= 1
            if self.holders[block] == 0:
                if block in self.hash_of:
                    self.evictable[block] = None
                else:
                    self.free_blocks.append(block)
        table.clear()

    def share(self, hashes: list[bytes]) -> list[int]:
        """The remembered blocks holding the longest run of ``hashes`` from the start, each now
        held once more (give them back with :meth:`release`). The scheduler calls this and
        :meth:`remember` only when ``prefix_caching`` is on."""
        blocks = []
        for h in hashes:
            block = self.by_hash.get(h)
            if block is None:
                break
            if self.holders[block] == 0:
                del self.evictable[block]
            self.holders[block] += 1
            blocks.append(block)
        return blocks

    def remember(self, block: int, h: bytes) -> None:
        """``block`` is full and computed, with contents ``h``: later prompts may share it."""
        if h not in self.by_hash and block not in self.hash_of:
            self.by_hash[h], self.hash_of[block] = block, h

    def slots(self, table: list[int], start: int, end: int) -> list[int]:
        """The slots of positions ``start..end-1`` of the sequence whose blocks are ``table``."""
        bs = self.block_size
        return [table[i // bs] * bs + i % bs for i in range(start, end)]

    def forget(self) -> None:
        """Forget every remembered content: evictable blocks are free again, held ones ordinary."""
        self.free_blocks.extend(self.evictable)
        self.evictable.clear()
        self.by_hash.clear()
        self.hash_of.clear()

    def check_no_leaks(self) -> None:
        """Assert every block is back (free or evictable) and none twice (call when no sequence is alive)."""
        back = self.free_blocks + list(self.evictable)
        assert len(set(back)) == len(back), "a block was given back twice"
        assert not any(self.holders), f"{sum(1 for h in self.holders if h)} KV blocks are still held"
        assert len(back) == self.capacity, f"{self.capacity - len(back)} KV blocks leaked"

    def describe(self) -> str:
        return (f"paged KV cache: {self.capacity} blocks x {self.block_size} tokens = "
                f"{self.capacity * self.block_size} tokens, {self.bytes / GIB:.2f} GiB"
                f"{', prefix caching' if self.prefix_caching else ''}")
