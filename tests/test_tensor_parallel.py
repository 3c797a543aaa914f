"""Tensor parallelism on Gloo (CPU): TP=2 and TP=4 ranks, one process each, against the unsharded decoder.

Every architecture's tiny model runs in the same launch (one per world size): starting ranks (an
interpreter importing torch each) is what costs time here. Each launch has a deadline, so a stuck
collective fails instead of hanging.
"""
import pytest
import torch

import nbtrt
from nbtrt._io import ArtifactError
from nbtrt.checkpoint import load_checkpoint
from nbtrt.config import DecoderConfig
from nbtrt.model import decoder_from_tensors
from nbtrt.parallel import (RankEngine, generate_greedy, load_rank_tensors, prefill_logits, rank_config,
                            run_tensor_parallel, shard_checkpoint)
from nbtrt.testing import TINY, tiny_hf_model

ARCHS = list(TINY)
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {arch: nbtrt.convert(tiny_hf_model(arch, root / f"{arch}-hf"), root / arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def prompts():
    # ids spread over the whole vocabulary, so every rank's slice of the embedding is looked up;
    # the second prompt is shorter, so the batch is left-padded
    ids = torch.randint(0, 257, (2, 7), generator=torch.Generator().manual_seed(0)).tolist()
    return [ids[0], ids[1][:4]]


@pytest.fixture(scope="module")
def references(checkpoints, prompts):
    out = {}
    for arch, ckpt in checkpoints.items():
        model = decoder_from_tensors(*load_checkpoint(ckpt))
        engine = RankEngine(model, max_seq_len=len(prompts[0]) + NEW_TOKENS)  # plain decoder: TP=1
        out[arch] = prefill_logits(model, prompts), torch.tensor(generate_greedy(engine, prompts, NEW_TOKENS))
    return out


def _check_against_tp1(results, references, world):
    for arch, result in zip(ARCHS, results):
        logits, tokens = references[arch]
        diff = (result["logits"] - logits).abs()
        assert torch.allclose(result["logits"], logits, rtol=1e-5, atol=1e-5), (
            f"{arch} TP={world}: logits differ from TP=1, max {diff.max():.3g} mean {diff.mean():.3g}")
        assert result["tokens"].tolist() == tokens.tolist(), f"{arch} TP={world}: greedy tokens differ from TP=1"


def test_tp2_sharded_checkpoints_match_tp1(checkpoints, prompts, references, tmp_path):
    sharded = {arch: shard_checkpoint(ckpt, tmp_path / f"{arch}-tp2", tensor_parallel_size=2)
               for arch, ckpt in checkpoints.items()}
    assert sorted(p.name for p in sharded["LlamaForCausalLM"].glob("rank*.safetensors")) == [
        "rank0.safetensors", "rank1.safetensors"]
    jobs = [{"checkpoint": sharded[a], "input_ids": prompts, "max_new_tokens": NEW_TOKENS} for a in ARCHS]
    _check_against_tp1(run_tensor_parallel(jobs, 2, timeout_s=120), references, 2)


@pytest.mark.slow  # 4 interpreters importing torch at once: ~50 s on a loaded 2-core machine
def test_tp4_sharded_at_load_matches_tp1(checkpoints, prompts, references):
    # 2 KV heads over 4 ranks: each KV head is copied to the two ranks whose query heads read it
    jobs = [{"checkpoint": checkpoints[a], "input_ids": prompts, "max_new_tokens": NEW_TOKENS} for a in ARCHS]
    _check_against_tp1(run_tensor_parallel(jobs, 4, timeout_s=120), references, 4)


def test_tp2_checkpoint_refused_at_tp4(checkpoints, tmp_path):
    tp2 = shard_checkpoint(checkpoints["Qwen2ForCausalLM"], tmp_path / "tp2", tensor_parallel_size=2)
    with pytest.raises(ArtifactError, match=r"sharded for tensor_parallel_size=2 but tensor_parallel_size=4"):
        load_rank_tensors(tp2, world=4, rank=0)
    with pytest.raises(ArtifactError, match=r"sharded for tensor_parallel_size=2"):
        load_checkpoint(tp2)  # the single-device loader names the sharding instead of a shape mismatch
    cfg, part = load_rank_tensors(tp2, world=2, rank=1, verify_hash=True)
    assert part["embed.tok.weight"].shape[0] == rank_config(cfg, 2).vocab_size == 129


def test_wrong_checkpoints_are_refused_before_any_rank_starts(checkpoints, tmp_path):
    with pytest.raises(ArtifactError, match="config.json is missing"):
        run_tensor_parallel([{"checkpoint": tmp_path / "missing", "input_ids": [[1]], "max_new_tokens": 1}], 2)
    tp2 = shard_checkpoint(checkpoints["GPT2LMHeadModel"], tmp_path / "tp2", tensor_parallel_size=2)
    with pytest.raises(ArtifactError, match="sharded for tensor_parallel_size=2 but tensor_parallel_size=4"):
        run_tensor_parallel([{"checkpoint": tp2, "input_ids": [[1]], "max_new_tokens": 1}], 4)


def test_a_rank_past_its_deadline_is_stopped_not_waited_for(checkpoints):
    job = {"checkpoint": checkpoints["Qwen2ForCausalLM"], "input_ids": [[1, 2]], "max_new_tokens": 1}
    with pytest.raises(RuntimeError, match="no result within 0 s"):
        run_tensor_parallel([job], 2, timeout_s=0.2)  # the ranks are still importing torch


@pytest.mark.slow
def test_a_failing_rank_is_reported_not_hung(checkpoints):
    job = {"checkpoint": checkpoints["Qwen2ForCausalLM"], "input_ids": [[1, 300]], "max_new_tokens": 1}
    with pytest.raises(RuntimeError, match=r"(?s)rank 0 failed.*outside the vocabulary \[0, 257\): \[300\]"):
        run_tensor_parallel([job], 2, timeout_s=60)


def test_sizes_that_do_not_divide_and_quantized_checkpoints_are_refused():
    cfg = DecoderConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=96,
                        num_layers=1, num_heads=4, num_kv_heads=2, rope_theta=1e4)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide num_heads=4.*\[1, 2, 4\]"):
        rank_config(cfg, 3)
    cfg.quantization = {"layout_version": 1, "format": "int8_wo", "layers": ["layers.0.mlp.up"]}
    with pytest.raises(ValueError, match="quantized \\(int8_wo\\).*shard the float checkpoint"):
        rank_config(cfg, 2)
