"""Tensor parallelism on Gloo (CPU): TP=2 and TP=4 ranks, one process each, against the unsharded decoder.

Every architecture's tiny model runs in the same launch (one per world size): starting ranks (an
interpreter importing torch each) is what costs time here. Each launch has a deadline, so a stuck
collective fails instead of hanging. The second half drives long-lived ranks through
``TensorParallelEngine``: ``nbtrt.LLM(tensor_parallel_size=2)``, the debugger, ``nbtrt serve``.
"""
import os
import signal
import subprocess
import sys
import tempfile
import time

import openai
import pytest
import torch
import torch.nn.functional as F

import nbtrt
from nbtrt._io import ArtifactError
from nbtrt.checkpoint import load_checkpoint
from nbtrt.config import DecoderConfig
from nbtrt.debug import KINDS, compare
from nbtrt.generate import SamplingParams, generate_tokens
from nbtrt.model import decoder_from_tensors
from nbtrt.parallel import (RankEngine, TensorParallelEngine, generate_greedy, join_outputs, load_rank_tensors,
                            prefill_logits, rank_config, run_tensor_parallel, shard_checkpoint, shard_tensors)
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
    _check_against_tp1(run_tensor_parallel(jobs, 2), references, 2)  # default deadline (300 s): a hang guard


@pytest.mark.slow  # 4 interpreters importing torch at once: ~50 s on a loaded 2-core machine
def test_tp4_sharded_at_load_matches_tp1(checkpoints, prompts, references):
    # 2 KV heads over 4 ranks: each KV head is copied to the two ranks whose query heads read it
    jobs = [{"checkpoint": checkpoints[a], "input_ids": prompts, "max_new_tokens": NEW_TOKENS} for a in ARCHS]
    _check_against_tp1(run_tensor_parallel(jobs, 4), references, 4)


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


# ---------------------------------------------------------------------------- long-lived ranks
TP_ARCH = "Qwen3ForCausalLM"  # 4 heads, 2 KV heads, q/k norms: per-head captures are gathered too
PROMPTS = [[5, 17, 200, 3, 99, 250, 1], [42, 7], [128, 129, 130, 131]]  # three lengths: left padding


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def tp_work(tmp_path_factory):
    return tmp_path_factory.mktemp("tp-llm")


@pytest.fixture(scope="module")
def tp_llms(checkpoints, tp_work):
    """nbtrt.LLM over 2 ranks (the checkpoint sharded once into its work dir) and the TP=1 LLM of the same
    checkpoint, both with static batches through the shared generation loop."""
    options = dict(max_batch_size=4, max_seq_len=64, work_dir=tp_work, verbose=False)
    with nbtrt.LLM(checkpoints[TP_ARCH], tensor_parallel_size=2, **options) as tp, \
            nbtrt.LLM(checkpoints[TP_ARCH], batching="static", **options) as one:
        yield tp, one


def _ids(outputs):
    return [(o.token_ids, o.finish_reason) for o in outputs]


def test_llm_tp2_generates_what_tp1_generates(tp_llms, tp_work):
    tp, one = tp_llms
    assert "tensor_parallel_size=2" in repr(tp) and "static batches" in repr(tp)
    assert "tensor_parallel_size=2" in repr(tp.engine) and "static batches" in repr(tp.engine)
    assert len(list(tp_work.glob("ckpt-tp2-*/rank*.safetensors"))) == 2  # sharded once, each rank reads its file
    greedy = one.generate(PROMPTS, one.sampling(max_new_tokens=6, do_sample=False), use_tqdm=False)
    assert _ids(tp.generate(PROMPTS, tp.sampling(max_new_tokens=6, do_sample=False), use_tqdm=False)) == _ids(greedy)
    # a stop token met by the first prompt mid-answer, and each request its own max_new_tokens
    stop = greedy[0].token_ids[2]
    mixed = [one.sampling(max_new_tokens=6, do_sample=False, stop_token_ids=[stop]),
             one.sampling(max_new_tokens=3, do_sample=False), one.sampling(max_new_tokens=8, do_sample=False)]
    want = one.generate(PROMPTS, mixed, use_tqdm=False)
    assert want[0].finish_reason == "stop" and len(want[0].token_ids) <= 3
    assert _ids(tp.generate(PROMPTS, mixed, use_tqdm=False)) == _ids(want)
    # seeded sampling: the caller's process samples, from logits equal to TP=1's (within 1e-6)
    sampled = one.sampling(max_new_tokens=8, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, seed=1234)
    want = one.generate(PROMPTS, sampled, use_tqdm=False)
    assert _ids(tp.generate(PROMPTS, sampled, use_tqdm=False)) == _ids(want)
    assert _ids(want) != _ids(greedy)  # it did sample


