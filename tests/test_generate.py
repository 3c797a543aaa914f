"""The generation loop: greedy parity with HF generate (both zoo models, every backend),
sampling rules, EOS and stop strings, streamed text, timing, cancellation and bad input."""
import json
import shutil
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import nbtrt
import nbtrt.runtimes  # noqa: F401  (registers every backend)
from nbtrt._io import copy_tokenizer_files
from nbtrt.chat import apply_chat_template
from nbtrt.engine import BACKENDS
from nbtrt.generate import Detokenizer, GenerationError, GenerationStats, SamplingParams, next_tokens, top_p_filter
from nbtrt.testing import tiny_hf_model

ENGINES = [pytest.param(name, marks=pytest.mark.skipif(BACKENDS[name].available() is not None,
                                                       reason=f"{name}: {BACKENDS[name].available()}"))
           for name in sorted(BACKENDS)]
ZOO = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]


def hf_greedy(model, ids, max_new_tokens, **kwargs):
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, len(ids):].tolist()


def first_divergence(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ---------------------------------------------------------------------------- zoo models vs HF
@pytest.fixture(scope="module", params=ZOO)
def zoo_model(request, tmp_path_factory):
    """One converted checkpoint and HF's greedy answers (each prompt alone) per zoo model."""
    src = nbtrt.zoo.get(request.param)
    root = tmp_path_factory.mktemp(request.param)
    ckpt = nbtrt.convert(src, root / "ckpt")
    tok = AutoTokenizer.from_pretrained(src)
    prompts = [
        apply_chat_template(tok, [{"role": "user", "content": "Write a haiku about the sea."}]),  # ChatML
        tok("The capital of France is")["input_ids"],
        tok('def fibonacci(n):\n    """Return the n-th Fibonacci number, iteratively."""\n')["input_ids"],
    ]
    gen = json.loads((src / "generation_config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    expected = [hf_greedy(hf, p, 64, eos_token_id=gen["eos_token_id"], pad_token_id=gen["pad_token_id"])
                for p in prompts]
    del hf
    return SimpleNamespace(name=request.param, root=root, ckpt=ckpt, tok=tok, prompts=prompts, expected=expected)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ENGINES)
def test_greedy_matches_hf_generate(zoo_model, backend):
    z = zoo_model
    assert len({len(p) for p in z.prompts}) == 3
    engine = nbtrt.load(nbtrt.build(z.ckpt, z.root / f"engine-{backend}", backend=backend, max_batch_size=3,
                                    max_input_len=64, max_seq_len=128))
    # one prompt alone (the chat prompt), streamed
    stats = GenerationStats()
    text = "".join(engine.stream(z.prompts[0], max_new_tokens=64, stats=stats))
    assert text == z.tok.decode(z.expected[0], skip_special_tokens=True), f"{z.name}/{backend}: chat prompt"
    assert stats.new_tokens == len(z.expected[0])
    # the three prompts as one left-padded batch
    got = engine.generate(input_ids=z.prompts, max_new_tokens=64)
    for i, (ours, ref) in enumerate(zip(got, z.expected)):
        assert ours == ref, f"{z.name}/{backend} prompt {i}: first divergence at token {first_divergence(ours, ref)}"


# ---------------------------------------------------------------------------- tiny model, real tokenizer
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-weight Llama with SmolLM2's real tokenizer (49152 ids, ChatML): fast, and its
    random text is full of multi-byte pieces and odd spacing."""
    root = tmp_path_factory.mktemp("tiny")
    src = tiny_hf_model("LlamaForCausalLM", root / "hf", vocab_size=49152)
    copy_tokenizer_files(nbtrt.zoo.get("smollm2-135m-instruct"), src)
    return SimpleNamespace(root=root, src=src, ckpt=nbtrt.convert(src, root / "ckpt"))


@pytest.fixture(scope="module", params=ENGINES)
def engine(request, tiny):
    return nbtrt.load(nbtrt.build(tiny.ckpt, tiny.root / f"engine-{request.param}", backend=request.param,
                                  max_batch_size=4, max_input_len=64, max_seq_len=128))


PROMPTS = ["Hello there", "The capital of France is", "日本語のテキスト"]


@pytest.fixture(scope="module")
def greedy(engine):
    """Reference greedy outputs of this engine, computed once before anything else touches it."""
    return {p: engine.generate(input_ids=[engine.encode(p)], max_new_tokens=24)[0] for p in PROMPTS}


def test_seeded_sampling_is_reproducible(engine):
    opts = dict(max_new_tokens=24, temperature=1.0, top_k=0)
    a = engine.generate(PROMPTS, seed=7, **opts)
    assert engine.generate(PROMPTS, seed=7, **opts) == a
    assert engine.generate(PROMPTS, seed=8, **opts) != a


def test_top_k_1_equals_greedy(engine, greedy):
    for p in PROMPTS:
        sampled = engine.generate(input_ids=[engine.encode(p)], max_new_tokens=24, do_sample=True,
                                  temperature=1.5, top_k=1, seed=3)
        assert sampled[0] == greedy[p]


def numpy_nucleus(logits: np.ndarray, p: float) -> set[int]:
    """The top-p rule written out: the smallest set of top tokens whose probability sum reaches p."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    k = int(np.searchsorted(np.cumsum(probs[order]), p)) + 1
    return set(order[:k].tolist())


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.9, 0.999])
def test_top_p_filter_matches_numpy(p):
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 2
    kept = torch.isfinite(top_p_filter(logits, p))
    for row in range(logits.shape[0]):
        assert set(torch.nonzero(kept[row]).flatten().tolist()) == numpy_nucleus(logits[row].double().numpy(), p)
    # and the sampler only ever draws from that set
    params = SamplingParams(do_sample=True, top_k=0, top_p=p)
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([next_tokens(logits, params, g) for _ in range(200)], dim=1)
    for row in range(logits.shape[0]):
        assert set(draws[row].tolist()) <= numpy_nucleus(logits[row].double().numpy(), p)


