"""Conversion + reference decoder vs HF, for every architecture (random weights) and bad inputs."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import nbtrt
from nbtrt._io import ArtifactError
from nbtrt.mapping import ARCHITECTURES, UnsupportedModelError
from nbtrt.testing import TINY, tiny_hf_model

ARCHS = sorted(TINY)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> (hf dir, checkpoint dir), built once per module."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch in ARCHS:
        src = tiny_hf_model(arch, root / arch)
        out[arch] = (src, nbtrt.convert(src, root / f"{arch}-ckpt"))
    return out


def hf_logits(model, ids, mask):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_match_hf(tiny, arch, tmp_path):
    src, ckpt = tiny[arch]
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    engine = nbtrt.load(nbtrt.build(ckpt, tmp_path / "engine", backend="torch", max_batch_size=2,
                                    max_input_len=32, max_seq_len=64), device="cpu")
    g = torch.Generator().manual_seed(1)
    lengths = [12, 7]
    prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in lengths]
    follow = torch.randint(0, 257, (2, 8), generator=g)
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    engine.begin(2)
    ours = [engine.step(ids, mask)]
    for t in range(8):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        ours.append(engine.step(follow[:, t:t + 1], mask))
    full = hf_logits(ref, torch.cat([ids, follow], 1), mask)
    theirs = full[:, width - 1:]  # logits at the last prompt token, then at each decode token
    diff = (torch.stack(ours, 1) - theirs).abs()
    assert diff.max().item() <= 1e-4, f"{arch}: max {diff.max():.2e} mean {diff.mean():.2e}"


def test_mapping_table_covers_every_checkpoint_tensor(tiny):
    src, ckpt = tiny["Qwen2ForCausalLM"]
    rows = nbtrt.mapping_table(src)
    cfg, tensors = nbtrt.checkpoint.load_checkpoint(ckpt)
    assert {r["nbtrt"] for r in rows} == set(tensors)
    qkv = [r for r in rows if r["nbtrt"] == "layers.0.attn.qkv.bias"]
    assert [r["transform"] for r in qkv] == ["fuse into qkv [0]", "fuse into qkv [1]", "fuse into qkv [2]"]
    assert all(r["shape"] for r in rows)


def test_gpt2_conv1d_is_transposed(tiny):
    src, ckpt = tiny["GPT2LMHeadModel"]
    from safetensors.torch import load_file

    hf = load_file(src / "model.safetensors")
    _, ours = nbtrt.checkpoint.load_checkpoint(ckpt)
    torch.testing.assert_close(ours["layers.1.mlp.up.weight"], hf["transformer.h.1.mlp.c_fc.weight"].t())


def test_unsupported_architecture_lists_supported(tmp_path, tiny):
    src, _ = tiny["LlamaForCausalLM"]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        nbtrt.convert(bad, tmp_path / "out")
    for name in ARCHITECTURES:
        assert name in str(e.value)
    assert not (tmp_path / "out").exists()


def test_remote_code_is_refused(tmp_path, tiny):
    src, _ = tiny["LlamaForCausalLM"]
    bad = tmp_path / "remote"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "modeling_evil.py").write_text("raise SystemExit('executed remote code')\n")
    with pytest.raises(ArtifactError, match="config.json has 'auto_map'.*trust_remote_code"):
        nbtrt.convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(tmp_path, tiny):
    src, _ = tiny["Qwen3ForCausalLM"]
    bad = tmp_path / "trunc"
    shutil.copytree(src, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        nbtrt.convert(bad, tmp_path / "out")
    (bad / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="no model.safetensors"):
        nbtrt.convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_broken_checkpoint_config_is_a_clear_error(tmp_path, tiny):
    from nbtrt.config import load_checkpoint_config

    _, ckpt = tiny["LlamaForCausalLM"]
    assert ckpt.stat().st_mode & 0o755 == 0o755  # an ordinary directory, not mkdtemp's private 0700
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    text = (bad / "config.json").read_text()
    (bad / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match=r"config\.json is not valid JSON"):
        load_checkpoint_config(bad)
    cfg = json.loads(text)
    del cfg["decoder"]["num_layers"], cfg["decoder"]["hidden_size"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match=r"lacks \['hidden_size', 'num_layers'\]|lacks \['num_layers', 'hidden_size'\]"):
        nbtrt.load(nbtrt.build(bad, tmp_path / "engine", backend="torch"))
    assert not (tmp_path / "engine").exists()


def test_shape_that_does_not_match_config(tmp_path, tiny):
    src, _ = tiny["LlamaForCausalLM"]
    bad = tmp_path / "shape"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 128  # weights were saved with 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match=r"layers\.0\.mlp\.(gate|up|down)\.weight has shape"):
        nbtrt.convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("drop", ["rope_theta", "llama3_factor"])
def test_missing_rope_parameter_is_an_error(tmp_path, tiny, drop):
    src, _ = tiny["LlamaForCausalLM"]
    bad = tmp_path / "rope"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    cfg.pop("rope_theta", None)
    if drop == "rope_theta":
        rope.pop("rope_theta", None)
    else:
        rope.pop("factor", None)
        (cfg.get("rope_scaling") or {}).pop("factor", None)
    cfg["rope_parameters"] = rope
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="rope_theta" if drop == "rope_theta" else "factor"):
        nbtrt.convert(bad, tmp_path / "out")


def test_existing_output_needs_overwrite(tmp_path, tiny):
    src, _ = tiny["Qwen2ForCausalLM"]
    out = tmp_path / "ckpt"
    nbtrt.convert(src, out)
    before = (out / "rank0.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite=True"):
        nbtrt.convert(src, out)
    assert (out / "rank0.safetensors").stat().st_mtime_ns == before
    nbtrt.convert(src, out, overwrite=True, dtype="bfloat16")
    cfg, tensors = nbtrt.checkpoint.load_checkpoint(out)
    assert cfg.dtype == "bfloat16" and tensors["embed.tok.weight"].dtype == torch.bfloat16


def test_engine_rejects_changed_files(tmp_path, tiny):
    _, ckpt = tiny["Qwen2ForCausalLM"]
    edir = nbtrt.build(ckpt, tmp_path / "engine", backend="torch", max_seq_len=64, max_input_len=32)
    with open(edir / "config.json", "a") as f:
        f.write(" ")
    with pytest.raises(ArtifactError, match="does not match engine.json"):
        nbtrt.load(edir)


def test_build_limits_are_checked(tmp_path, tiny):
    _, ckpt = tiny["Qwen2ForCausalLM"]
    with pytest.raises(ValueError, match="max_input_len"):
        nbtrt.build(ckpt, tmp_path / "e", backend="torch", max_input_len=128, max_seq_len=64)
    assert not (tmp_path / "e").exists()
