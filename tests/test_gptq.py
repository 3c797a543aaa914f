"""GPTQ on a tiny random Llama with the real SmolLM2 tokenizer and real text (the King James Bible):
measured against round-to-nearest on the calibration inputs, the stored layout, both CPU runtimes,
and `nbtrt eval --check-accuracy` on a correct and a deliberately broken engine."""
import math

import pytest
import torch

import nbtrt
import nbtrt.quantize as nq
from nbtrt._io import copy_tokenizer_files
from nbtrt.checkpoint import load_checkpoint
from nbtrt.evaluate import AccuracyCheckFailed
from nbtrt.model import load_decoder
from nbtrt import layouts as formats  # the tensor layouts of every format (was nbtrt.quantize.formats)
from nbtrt.quantize import calib
from nbtrt.testing import tiny_hf_model

VOCAB = 49152  # the SmolLM2 tokenizer's
N, T, GROUP = 8, 64, 32  # calibration windows x tokens; group 32 so the 64/96-wide layers hold several groups


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(hf dir, checkpoint, {label: quantized checkpoint}) for a tiny Llama, built once."""
    root = tmp_path_factory.mktemp("gptq")
    src = tiny_hf_model("LlamaForCausalLM", root / "hf", vocab_size=VOCAB)
    copy_tokenizer_files(nbtrt.zoo.get("smollm2-135m-instruct"), src)
    ckpt = nbtrt.convert(src, root / "ckpt")
    kw = dict(num_samples=N, seq_len=T, group_size=GROUP)
    q = {label: nq.quantize(ckpt, root / label, fmt, **kw, **extra) for label, fmt, extra in [
        ("int4_wo", "int4_wo", {}), ("int8_wo", "int8_wo", {}), ("int4_gptq", "int4_gptq", {}),
        ("int4_gptq_act_order", "int4_gptq", {"act_order": True}), ("int8_gptq", "int8_gptq", {})]}
    return src, ckpt, q


def _block0_inputs(ckpt) -> dict[str, torch.Tensor]:
    """The fp32 model's inputs of block 0's linears on the calibration windows GPTQ saw (block 0's
    inputs do not depend on any quantized layer, so both methods are judged on their own objective)."""
    model = load_decoder(ckpt, dtype="float32")
    batches = calib.windows(calib.tokenizer_for(ckpt), "kjv", "calib", N, T)
    names = [n for n in formats.linear_names(model) if n.startswith("layers.0.")]
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: rows[n].append(a[0].detach().reshape(-1, a[0].shape[-1]))) for n in names]
    with torch.no_grad():
        for w in range(N):
            model(batches[w: w + 1])
    for h in hooks:
        h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def _dequantized(qckpt, name: str) -> torch.Tensor:
    cfg, t = load_checkpoint(qckpt)
    q = cfg.quantization
    return formats.dequantize_weight({"weight": t[f"{name}.weight"], "weight_scale": t[f"{name}.weight_scale"]},
                                     q["format"], q.get("group_size") or 0)


@pytest.mark.parametrize("gptq, rtn", [("int4_gptq", "int4_wo"), ("int4_gptq_act_order", "int4_wo"),
                                       ("int8_gptq", "int8_wo")])
def test_gptq_reduces_layer_output_error_against_rtn(tiny, gptq, rtn):
    _, ckpt, q = tiny
    _, ref = load_checkpoint(ckpt)
    inputs = _block0_inputs(ckpt)
    for name, x in inputs.items():
        w = ref[f"{name}.weight"].float()
        y = x @ w.T
        err = {label: float((x @ _dequantized(q[label], name).T - y).pow(2).mean()) for label in (gptq, rtn)}
        assert err[gptq] < 0.9 * err[rtn], (name, err)  # measured: GPTQ is well below RTN on every linear


@pytest.mark.parametrize("label", ["int4_gptq", "int4_gptq_act_order", "int8_gptq"])
def test_gptq_writes_the_rtn_layout(tiny, label):
    _, _, q = tiny
    rtn = "int8_wo" if label.startswith("int8") else "int4_wo"
    cfg_g, t_g = load_checkpoint(q[label])
    cfg_r, t_r = load_checkpoint(q[rtn])
    assert cfg_g.quantization["format"] == rtn and cfg_g.quantization["gptq"]["requested_format"] == label[:9]
    assert cfg_g.quantization["layers"] == cfg_r.quantization["layers"]
    assert {n: (t.dtype, tuple(t.shape)) for n, t in t_g.items()} == {n: (t.dtype, tuple(t.shape)) for n, t in t_r.items()}
    changed = [n for n in cfg_g.quantization["layers"] if not torch.equal(t_g[f"{n}.weight"], t_r[f"{n}.weight"])]
    assert changed == cfg_g.quantization["layers"]  # every linear's codes differ from plain rounding


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("label", ["int4_gptq_act_order", "int8_gptq"])
def test_gptq_checkpoint_runs_in_both_cpu_runtimes(tiny, tmp_path, backend, label):
    _, _, q = tiny
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    reference = load_decoder(q[label], dtype="float32")  # the layouts.py reference modules
    with torch.no_grad():
        expected, seq = [], ids
        for _ in range(6):
            expected.append(int(reference(seq)[0, -1].argmax()))
            seq = torch.cat([seq, torch.tensor([[expected[-1]]])], dim=1)
    engine = nbtrt.load(nbtrt.build(q[label], tmp_path / "e", backend=backend, max_batch_size=1,
                                    max_input_len=32, max_seq_len=40))
    got = engine.generate(input_ids=ids.tolist(), max_new_tokens=6, temperature=0.0)[0]
    assert got == expected


# ------------------------------------------------------------------------------ nbtrt eval
@pytest.fixture(scope="module")
def engines(tiny, tmp_path_factory):
    """A correct torch engine and one built from a checkpoint with the lab's gate_up_swapped bug."""
    from nbtrt.debug import lab

    src, ckpt, _ = tiny
    root = tmp_path_factory.mktemp("eval")
    limits = dict(backend="torch", max_batch_size=1, max_input_len=64, max_seq_len=96)
    bad = lab.save(ckpt, "gate_up_swapped", root / "ckpt-bad")
    return src, nbtrt.build(ckpt, root / "good", **limits), nbtrt.build(bad, root / "bad", **limits)