def test_sampling_defaults_follow_generation_config_as_hf():
    gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [2, 0], "pad_token_id": 2}
    ours = SamplingParams.from_generation_config(gen)
    hf = GenerationConfig.from_dict(gen)
    defaults = GenerationConfig._get_default_generation_params()
    for name in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty"):
        theirs = getattr(hf, name)
        assert getattr(ours, name) == (defaults[name] if theirs is None else theirs), name
    assert ours.stop_token_ids == (2, 0)
    assert SamplingParams.from_generation_config(gen, temperature=0).greedy


def test_repetition_penalty_matches_hf(engine, tiny):
    ids = engine.encode("The capital of France is")
    hf = AutoModelForCausalLM.from_pretrained(tiny.src, dtype=torch.float32).eval()
    expected = hf_greedy(hf, ids, 24, repetition_penalty=1.3, eos_token_id=None)
    assert engine.generate(input_ids=[ids], max_new_tokens=24, repetition_penalty=1.3, stop_token_ids=[])[0] == expected


def test_every_eos_id_from_generation_config_stops(engine, tiny, greedy, tmp_path):
    ids_in = engine.encode(PROMPTS[1])
    out = greedy[PROMPTS[1]]
    eos = out[5]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.ckpt, ckpt)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    gen["eos_token_id"] = [49151, eos]  # the second listed id must stop generation too
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    other = nbtrt.load(nbtrt.build(ckpt, tmp_path / "engine", backend=engine.backend, max_input_len=64,
                                   max_seq_len=128))
    got = other.generate(input_ids=[ids_in], max_new_tokens=24)[0]
    assert got == out[:out.index(eos) + 1]
    hf = AutoModelForCausalLM.from_pretrained(tiny.src, dtype=torch.float32).eval()
    assert got == hf_greedy(hf, ids_in, 24, eos_token_id=gen["eos_token_id"])


