"""Experiment (GPU): the 8B config's weight-only decode step at batch 1-32, nbtrt's kernel against
what runs without it (made unavailable for the second engine): INT4, tinygemm; INT8, Inductor's
one-row GEMV and the Triton kernel. JSON to argv[1].

    python benchmarks/experiments/batch_decode.py $OUT [int4_wo | int8_wo]
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu as G  # noqa: E402

from nbtrt.kernels import cuda_int4, cuda_int8  # noqa: E402
from nbtrt.runtimes.torch_engine import TorchEngine  # noqa: E402
from nbtrt.mapping import architecture_for  # noqa: E402
from nbtrt.model import Decoder  # noqa: E402

FORMAT = sys.argv[2] if len(sys.argv) > 2 else "int4_wo"
KERNELS = {"int4_wo": (cuda_int4, "tinygemm"), "int8_wo": (cuda_int8, "inductor+triton")}
BATCHES = (1, 2, 8, 16, 32)
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
out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "prompt": 128, "step_ms": {}}
kernel_module, without = KERNELS[FORMAT]
real_reason = kernel_module.unavailable_reason
for name in (FORMAT, f"{FORMAT}:{without}"):
    if name != FORMAT:
        kernel_module.unavailable_reason = lambda *a: "forced off for the comparison"
    m = G.shared_copy(model)
    eng = TorchEngine.from_decoder(m, max_batch_size=max(BATCHES), max_seq_len=160, compile=True,
                                   quant=FORMAT, warmup=False)
    out["step_ms"][name] = {b: 1000 * G.decode_step_seconds(eng, b, 128) for b in BATCHES}
    print(name, {b: round(v, 3) for b, v in out["step_ms"][name].items()}, flush=True)
    kernel_module.unavailable_reason = real_reason
    del eng, m
    torch.cuda.empty_cache()
json.dump(out, open(Path(sys.argv[1]) / f"batch_decode_{FORMAT}.json", "w"), indent=1)
