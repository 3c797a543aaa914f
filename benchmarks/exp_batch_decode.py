"""Experiment: 8B decode step at batch 1 and 8, bf16 / INT8 / INT4 weight-only (graph replay)."""
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu as G  # noqa: E402
from nbtrt.backends.torch import TorchEngine  # noqa: E402
from nbtrt.mapping import architecture_for  # noqa: E402
from nbtrt.model import Decoder  # noqa: E402

cfg_hf = G.real_config("llama-3.1-8b", False).to_dict()
cfg = architecture_for(cfg_hf).config_from_hf(cfg_hf, "bfloat16")
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    model = Decoder(cfg).eval()
torch.set_default_dtype(torch.float32)
with torch.no_grad():
    for p in model.parameters():
        if p.dim() == 2:
            p.normal_(0, 0.02)
out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "step_s": {}}
for fmt in ("bf16", "int8_wo", "int4_wo"):
    m = model if fmt == "bf16" else G.shared_copy(model)
    eng = TorchEngine.from_decoder(m, max_batch_size=8, max_seq_len=160, compile=True,
                                   quant=None if fmt == "bf16" else fmt, warmup=False)
    for b in (1, 8):
        out["step_s"][f"{fmt}_b{b}"] = G.decode_step_seconds(eng, b, 128)
        print(fmt, b, f"{out['step_s'][f'{fmt}_b{b}'] * 1e3:.2f} ms", flush=True)
    del eng, m
    G.free()
Path(os.environ.get("OUT", "/tmp"), "exp_batch_decode.json").write_text(json.dumps(out, indent=1))
