"""The paged KV cache: a pool of fixed-size blocks per layer, and the block tables that map each
sequence's positions onto them.

Layout: per layer one key and one value tensor ``[num_blocks, block_size, kv_heads, head_dim]``.
Token ``i`` of a sequence lives in block ``table[i // block_size]`` at offset ``i % block_size``;
its *slot* is ``block * block_size + offset``, the row of the flattened ``[num_blocks * block_size,
kv_heads, head_dim]`` view that a step writes its new keys and values into.

Block 0 is never handed out: padded rows of a CUDA-graph decode step write there (a scratch block).
Blocks are allocated as a sequence grows and freed when it finishes, is cancelled or is preempted;
``used`` counts them and :meth:`BlockPool.check_no_leaks` asserts every block came back.

>>> pool = BlockPool(cfg, num_blocks=64, block_size=16, dtype=torch.float32, device="cpu")  # doctest: +SKIP
>>> table = []; pool.grow(table, 40); len(table)  # doctest: +SKIP
3
"""
from __future__ import annotations

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
    table is a plain list of block ids the pool appends to (:meth:`grow`) and empties (:meth:`release`).
    """

    def __init__(self, cfg: DecoderConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str):
        if block_size < 1 or num_blocks < 2:
            raise ValueError(f"block_size={block_size} and num_blocks={num_blocks} must be >= 1 and >= 2")
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks = list(range(num_blocks - 1, 0, -1))  # a stack; block 0 is the scratch block
        self.bytes = bytes_per_block(cfg, block_size, dtype) * num_blocks

    @property
    def capacity(self) -> int:
        """Blocks a sequence may ever use (all but the scratch block)."""
        return self.num_blocks - 1

    @property
    def used(self) -> int:
        return self.capacity - len(self.free_blocks)

    def blocks_needed(self, table: list[int], tokens: int) -> int:
        """Blocks ``table`` lacks to hold ``tokens`` tokens."""
        return max(0, -(-tokens // self.block_size) - len(table))

    def can_grow(self, table: list[int], tokens: int) -> bool:
        return self.blocks_needed(table, tokens) <= len(self.free_blocks)

    def grow(self, table: list[int], tokens: int) -> None:
        """Append blocks to ``table`` until it holds ``tokens`` tokens (check :meth:`can_grow` first)."""
        need = self.blocks_needed(table, tokens)
        if need > len(self.free_blocks):
            raise RuntimeError(f"KV pool exhausted: {need} blocks needed, {len(self.free_blocks)} free")
        for _ in range(need):
            table.append(self.free_blocks.pop())

    def release(self, table: list[int]) -> None:
        """Give every block of ``table`` back and empty it."""
        self.free_blocks.extend(reversed(table))
        table.clear()

    def slots(self, table: list[int], start: int, end: int) -> list[int]:
        """The slots of positions ``start..end-1`` of the sequence whose blocks are ``table``."""
        bs = self.block_size
        return [table[i // bs] * bs + i % bs for i in range(start, end)]

    def check_no_leaks(self) -> None:
        """Assert every block is free and none is listed twice (call when no sequence is alive)."""
        free = self.free_blocks
        assert len(set(free)) == len(free), "a block was freed twice"
        assert len(free) == self.capacity, f"{self.capacity - len(free)} KV blocks leaked"

    def describe(self) -> str:
        return (f"paged KV cache: {self.capacity} blocks x {self.block_size} tokens = "
                f"{self.capacity * self.block_size} tokens, {self.bytes / GIB:.2f} GiB")
