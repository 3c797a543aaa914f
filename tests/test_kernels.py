"""nbtrt.kernels: the weight-only GEMV and dequantization kernels against nbtrt.quantize.formats'
own dequantization. On CUDA they run compiled; without it, in Triton's interpreter (same code)."""
import pytest
import torch

pytest.importorskip("triton")  # conftest.py turns its interpreter on where there is no GPU

from nbtrt import kernels  # noqa: E402
from nbtrt.backends.torch import Int4WeightOnlyLinear, Int8WeightOnlyLinear  # noqa: E402
from nbtrt.quantize.formats import QuantLinear, dequantize_weight, quantize_weight  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FORMATS = [("int8_wo", 8, 0), ("int4_wo", 4, 32), ("int4_wo", 4, 128)]


def quantized(fmt, group, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g)  # rows of different scales
    t = quantize_weight(w, fmt, group or 128)
    return {k: v.to(DEV) for k, v in t.items()}


def words_and_scales(t, bits):
    scales = t["weight_scale"] if bits == 8 else t["weight_scale"].to(torch.float16)
    return t["weight"].contiguous().view(torch.int32), scales


@pytest.mark.parametrize("fmt,bits,group", FORMATS)
def test_unpack_matches_checkpoint_layout(fmt, bits, group):
    t = quantized(fmt, group, 24, 256)
    words, _ = words_and_scales(t, bits)
    ref = dequantize_weight({k: v.cpu() for k, v in t.items()}, fmt, group or 128)
    torch.testing.assert_close(kernels.dequantize_words(words, t["weight_scale"], bits, group, torch.float32).cpu(),
                               ref, rtol=0, atol=0)
    torch.testing.assert_close(kernels.dequantize(words, t["weight_scale"], bits, group, torch.float32).cpu(),
                               ref, rtol=0, atol=0)


@pytest.mark.parametrize("fmt,bits,group", FORMATS)
@pytest.mark.parametrize("N,K", [(64, 512), (37, 1024), (40, 384)])  # ragged rows; a K no tuned block divides
def test_gemv_matches_dequantized_matmul(fmt, bits, group, N, K):
    if not kernels.supports(K, bits, group):
        pytest.skip(f"K={K} with group {group}: not a kernel shape")
    t = quantized(fmt, group, N, K, seed=N)
    words, scales = words_and_scales(t, bits)
    x = torch.randn(1, K, device=DEV)
    ref = x.double() @ kernels.dequantize_words(words, scales, bits, group, torch.float64).t()
    block_k = kernels.gemv_block_k(K, group)
    for config in [None, (8, block_k), (32, min(block_k, 256) if K % 256 == 0 else block_k)]:
        y = kernels.gemv(x, words, scales, bits, group, config=config)
        assert y.shape == (1, N) and y.dtype == x.dtype
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-5, (config, err)  # fp32 sums; a wrong index or shift is O(1)


def test_supports_rejects_partial_words_and_groups():
    assert kernels.supports(4096, 4, 128) and kernels.supports(14336, 4, 128) and kernels.supports(896, 8, 0)
    assert not kernels.supports(100, 4, 32)  # 100 is not a whole number of groups
    assert not kernels.supports(130, 8, 0)  # not a whole number of 4-byte words
    assert not kernels.supports(4096, 4, 4)  # a group smaller than one word


@pytest.mark.parametrize("fmt,bits,group", FORMATS)
def test_linear_modules_match_reference_module(fmt, bits, group):
    """The engine's kernel-backed linears, one row (GEMV) and several (dequantize + matmul), against
    the checkpoint's reference QuantLinear, bias included."""
    N, K = 48, 256
    t = quantized(fmt, group, N, K, seed=3)
    bias = torch.randn(N, device=DEV)
    if bits == 8:
        fast = Int8WeightOnlyLinear(t["weight"], t["weight_scale"], bias, torch.float32, use_kernels=True)
    else:
        fast = Int4WeightOnlyLinear(t["weight"], t["weight_scale"], group, bias, torch.float32, use_kernels=True)
    # the int4 kernels keep their scales in float16: the exact reference rounds them the same way
    kept_scale = t["weight_scale"] if bits == 8 else t["weight_scale"].half().float()
    exact, stored = QuantLinear(K, N, True, fmt, group or 128).to(DEV), QuantLinear(K, N, True, fmt, group or 128).to(DEV)
    exact.load_state_dict({**t, "weight_scale": kept_scale, "bias": bias}, strict=False)
    stored.load_state_dict({**t, "bias": bias}, strict=False)
    for rows in (1, 3):
        x = torch.randn(1, rows, K, device=DEV)
        y = fast(x)
        torch.testing.assert_close(y, exact(x), rtol=1e-4, atol=1e-4)
        assert ((y - stored(x)).norm() / stored(x).norm()).item() < 1e-3  # what float16 scales cost
