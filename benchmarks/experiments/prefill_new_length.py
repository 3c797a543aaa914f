# Pins private parts of nbtrt (may break when they change): sets runtimes.torch_engine.ATTENTION_BACKENDS.
"""Does a prompt of a length the engine has not seen cost more than one it has? (GPU) A chat sends
a new length every turn. The qwen2.5-0.5b config (random weights, bf16), compiled engine after
warm-up: host-clock milliseconds of each prefill for a sequence of prompt lengths, new and
repeated: the engine as shipped (its attention backends exclude cuDNN's, ATTENTION_BACKENDS) and
with all of PyTorch's backends allowed, where it picks cuDNN's.

    PYTHONPATH=. python benchmarks/experiments/prefill_new_length.py [out.json]
"""
import json
import sys
import time

import torch
from torch.nn.attention import SDPBackend

import nbtrt.runtimes.torch_engine as torch_backend
from benchmarks.gpu import DEV, free, hf_on_device, nbtrt_from_hf, real_config, sync
from nbtrt.runtimes.torch_engine import TorchEngine

LENGTHS = [100, 101, 102, 100, 101, 150, 151, 300, 300, 301]


def main(out):
    R = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "lengths": LENGTHS}
    hf = hf_on_device(real_config("qwen2.5-0.5b", False), torch.bfloat16)
    model = nbtrt_from_hf(hf, "bfloat16")
    del hf
    shipped = torch_backend.ATTENTION_BACKENDS
    for cudnn in (True, False):
        torch_backend.ATTENTION_BACKENDS = [SDPBackend.CUDNN_ATTENTION, *shipped] if cudnn else shipped
        torch._dynamo.reset()  # the backend is chosen when the graph is traced
        eng = TorchEngine.from_decoder(model, max_batch_size=1, max_seq_len=512, compile=True)
        times = []
        for n in LENGTHS:
            ids = torch.randint(0, model.cfg.vocab_size, (1, n), device=DEV)
            eng.begin(1)
            sync()
            t = time.perf_counter()
            eng.step(ids, torch.ones_like(ids))
            sync()
            times.append(round((time.perf_counter() - t) * 1e3, 2))
        key = "all_backends" if cudnn else "shipped"
        R[key] = times
        print(key, list(zip(LENGTHS, times)), flush=True)
        del eng
        free()
    torch_backend.ATTENTION_BACKENDS = shipped
    if out:
        json.dump(R, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