EVAL_ARGS = ["--num-docs", "2", "--prompt-tokens", "32", "--max-new-tokens", "12"]


def test_eval_check_accuracy_passes_on_a_correct_engine(engines, tmp_path, capsys):
    from nbtrt.cli import main

    src, good, _ = engines
    out = tmp_path / "r.json"
    assert main(["eval", str(good), str(src), *EVAL_ARGS, "--check-accuracy", "--threshold", "90",
                 "--json", str(out)]) == 0
    assert "accuracy check passed" in capsys.readouterr().out
    import json

    r = json.loads(out.read_text())
    assert r["rougeL"] >= 90 and len(r["documents"]) == 2
    assert abs(math.log(r["perplexity_engine"] / r["perplexity_hf"])) < 1e-5  # same model, same numbers


def test_eval_check_accuracy_fails_on_a_broken_engine(engines, capsys):
    from nbtrt.cli import main

    src, _, bad = engines
    assert main(["eval", str(bad), str(src), *EVAL_ARGS, "--check-accuracy", "--threshold", "90"]) != 0
    assert "accuracy check failed" in capsys.readouterr().err
    r = nbtrt.eval(bad, src, num_docs=2, prompt_tokens=32, max_new_tokens=12)
    assert r.exact_match < 1 and any(d.first_diff is not None for d in r.documents)
    assert abs(math.log(r.perplexity_engine / r.perplexity_hf)) > 1e-4  # the broken model scores HF's tokens differently
    assert r.table().rows[0]["ROUGE-L"] == r.rougeL and r.diffs()
    with pytest.raises(AccuracyCheckFailed):
        r.check(90)
