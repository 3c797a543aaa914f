"""The eager PyTorch engine: the nbtrt decoder with a static KV cache."""
from __future__ import annotations

from pathlib import Path

import torch

from .._io import link_or_copy
from ..checkpoint import WEIGHTS
from ..engine import Engine, register_backend
from ..generate import GenerationError


def _pick_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

@register_backend
class TorchEngine(Engine):
    """The nbtrt decoder run by PyTorch with a static KV cache (eager; see nbtrt.backends for compiled)."""

    backend = "torch"

    @classmethod
    def _build_files(cls, ckpt_dir, out, cfg, limits, options):
        link_or_copy(ckpt_dir / WEIGHTS, out / WEIGHTS)
        link_or_copy(ckpt_dir / "config.json", out / "config.json")
        return dict(options)

    def __init__(self, engine_dir: Path, manifest: dict, device: str | None = None, dtype: str | None = None):
        super().__init__(engine_dir, manifest)
        from ..model import load_decoder

        self.device = _pick_device(device)
        self.model = load_decoder(engine_dir, device=self.device, dtype=dtype)
        self.cache = None
        self._past = 0

    def begin(self, batch_size: int) -> None:
        from ..model import StaticKVCache

        if self.cache is None or self.cache.batch_size != batch_size:
            self.cache = None  # free the old buffers before allocating new ones
            dtype = self.model.lm_head.weight.dtype
            self.cache = StaticKVCache(self.config, batch_size, self.limits.max_seq_len, dtype=dtype, device=self.device)
        self._past = 0

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if self._past + T > self.limits.max_seq_len:
            raise GenerationError(f"sequence would reach {self._past + T} tokens, beyond max_seq_len={self.limits.max_seq_len}")
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -T:]
        cache_position = torch.arange(self._past, self._past + T, device=self.device)
        full_mask = torch.zeros(attention_mask.shape[0], self.limits.max_seq_len, dtype=torch.bool, device=self.device)
        full_mask[:, : attention_mask.shape[1]] = attention_mask.bool()
        logits = self.model(input_ids, positions, full_mask, cache_position, self.cache, last_only=True)
        self._past += T
        return logits[:, -1]

    @torch.inference_mode()
    def capture(self, input_ids, names):
        from ..model import capture_outputs

        prompts = [list(p) for p in input_ids]
        self.check_request(prompts, 1)
        if len({len(p) for p in prompts}) != 1:
            raise GenerationError("capture needs prompts of equal length (no padding)")
        ids = torch.tensor(prompts, device=self.device)
        with capture_outputs(self.model, names) as captured:
            logits = self.model(ids)
        return logits.float().cpu(), captured
