"""What an engine's limits commit a GPU to before any request arrives: the weights in each precision,
plus a KV cache sized for ``max_batch_size`` sequences of ``max_seq_len`` tokens (TensorRT-LLM
preallocates it the same way). A calculation from the config; the build widget draws it.

>>> rows = memory_plan(cfg, max_batch_size=4, max_seq_len=1024)  # doctest: +SKIP
"""
from __future__ import annotations

from .config import DecoderConfig

# precision -> (bytes per weight of a quantized linear, fp32 scales: "channel" | group size | None,
#               bytes per weight of everything else (embeddings, norms, lm_head), bytes per KV entry)
PRECISIONS: dict[str, tuple[float, object, float, float]] = {
    "float32": (4, None, 4, 4),
    "float16 / bfloat16": (2, None, 2, 2),
    "int8 weights (int8_wo, int8_sq)": (1, "channel", 2, 2),
    "fp8 weights + fp8 KV cache": (1, "tensor", 2, 1),
    "int4 weights, group 128 (int4_wo, int4_awq)": (0.5, 128, 2, 2),
    "int4 weights + int8 KV cache": (0.5, 128, 2, 1),
}
GIB = 2 ** 30


def memory_plan(cfg: DecoderConfig, max_batch_size: int, max_seq_len: int,
                max_input_len: int | None = None) -> list[dict]:
    """Weights + KV cache (GiB) per precision for these limits; activations and workspace come on top
    (``max_input_len`` sizes only those, so it does not change the plan; it is accepted so that the
    three limits can be passed together).

    >>> rows = memory_plan(cfg, max_batch_size=4, max_seq_len=1024)  # doctest: +SKIP
    >>> rows[0]["precision"], rows[0]["total_gib"]  # doctest: +SKIP
    ('float32', 0.677...)
    """
    h, L = cfg.hidden_size, cfg.num_layers
    # (in, out) of every linear in a block: the ones quantization replaces
    linears = [(h, cfg.qkv_size), (cfg.q_size, h), (h, cfg.intermediate_size), (cfg.intermediate_size, h)]
    if cfg.gated_mlp:
        linears.append((h, cfg.intermediate_size))
    quantizable = L * sum(i * o for i, o in linears)
    channels = L * sum(o for _, o in linears)
    rest = cfg.vocab_size * h * (1 if cfg.tie_embeddings else 2) + (2 * L + 1) * h  # embeddings, lm_head, norms
    kv_entries = 2 * L * max_batch_size * max_seq_len * cfg.num_kv_heads * cfg.head_dim
    rows = []
    for name, (q_bytes, scales, dense_bytes, kv_bytes) in PRECISIONS.items():
        if scales == "channel":
            scale_bytes = 4 * channels
        elif scales == "tensor":
            scale_bytes = 4 * L * len(linears)
        else:  # one scale per group, or none
            scale_bytes = 4 * quantizable / scales if scales else 0
        weights = (quantizable * q_bytes + scale_bytes + rest * dense_bytes) / GIB
        kv = kv_entries * kv_bytes / GIB
        rows.append({"precision": name, "weights_gib": weights, "kv_cache_gib": kv, "total_gib": weights + kv})
    return rows