def test_debugger_compares_a_tp2_engine_with_hf_layer_by_layer(tp_llms, checkpoints):
    tp, one = tp_llms
    hf = checkpoints[TP_ARCH].parent / f"{TP_ARCH}-hf"
    report = compare(hf, tp.engine, input_ids=[PROMPTS[0]], kinds=KINDS, threshold="fp32")
    assert report.first_divergence is None, report.summary()
    assert {t.kind for t in report.tensors} == set(KINDS)  # q/k/v: slices of the gathered fused projection
    # what rank 0 gathers (column slices, per-head outputs) has TP=1's names, shapes and values
    names = ["embed", "layers.0.attn.qkv", "layers.0.attn.q_norm", "layers.0.attn.k_norm", "layers.1.mlp.gate",
             "layers.1.mlp.up", "layers.1.attn", "layers.1", "final_norm", "lm_head"]
    logits, got = tp.engine.capture([PROMPTS[0], PROMPTS[0][::-1]], names)
    want_logits, want = one.engine.capture([PROMPTS[0], PROMPTS[0][::-1]], names)
    assert list(got) == names and {n: t.shape for n, t in got.items()} == {n: t.shape for n, t in want.items()}
    for n in names:
        assert torch.allclose(got[n], want[n], atol=1e-5), f"{n}: max diff {(got[n] - want[n]).abs().max():.3g}"
    assert torch.allclose(logits, want_logits, atol=1e-5)
    with pytest.raises(KeyError, match="no module named"):
        tp.engine.capture([[1, 2]], ["layers.9.mlp"])


def test_join_outputs_inverts_the_split_with_copied_kv_heads(checkpoints):
    cfg, tensors = load_checkpoint(checkpoints[TP_ARCH])  # 2 KV heads over 4 ranks: each held by two
    x = torch.randn(2, 3, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    parts = [shard_tensors(cfg, tensors, 4, r) for r in range(4)]
    for name in ("layers.0.attn.qkv", "layers.1.mlp.up"):
        whole = F.linear(x, tensors[name + ".weight"], tensors.get(name + ".bias"))
        per_rank = [F.linear(x, p[name + ".weight"], p.get(name + ".bias")) for p in parts]
        assert torch.allclose(join_outputs(cfg, name, per_rank), whole, atol=1e-6), name


def test_llm_tp_options_refused_before_any_rank_starts(checkpoints, tp_work):
    ckpt = checkpoints[TP_ARCH]
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=r"tensor_parallel_size=.* must be an integer >= 1"):
            nbtrt.LLM(ckpt, tensor_parallel_size=bad, work_dir=tp_work)
    with pytest.raises(ValueError, match="in-flight batching over the paged KV cache is not built"):
        nbtrt.LLM(ckpt, tensor_parallel_size=2, batching="inflight", work_dir=tp_work)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide num_heads=4"):
        nbtrt.LLM(ckpt, tensor_parallel_size=3, work_dir=tp_work)


def test_llm_shutdown_stops_every_rank(checkpoints, tp_work):
    llm = nbtrt.LLM(checkpoints[TP_ARCH], tensor_parallel_size=2, max_batch_size=2, max_seq_len=32, work_dir=tp_work,
                    verbose=False)
    pids, tmp = llm.engine.pids, llm.engine._ranks.tmp
    assert all(map(_alive, pids)) and tmp.is_dir()
    llm.generate([[1, 2, 3]], llm.sampling(max_new_tokens=2), use_tqdm=False)
    llm.shutdown()
    assert not any(map(_alive, pids)) and not tmp.exists()
    with pytest.raises(RuntimeError, match="closed"):
        llm.engine.generate(input_ids=[[1, 2, 3]], max_new_tokens=2)


def test_a_rank_killed_mid_request_is_an_error_not_a_hang(checkpoints):
    engine = TensorParallelEngine(checkpoints[TP_ARCH], 2, max_seq_len=64, timeout_s=60)
    pids = engine.pids
    steps = generate_tokens(engine, [[1, 2, 3]], SamplingParams(max_new_tokens=32))
    next(steps)  # the ranks hold the request's KV cache
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 exited \(killed by SIGKILL\).*every rank is stopped"):
        list(steps)
    assert time.monotonic() - start < 20
    assert not any(map(_alive, pids))
    with pytest.raises(RuntimeError, match=r"rank 1 exited"):  # the engine stays failed, and says why
        engine.generate(input_ids=[[1, 2, 3]], max_new_tokens=2)
    engine.close()


def test_ranks_past_their_start_deadline_are_stopped(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the engine's directory goes
    with pytest.raises(RuntimeError, match=r"no answer before the deadline, during 'start'; every rank is stopped"):
        TensorParallelEngine(checkpoints[TP_ARCH], 2, max_seq_len=32, timeout_s=0.2)  # still importing torch
    assert list(tmp_path.iterdir()) == []  # the ranks' directory is gone with them


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:  # gone meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


@pytest.mark.slow  # the server, then two ranks, each a fresh interpreter
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_nbtrt_serve_tp2_answers_a_completion(checkpoints, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "NBTRT_CACHE": str(tmp_path)}
    p = subprocess.Popen([sys.executable, "-m", "nbtrt.cli", "serve", str(checkpoints[TP_ARCH]), "--port", "0",
                          "--tensor-parallel-size", "2", "--max-batch-size", "2", "--max-seq-len", "64",
                          "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while " at http://127.0.0.1:" not in (line := p.stdout.readline()):
            lines.append(line)
            assert line or p.poll() is None, (lines, p.stderr.read())
        url = line.split(" at ")[1].split()[0]
        ranks = _children(p.pid)
        assert len(ranks) == 2
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        r = client.completions.create(model=client.models.list().data[0].id, prompt=[1, 2, 3], max_tokens=4,
                                      temperature=0)
        assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 0, p.stderr.read()
    assert not any(map(_alive, ranks))
