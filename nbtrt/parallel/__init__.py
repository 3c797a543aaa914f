"""Tensor parallelism on ``torch.distributed``: sharding rules as data, sharded checkpoints, the same
decoder per rank (fewer heads, a slice of the MLP and of the vocabulary) and a launcher that starts
one process per rank (Gloo on the CPU); ``TensorParallelEngine``, an engine whose steps run on long-lived
ranks (what ``nbtrt.LLM(model, tensor_parallel_size=N)`` serves). See docs/parallel.md.

>>> from nbtrt.parallel import shard_checkpoint, run_tensor_parallel  # doctest: +SKIP
>>> tp2 = shard_checkpoint("work/ckpt", "work/ckpt-tp2", tensor_parallel_size=2)  # doctest: +SKIP
>>> [out] = run_tensor_parallel([{"checkpoint": tp2, "input_ids": [[1, 2, 3]], "max_new_tokens": 8}],
...                             tensor_parallel_size=2)  # doctest: +SKIP
"""
from .engine import TensorParallelEngine
from .launch import run_tensor_parallel
from .layers import load_rank_decoder, tensor_parallel_decoder
from .rank_engine import RankEngine, generate_greedy, prefill_logits
from .sharding import (OUTPUT_SPLIT, SHARDING, join_outputs, load_rank_tensors, rank_config, shard_checkpoint,
                       shard_tensors)

__all__ = ["SHARDING", "rank_config", "shard_tensors", "shard_checkpoint", "load_rank_tensors",
           "tensor_parallel_decoder", "load_rank_decoder",
           "RankEngine", "generate_greedy", "prefill_logits", "run_tensor_parallel",
           "OUTPUT_SPLIT", "join_outputs", "TensorParallelEngine"]
