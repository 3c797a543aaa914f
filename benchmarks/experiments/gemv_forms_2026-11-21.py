"""Experiment, 2026-11-21: forms of the batch-1 weight-only GEMV that Inductor compiles, on the
8B config's linear shapes. Question: is Inductor's INT8 GEMV limited by the int->float
conversion (I2F runs at a quarter of the FP32 rate on Hopper), and would an INT4 GEMV that
Inductor can see (plain nibble layout, bit tricks instead of conversions) beat tinygemm?

Forms (each compiled alone, coordinate-descent tuning on, as the engine's decode):
  bf16            F.linear on the bf16 weight (the bandwidth reference)
  int8:cvt        F.linear(x, w.to(bf16)) * scale            (what nbtrt ships)
  int8:sum_cvt    explicit fp32 reduction, w.to(float32)
  int8:sum_magic  explicit fp32 reduction, w as float by bits: (w + 0x4B000080).view(f32) - (2^23 + 128)
  int4:tinygemm   aten._weight_int4pack_mm                   (what nbtrt ships)
  int4:sum_cvt    plain [N, K/2] nibbles, explicit reduction, nibble.to(float32)
  int4:sum_magic  the same with nibbles made floats by bits
Time per call: CUDA graph of calls over enough weight copies to defeat the L2, median of replays.
JSON to $OUT/gemv.json.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from nbtrt.quantize.formats import quantize_int4, quantize_int8, dequantize_int4  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEV.type == "cuda"
OUT = Path(os.environ.get("OUT", "/tmp/gemv"))
OUT.mkdir(parents=True, exist_ok=True)
SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336), "qkv": (6144, 4096), "o": (4096, 4096),
          "lm_head": (128256, 4096)} if CUDA else {"small": (96, 256)}
GROUP = 128 if CUDA else 32
ROTATE_BYTES = 512 << 20
MAGIC = 0x4B000000  # float32 2^23: its low mantissa bits hold an integer exactly
R = {"machine": torch.cuda.get_device_name() if CUDA else "cpu", "date": time.strftime("%Y-%m-%d"),
     "torch": torch.__version__, "group": GROUP, "shapes": {}}


def as_float(i32: torch.Tensor, offset: int) -> torch.Tensor:
    """float32(i32 - offset) for 0 <= i32 < 2^23, with integer ops and a bitcast: no I2F."""
    return (i32 | MAGIC).view(torch.float32) - float((1 << 23) + offset)


def bf16(x, w):
    return F.linear(x, w)


def int8_cvt(x, w, s):
    return F.linear(x, w.to(x.dtype)) * s


def int8_sum_cvt(x, w, s):
    return ((x.float()[:, None, :] * w.float()[None]).sum(-1) * s).to(x.dtype)


def int8_sum_magic(x, w, s):
    wf = as_float(w.to(torch.int32) + 128, 128)
    return ((x.float()[:, None, :] * wf[None]).sum(-1) * s).to(x.dtype)


def int4_tinygemm(x, packed, sz):
    return torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, sz)


def _int4_sum(x, p, s, even, odd):
    n, half = p.shape
    xf = x.float().view(x.shape[0], half, 2)
    scale = s.float()[:, :, None].expand(n, s.shape[1], GROUP // 2).reshape(n, half)
    return (((even * xf[:, None, :, 0] + odd * xf[:, None, :, 1]) * scale[None]).sum(-1)).to(x.dtype)


def int4_sum_cvt(x, p, s):
    u = p.to(torch.int32) ^ 0x88  # two's complement nibbles -> offset binary (q + 8)
    return _int4_sum(x, p, s, (u & 15).float() - 8, (u >> 4).float() - 8)


def int4_sum_magic(x, p, s):
    u = p.to(torch.int32) ^ 0x88
    return _int4_sum(x, p, s, as_float(u & 15, 8), as_float(u >> 4, 8))


def tinygemm_pack(q_packed: torch.Tensor, scale: torch.Tensor):
    from nbtrt.quantize.formats import unpack_int4

    u = unpack_int4(q_packed).to(torch.int32) + 8
    K, N = u.shape[1], u.shape[0]
    tiles = next(t for t in (8, 4, 2) if K % (t * 16) == 0)
    packed = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8), tiles)
    sz = torch.stack([scale.float(), torch.zeros_like(scale, dtype=torch.float32)], -1)
    return packed, sz.transpose(0, 1).contiguous().to(torch.bfloat16)


def time_per_call(fn, copies, x) -> float:
    for args in copies:
        fn(x, *args)
    if not CUDA:
        t = time.perf_counter()
        for args in copies:
            fn(x, *args)
        return (time.perf_counter() - t) / len(copies)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for args in copies:
            fn(x, *args)
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / len(copies))
    return sorted(times)[len(times) // 2]


def main():
    options = {"coordinate_descent_tuning": True} if CUDA else {}
    for name, (n, k) in SHAPES.items():
        torch.manual_seed(0)
        w = torch.randn(n, k, device=DEV) * 0.02
        x = torch.randn(1, k, device=DEV).to(torch.bfloat16)
        ref = x.float() @ w.t()
        q8, s8 = quantize_int8(w)
        q4, s4 = quantize_int4(w, GROUP)
        ref8 = x.float() @ (q8.float() * s8[:, None]).t()
        ref4 = x.float() @ dequantize_int4(q4, s4, GROUP).float().t()
        forms = {
            "bf16": (bf16, (w.to(torch.bfloat16),), ref, w.numel() * 2),
            "int8:cvt": (int8_cvt, (q8, s8.to(torch.bfloat16)), ref8, q8.numel() + n * 2),
            "int8:sum_cvt": (int8_sum_cvt, (q8, s8), ref8, q8.numel() + n * 4),
            "int8:sum_magic": (int8_sum_magic, (q8, s8), ref8, q8.numel() + n * 4),
            "int4:sum_cvt": (int4_sum_cvt, (q4, s4.to(torch.bfloat16)), ref4, q4.numel() + s4.numel() * 2),
            "int4:sum_magic": (int4_sum_magic, (q4, s4.to(torch.bfloat16)), ref4, q4.numel() + s4.numel() * 2),
        }
        if CUDA:
            packed, sz = tinygemm_pack(q4, s4)
            forms["int4:tinygemm"] = (int4_tinygemm, (packed, sz), ref4, q4.numel() + sz.numel() * 2)
        row = {}
        for form, (fn, args, want, nbytes) in forms.items():
            torch._dynamo.reset()
            compiled = torch.compile(fn, dynamic=False, fullgraph=True, options=options)
            t0 = time.perf_counter()
            got = compiled(x, *args).float()
            compile_s = time.perf_counter() - t0
            err = ((got - want).norm() / want.norm()).item()
            n_copies = max(1, ROTATE_BYTES // nbytes) if CUDA else 2
            copies = [args] + [tuple(a.clone() for a in args) for _ in range(n_copies - 1)]
            t = time_per_call(compiled, copies, x)
            row[form] = {"us": t * 1e6, "tb_s": nbytes / t / 1e12, "bytes": nbytes, "rel_err_vs_ref": err,
                         "copies": n_copies, "compile_s": compile_s}
            print(f"{name:8s} {form:15s} {t * 1e6:9.2f} us {nbytes / t / 1e12:6.2f} TB/s err {err:.2e}", flush=True)
            del copies
            torch.cuda.empty_cache() if CUDA else None
        R["shapes"][name] = row
        (OUT / "gemv.json").write_text(json.dumps(R, indent=1))
    totals = {}
    counts = {"qkv": 32, "o": 32, "gate_up": 32, "down": 32, "lm_head": 1}
    for form in R["shapes"].get("gate_up", {}):
        totals[form] = sum(R["shapes"][s][form]["us"] * c for s, c in counts.items() if form in R["shapes"].get(s, {}))
    R["per_step_us_8b"] = totals
    print("per 8B decode step (us):", json.dumps({k: round(v) for k, v in totals.items()}))
    (OUT / "gemv.json").write_text(json.dumps(R, indent=1))


if __name__ == "__main__":
    main()