def test_stop_strings_end_each_sequence(engine, greedy):
    tok = engine.tokenizer
    a, b = (tok.decode(greedy[p], skip_special_tokens=True) for p in PROMPTS[:2])
    stop = next(a[i:i + 4] for i in range(8, len(a) - 4) if a[i:i + 4] not in b and a[i:i + 4].strip())
    stats = GenerationStats()
    got = engine.generate(PROMPTS[:2], max_new_tokens=24, stop_strings=[stop], stats=stats)
    assert got == [a[:a.index(stop)], b]
    assert stats.new_tokens < 48  # sequence 0 stopped early
    assert "".join(engine.stream(PROMPTS[0], max_new_tokens=24, stop_strings=[stop])) == a[:a.index(stop)]


# ---------------------------------------------------------------------------- streaming text
TEXT = "  Héllo wörld — naïve café 日本語のテキスト 🤖👩‍👩‍👧  two  spaces\n\tand a tab, ünïcödé, Ελληνικά, русский."


@pytest.mark.parametrize("name", ZOO)
def test_detokenizer_deltas_concatenate_to_full_decode(name):
    tok = AutoTokenizer.from_pretrained(nbtrt.zoo.get(name))
    ids = tok(TEXT, add_special_tokens=False)["input_ids"] * 8  # long enough to show the window stays short
    windows = []

    class Counting:  # the real tokenizer, counting how many ids each decode sees
        def decode(self, ids, **kw):
            windows.append(len(ids))
            return tok.decode(ids, **kw)

    d = Detokenizer(Counting())
    deltas = [d.add(t) for t in ids] + [d.flush()]
    assert "".join(deltas) == tok.decode(ids) == TEXT * 8
    assert not any("\ufffd" in x for x in deltas)
    assert max(windows) <= 8, "decodes a short window, not everything so far"
    assert any(x.startswith(" ") for x in deltas)  # leading spaces arrive with their word


def test_stream_equals_full_decode_and_reports_timing(engine):
    opts = dict(max_new_tokens=48, temperature=1.2, top_k=0, seed=11)  # random text: many split characters
    ids = engine.encode("日本語")
    tokens = engine.generate(input_ids=[ids], **opts)[0]
    stats = GenerationStats()
    deltas = list(engine.stream(ids, stats=stats, **opts))
    assert "".join(deltas) == engine.tokenizer.decode(tokens, skip_special_tokens=True)
    assert len(deltas) > 10
    assert stats.new_tokens == len(tokens) and stats.prompt_tokens == len(ids)
    assert 0 < stats.ttft_s <= stats.total_s and stats.tokens_per_s > 0
    assert "TTFT" in stats.summary()


# ---------------------------------------------------------------------------- cancellation
def test_cancel_stops_within_one_step_and_engine_recovers(engine, greedy):
    cancel, seen_three, stats, cancelled_at = threading.Event(), threading.Event(), GenerationStats(), []
    out: list[str] = []

    def consume():
        for delta in engine.stream("Hello there", cancel=cancel, stats=stats, max_new_tokens=120,
                                   temperature=1.0, top_k=0, seed=0):
            out.append(delta)
            if len(stats.step_times) >= 3:
                seen_three.set()

    worker = threading.Thread(target=consume)
    worker.start()
    assert seen_three.wait(60)
    cancelled_at.append(time.perf_counter())
    cancel.set()
    worker.join(30)
    assert not worker.is_alive()
    after = [t for t in stats.step_times if t > cancelled_at[0]]
    assert len(after) <= 1, f"{len(after)} steps ran after cancel"
    assert len(stats.step_times) < 120
    # the next request starts clean
    p = PROMPTS[2]
    assert engine.generate(input_ids=[engine.encode(p)], max_new_tokens=24)[0] == greedy[p]


