"""Experiment: what warm-up's longer prefills cost, 8B config, fresh Inductor cache (one GPU run)."""
import json, os, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu as G  # noqa: E402
from nbtrt.backends.torch import TorchEngine  # noqa: E402
from nbtrt.mapping import architecture_for  # noqa: E402
from nbtrt.model import Decoder  # noqa: E402

cfg_hf = G.real_config("llama-3.1-8b", False).to_dict()
cfg = architecture_for(cfg_hf).config_from_hf(cfg_hf, "bfloat16")
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    model = Decoder(cfg).eval()
torch.set_default_dtype(torch.float32)
R = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
for fmt in ("bf16", "int8_wo", "int4_wo"):
    m = model if fmt == "bf16" else G.shared_copy(model)
    eng = TorchEngine.from_decoder(m, max_batch_size=1, max_seq_len=384, compile=True,
                                   quant=None if fmt == "bf16" else fmt, warmup=False)
    eng._quiet = True
    row = {"lengths": eng._longer_prefill_lengths(1)}
    def timed(label, fn):
        t = time.perf_counter(); fn(); torch.cuda.synchronize(); row[label] = time.perf_counter() - t
    ids = lambda n: torch.zeros(1, n, dtype=torch.long, device="cuda")  # noqa: E731
    eng.begin(1)
    timed("prefill_2_s", lambda: eng.step(ids(2), torch.ones_like(ids(2))))
    timed("decode_s", lambda: eng.step(ids(1), torch.ones(1, 3, dtype=torch.long, device="cuda")))
    for n in row["lengths"]:
        eng.begin(1)
        timed(f"prefill_{n}_s", lambda: eng.step(ids(n), torch.ones_like(ids(n))))
    R[fmt] = row
    print(fmt, row, flush=True)
    del eng, m
    G.free()
Path(os.environ.get("OUT", "/tmp"), "exp_warmup.json").write_text(json.dumps(R, indent=1))
