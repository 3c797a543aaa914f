"""Seeded fuzz of the public generation API (generate, stream, sampling, ChatSession.send) on both
CPU backends: sampling options and prompts drawn from valid values and from weird ones (wrong
types, bools, NaN/inf, huge numbers, empty, lone surrogates, unicode). Every case either gives a
correct result or raises a GenerationError that names what was wrong; no other exception escapes.

Each case changes at most one thing from the valid pools, so the test knows which option an error
must name. Greedy results are checked against the engine's own plain greedy answer (cut at the
stop ids and at max_new_tokens), so an option that is accepted must also be applied correctly.
"""
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest

import nbtrt
import nbtrt.runtimes  # noqa: F401  (registers every backend)
from nbtrt._io import copy_tokenizer_files
from nbtrt.chat import ChatSession
from nbtrt.engine import BACKENDS
from nbtrt.generate import GenerationError
from nbtrt.testing import tiny_hf_model

CPU_BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(BACKENDS[name].available() is not None,
                                                            reason=f"{name}: {BACKENDS[name].available()}"))
                for name in ("onnxruntime", "torch")]
CASES = 120  # per backend: well under a minute for both

# option -> (valid values, invalid values); None means "not given" and is always valid
OPTIONS = {
    "max_new_tokens": ([1, 3, 8, np.int64(5)], [0, -1, 2.5, "8", True, math.nan, 10**12, 2**70]),
    "temperature": ([0, 0.0, 0.7, 1.0, 1e-8, 1e4, np.float32(0.5)], [-1, math.inf, math.nan, "hot", True, [1.0]]),
    "top_k": ([0, 1, 5, 10**9], [-1, 2.5, "5", math.nan, True]),
    "top_p": ([1.0, 0.5, 1e-9, 0.999], [0, 1.5, -0.1, math.nan, "0.9", math.inf]),
    "repetition_penalty": ([1.0, 1.3, 1e-6, 1e6], [0, -1, math.inf, math.nan, "1"]),
    "seed": ([None, 0, 7, 2**63, np.int64(3)], [-1, "abc", 2.5, 2**64, True]),
    "do_sample": ([None, True, False], ["yes", 1]),
    "stop_token_ids": ([None, [], [5, 6], (2,), 7], ["ab", [1.5], [-1], [10**9], 2.5, [True], {"a": 1}]),
    "stop_strings": ([None, [], ["the"], ["\n", "ab"], "x", ["日本"]], [[""], [5], ["\ud800"], 5, [None]]),
}
TEXTS = (["Hello", "日本語のテキスト 🤖", "  two  spaces ", "a\nb\tc", "<|im_end|> typed", "x" * 10],
         ["", "\ud800abc", None, 5, b"bytes", "word " * 100])
IDS = ([[[1, 2, 3]], [[40, 41]], [[1, 2, 3], [40, 41]]], [[], [[]], [[-1]], [[10**9]], [[1.5]], [["a"]], [1, 2, 3],
                                                          [[True]]])
# what an error about the prompt itself says, per entry point
PROMPT_WORDS = {"generate": ("prompt", "input_ids"), "generate_ids": ("prompt", "input_ids"),
                "stream": ("prompt",), "chat": ("message", "conversation")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    src = tiny_hf_model("LlamaForCausalLM", root / "hf", vocab_size=49152)
    copy_tokenizer_files(nbtrt.zoo.get("smollm2-135m-instruct"), src)
    return SimpleNamespace(root=root, ckpt=nbtrt.convert(src, root / "ckpt"))


def draw_case(rng: random.Random) -> dict:
    """One call: an entry point, a prompt, options; at most one of them from an invalid pool."""
    api = rng.choice(["generate", "generate_ids", "stream", "chat", "sampling"])
    bad = rng.choice([None, None, "prompt"] + list(OPTIONS))  # what this case gets wrong, if anything
    if api == "sampling" and bad == "prompt":
        bad = None
    options = {}
    for name, (good, wrong) in OPTIONS.items():
        if rng.random() < 0.5 or name == bad or name == "max_new_tokens":
            options[name] = rng.choice(wrong if name == bad else good)
    pool = IDS if api == "generate_ids" else TEXTS
    prompt = rng.choice(pool[1] if bad == "prompt" else pool[0])
    return dict(api=api, bad=bad, prompt=prompt, options=options)


def call(engine, case: dict):
    api, prompt, options = case["api"], case["prompt"], case["options"]
    if api == "generate":
        return engine.generate([prompt] if isinstance(prompt, str) else prompt, **options)
    if api == "generate_ids":
        return engine.generate(input_ids=prompt, **options)
    if api == "stream":
        return "".join(engine.stream(prompt, **options))
    if api == "chat":
        return "".join(ChatSession(engine).send(prompt, **options))
    return engine.sampling(**options)


def expected_greedy(engine, case: dict, reference: dict) -> list[int] | None:
    """The tokens a greedy case must give: the plain greedy answer, cut at a stop id and at
    max_new_tokens (None where the case does not pin them down: sampling, penalties, stop strings)."""
    params = engine.sampling(**case["options"])
    if not params.greedy or params.repetition_penalty != 1.0 or params.stop_strings:
        return None
    tokens = reference[tuple(case["prompt"][0])][:params.max_new_tokens]
    stops = [i for i, t in enumerate(tokens) if t in params.stop_token_ids]
    return tokens[:stops[0] + 1] if stops else tokens


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_case_is_a_correct_result_or_a_generation_error_naming_the_option(tiny, backend):
    engine = nbtrt.load(nbtrt.build(tiny.ckpt, tiny.root / f"engine-{backend}", backend=backend, max_batch_size=2,
                                    max_input_len=64, max_seq_len=128))
    reference = {tuple(p): engine.generate(input_ids=[p], max_new_tokens=8, stop_token_ids=[])[0]
                 for batch in IDS[0] for p in batch}
    rng = random.Random(f"nbtrt-fuzz-{backend}")
    outcomes = {"ok": 0, "refused": 0}
    for i in range(CASES):
        case = draw_case(rng)
        where = f"case {i}: {case}"
        try:
            result = call(engine, case)
        except GenerationError as e:
            assert case["bad"] is not None, f"{where}: a valid request was refused: {e}"
            words = PROMPT_WORDS[case["api"]] if case["bad"] == "prompt" else (case["bad"],)
            if case["bad"] == "stop_strings":
                words = ("stop_strings", "stop string")
            assert any(w in str(e) for w in words), f"{where}: the error does not name {words}: {e}"
            outcomes["refused"] += 1
            continue
        except Exception as e:  # anything else escaping the public API is the bug this test hunts
            pytest.fail(f"{where}: {type(e).__name__} escaped: {e}")
        assert case["bad"] is None, f"{where}: accepted, but it is invalid"
        outcomes["ok"] += 1
        if case["api"] == "generate":
            assert isinstance(result, list) and len(result) == 1 and isinstance(result[0], str), where
        elif case["api"] in ("stream", "chat"):
            assert isinstance(result, str), where
        elif case["api"] == "generate_ids":
            assert isinstance(result, list) and len(result) == len(case["prompt"]), where
            limit = engine.sampling(**case["options"]).max_new_tokens
            for tokens in result:
                assert len(tokens) <= limit and all(0 <= t < engine.config.vocab_size for t in tokens), where
            if len(case["prompt"]) == 1:
                want = expected_greedy(engine, case, reference)
                assert want is None or result[0] == want, f"{where}: {result[0]} != greedy {want}"
    assert outcomes["ok"] > 20 and outcomes["refused"] > 20, outcomes  # both sides were exercised
