"""Random-weight HF models of real architectures, for tests, the GPU parity script and the lab.

>>> path = tiny_hf_model("Qwen2ForCausalLM", "work/tiny-qwen2")  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

import torch

# Small configs, one per supported architecture; each exercises its distinctive flags.
TINY: dict[str, dict] = {
    "LlamaForCausalLM": dict(model_type="llama", vocab_size=257, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                             rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64}),
    "MistralForCausalLM": dict(model_type="mistral", vocab_size=257, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                               rms_norm_eps=1e-5, max_position_embeddings=256, sliding_window=None,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "Qwen2ForCausalLM": dict(model_type="qwen2", vocab_size=257, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "Qwen3ForCausalLM": dict(model_type="qwen3", vocab_size=257, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                             rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "GPT2LMHeadModel": dict(model_type="gpt2", vocab_size=257, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                            layer_norm_epsilon=1e-5, activation_function="gelu_new", bos_token_id=0, eos_token_id=0),
}

# Published configs of real models (sizes only; weights are random) for GPU speed and parity work.
REAL: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "qwen2.5-0.5b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "llama-3.1-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
}


def hf_config(arch: str, **overrides):
    """A transformers config object for ``arch`` from :data:`TINY` (or a :data:`REAL` name)."""
    from transformers import AutoConfig

    spec = dict(REAL[arch]) if arch in REAL else dict(TINY[arch], architectures=[arch])
    spec.update(overrides)
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(model_type, **spec)


def random_hf_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised HF model of a real architecture (weights scaled up a little so
    layers actually differ from identity and bugs show)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = hf_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # non-trivial norm weights catch norm bugs
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn_like(p))  # biases
    return model.eval()


def tiny_hf_model(arch: str, out: str | Path, seed: int = 0, **overrides) -> Path:
    """Save a random-weight model of ``arch`` as an ordinary HF directory (safetensors)."""
    out = Path(out)
    model = random_hf_model(arch, seed=seed, **overrides)
    model.save_pretrained(out, safe_serialization=True)
    return out