def test_unfinished_stream_in_same_thread_is_a_clear_error(engine, greedy):
    s = engine.stream("Hello there", max_new_tokens=8)
    next(s)
    with pytest.raises(GenerationError, match="unfinished stream"):
        engine.generate(["Hi"], max_new_tokens=2)
    with pytest.raises(GenerationError, match="unfinished stream"):  # a capture would replace the stream's cache
        engine.capture([engine.encode("Hi")], ["layers.0"])
    s.close()
    p = PROMPTS[0]
    assert engine.generate(input_ids=[engine.encode(p)], max_new_tokens=24)[0] == greedy[p]


# ---------------------------------------------------------------------------- bad input
BAD = [
    (dict(prompts=[""]), "empty"),
    (dict(prompts=[123]), "must be a string, got int"),
    (dict(input_ids=[list(range(65))]), "max_input_len=64"),
    (dict(prompts=["Hi"] * 5), "max_batch_size=4"),
    (dict(prompts=["Hi"], max_new_tokens=200), "max_seq_len=128"),
    (dict(prompts=["Hi"], max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=["Hi"], temperature=-1.0), "temperature"),
    (dict(prompts=["Hi"], top_p=0.0, do_sample=True), "top_p"),
    (dict(input_ids=[[1, 2, 10**9]]), "outside the vocabulary"),
    (dict(input_ids=[1, 2, 3]), r"must be a batch: a list of token-id lists, e.g. \[\[1, 2, 3\]\]"),
    (dict(input_ids=[["Hi"]]), r"outside the vocabulary .*\['Hi'\]"),
]


def test_bad_input_gives_clear_errors_and_leaves_engine_usable(engine, greedy):
    for kwargs, message in BAD:
        with pytest.raises(GenerationError, match=message):
            engine.generate(**kwargs)
    with pytest.raises(GenerationError, match="max_input_len"):
        engine.stream(list(range(1, 66)))
    with pytest.raises(TypeError, match="unknown generation options"):
        engine.generate(["Hi"], temprature=0.5)
    p = PROMPTS[1]
    assert engine.generate(input_ids=[engine.encode(p)], max_new_tokens=24)[0] == greedy[p]


# ---------------------------------------------------------------------------- queueing the next step
def test_steps_queued_ahead_give_the_same_tokens_and_one_dropped_step_at_a_stop(engine, greedy, monkeypatch):
    """Where step() only queues work (CUDA), the loop queues step i+1 before it reads step i's
    tokens. Forced on here, where each step runs at once: the same tokens under every rule, and
    a sequence that stops costs exactly one more (dropped) step."""
    ids = engine.encode(PROMPTS[1])
    out = greedy[PROMPTS[1]]
    eos = out[5]
    stops_at = out.index(eos)
    cases = [dict(input_ids=[ids], max_new_tokens=24, stop_token_ids=[eos]),
             dict(prompts=PROMPTS, max_new_tokens=16, temperature=1.0, top_k=0, seed=5, repetition_penalty=1.2),
             dict(prompts=PROMPTS[:2], max_new_tokens=16, stop_strings=[engine.tokenizer.decode(out[3:5])])]
    steps, real_step = [], engine.step

    def counted_step(input_ids, attention_mask):
        steps.append(input_ids.shape[1])
        return real_step(input_ids, attention_mask)

    monkeypatch.setattr(engine, "step", counted_step)
    got, decode_steps = {}, {}
    for ahead in (False, True):
        monkeypatch.setattr(engine, "queues_steps", ahead)
        got[ahead] = [engine.generate(**case) for case in cases]
        steps.clear()
        engine.generate(input_ids=[ids], max_new_tokens=24, stop_token_ids=[eos])
        decode_steps[ahead] = steps.count(1)
    assert got[True] == got[False]
    assert got[True][0][0] == out[:stops_at + 1]
    assert decode_steps == {False: stops_at, True: stops_at + 1}
