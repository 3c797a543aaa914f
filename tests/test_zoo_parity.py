"""Both zoo models: the converted checkpoint predicts exactly what HF predicts on real text."""
import inspect
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import nbtrt
from nbtrt.model import load_decoder

ZOO = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]


def real_text() -> str:
    """Text nobody here wrote: the json package's own source and docstrings (standard library)."""
    return inspect.getsource(json)


@pytest.mark.parametrize("name", ZOO)
def test_top1_agreement_on_real_text(name, tmp_path):
    src = nbtrt.zoo.get(name)
    ckpt = nbtrt.convert(src, tmp_path / "ckpt")
    tok = AutoTokenizer.from_pretrained(src)
    ids = tok(real_text(), return_tensors="pt").input_ids[:, :256]
    assert ids.shape[1] >= 200
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        theirs = ref(input_ids=ids).logits
        del ref
        ours = load_decoder(ckpt)(ids)
    agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    diff = (theirs - ours).abs()
    assert agree == 1.0, f"{name}: top-1 agreement {agree:.4f}, max |dlogit| {diff.max():.2e}"
    assert diff.max().item() < 1e-3, f"{name}: max |dlogit| {diff.max():.2e} mean {diff.mean():.2e}"
