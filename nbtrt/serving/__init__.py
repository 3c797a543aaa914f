"""Serving: in-flight batching over a paged KV cache behind :class:`nbtrt.LLM` (nano-vllm's layout:
``sequence`` a request's state, ``block_pool`` the KV blocks, ``scheduler`` admit / preempt / retire,
``runner`` one model step, ``llm`` the loop and the user's entry point; the benchmark of static vs
in-flight batching is :mod:`nbtrt.bench.serving`)."""
