"""Issue 27's correctness, validation and hang cases, each on real files: tiny random-weight models
saved by transformers, SmolLM2's real tokenizer, real checkpoints and engine directories.

- end tokens given only in config.json stop generation where transformers stops
- conversion reproduces what transformers computes for a config.json, or refuses naming the field
- values that used to pass validation and break later are refused, naming the option
- an abandoned stream cannot hold the engine; the chat widget's Stop always stops
- ChatSession.send refuses while the previous answer still streams
"""
import gc
import json
import re
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import nbtrt
import nbtrt.runtimes  # noqa: F401  (registers every backend)
from nbtrt._io import copy_tokenizer_files
from nbtrt.chat import ChatSession
from nbtrt.generate import GenerationError, SamplingParams
from nbtrt.mapping import ARCHITECTURES, IRRELEVANT, UnsupportedModelError, _hf_class
from nbtrt.model import load_decoder
from nbtrt.testing import tiny_hf_model

SMOLLM = "smollm2-135m-instruct"


def hf_greedy(model, ids, max_new_tokens, **kwargs):
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, len(ids):].tolist()


def edit_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of the HF directory ``src`` whose config.json has ``changes`` (None deletes a key)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-weight Llama with SmolLM2's real tokenizer, its checkpoint and a torch engine."""
    root = tmp_path_factory.mktemp("tiny")
    src = tiny_hf_model("LlamaForCausalLM", root / "hf", vocab_size=49152)
    copy_tokenizer_files(nbtrt.zoo.get(SMOLLM), src)
    ckpt = nbtrt.convert(src, root / "ckpt")
    engine = nbtrt.load(nbtrt.build(ckpt, root / "engine", backend="torch", max_batch_size=2, max_input_len=64,
                                    max_seq_len=128), device="cpu")
    return SimpleNamespace(root=root, src=src, ckpt=ckpt, engine=engine)


# ---------------------------------------------------------------------------- 4: end tokens
def test_end_tokens_only_in_config_json_stop_where_hf_stops(tiny, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(tiny.src, dtype=torch.float32).eval()
    ids = tiny.engine.encode("The capital of France is")
    free = hf_greedy(hf, ids, 24, eos_token_id=None)
    eos = free[6]
    assert eos not in free[:6]
    # a model directory with its end token in config.json only (no generation_config.json)
    src = edit_config(tiny.src, tmp_path / "hf", eos_token_id=eos)
    (src / "generation_config.json").unlink(missing_ok=True)
    ckpt = nbtrt.convert(src, tmp_path / "ckpt")
    tokenizer_eos = tiny.engine.tokenizer.eos_token_id
    assert json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"] == [eos, tokenizer_eos]
    engine = nbtrt.load(nbtrt.build(ckpt, tmp_path / "engine", backend="torch", max_input_len=64, max_seq_len=128),
                        device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert hf.generation_config.eos_token_id == eos  # transformers takes it from config.json
    expected = hf_greedy(hf, ids, 24)
    assert expected == free[:7]
    assert engine.generate(input_ids=[ids], max_new_tokens=24)[0] == expected
    assert "".join(engine.stream(ids, max_new_tokens=24)) == engine.tokenizer.decode(expected, skip_special_tokens=True)


def test_engine_without_generation_config_falls_back_to_the_tokenizer_eos(tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.ckpt, ckpt)
    (ckpt / "generation_config.json").unlink()
    engine = nbtrt.load(nbtrt.build(ckpt, tmp_path / "engine", backend="torch", max_input_len=64, max_seq_len=128),
                        device="cpu")
    assert engine.end_token_ids == (engine.tokenizer.eos_token_id,)
    assert engine.sampling().stop_token_ids == (engine.tokenizer.eos_token_id,)
    assert engine.sampling(stop_token_ids=[5]).stop_token_ids == (5,)  # an explicit choice wins


# ---------------------------------------------------------------------------- 5: config fields
def nbtrt_logits(ckpt: Path, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return load_decoder(ckpt)(torch.tensor([ids]))[0]


def hf_logits(src: Path, ids: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def assert_same_as_hf(src: Path, ckpt: Path, length: int = 40) -> None:
    ids = torch.randint(0, 257, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    diff = (nbtrt_logits(ckpt, ids) - hf_logits(src, ids)).abs()
    assert diff.max().item() <= 1e-4, f"max {diff.max():.2e} mean {diff.mean():.2e}"


@pytest.mark.parametrize("arch, changes, window", [
    ("LlamaForCausalLM", dict(sliding_window=16), None),  # transformers' Llama ignores it
    ("MistralForCausalLM", dict(sliding_window=16), 16),
    ("MistralForCausalLM", dict(sliding_window=None), 4096),  # absent: MistralConfig's default applies
    ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=16, max_window_layers=0, layer_types=None), 16),
    ("Qwen2ForCausalLM", dict(use_sliding_window=False, sliding_window=16), None),
    ("Qwen3ForCausalLM", dict(use_sliding_window=True, sliding_window=16, max_window_layers=0, layer_types=None), 16),
])
def test_sliding_window_is_applied_exactly_where_transformers_applies_it(tmp_path, arch, changes, window):
    # (layer_types=None drops the saved list, so that transformers derives it from max_window_layers)
    src = edit_config(tiny_hf_model(arch, tmp_path / "base"), tmp_path / "hf", **changes)
    if changes.get("sliding_window", 0) is None:  # remove the key altogether
        assert "sliding_window" not in json.loads((src / "config.json").read_text())
    ckpt = nbtrt.convert(src, tmp_path / "ckpt")
    assert nbtrt.config.load_checkpoint_config(ckpt)[0].sliding_window == window
    assert_same_as_hf(src, ckpt)


def test_legacy_rope_scaling_next_to_rope_parameters_is_read_as_transformers_reads_it(tmp_path):
    src = edit_config(tiny_hf_model("MistralForCausalLM", tmp_path / "base"), tmp_path / "hf",
                      rope_scaling={"rope_type": "linear", "factor": 4.0})
    ckpt = nbtrt.convert(src, tmp_path / "ckpt")
    cfg = nbtrt.config.load_checkpoint_config(ckpt)[0]
    hf = AutoModelForCausalLM.from_pretrained(src).config.rope_parameters
    assert cfg.rope_scaling == {"rope_type": hf["rope_type"], "factor": hf["factor"]}
    assert cfg.rope_theta == hf["rope_theta"]
    assert_same_as_hf(src, ckpt)


@pytest.mark.parametrize("arch, changes, named", [
    ("LlamaForCausalLM", dict(model_type="qwen2"), "model_type"),
    ("Qwen2ForCausalLM", dict(architectures=["LlamaForCausalLM"]), "model_type"),
    ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1, layer_types=None), "layer_types"),
    ("GPT2LMHeadModel", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ("GPT2LMHeadModel", dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
    ("LlamaForCausalLM", dict(rms_norm_eps="abc"), "rms_norm_eps"),
    ("LlamaForCausalLM", dict(rms_norm_eps=float("nan")), "rms_norm_eps"),
    ("LlamaForCausalLM", dict(num_attention_heads=-4), "num_attention_heads"),
    ("Qwen3ForCausalLM", dict(hidden_act="relu2"), "relu2"),
    ("LlamaForCausalLM", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    ("LlamaForCausalLM", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "yarn"),
    ("LlamaForCausalLM", dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
])
def test_configs_nbtrt_does_not_reproduce_are_refused_by_name(tmp_path, arch, changes, named):
    src = edit_config(tiny_hf_model(arch, tmp_path / "base"), tmp_path / "hf", **changes)
    with pytest.raises(UnsupportedModelError, match=re.escape(named)):
        nbtrt.convert(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def modeling_reads(model_type: str) -> set[str]:
    """Every config attribute transformers' modeling file for ``model_type`` reads."""
    source = Path(transformers.__file__).parent / "models" / model_type / f"modeling_{model_type}.py"
    text = source.read_text()
    return set(re.findall(r"config\.([A-Za-z_]\w*)", text)) | set(
        re.findall(r"getattr\((?:self\.)?config, \"(\w+)\"", text))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_field_the_hf_model_reads_is_mapped_ignored_or_held_to_its_default(name):
    """The systematic check: a field transformers' model reads is either mapped by nbtrt, known not
    to change the forward pass, or a declared field of the config class (so a non-default value is
    refused); nothing the model reads can slip through unchecked."""
    arch = ARCHITECTURES[name]
    declared = set(_hf_class(arch.model_type)().to_dict())
    generic = {"_attn_implementation", "num_labels", "hidden_dropout", "classifier_dropout", "summary_last_dropout",
               "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"}  # GPT-2 aliases/heads
    unchecked = modeling_reads(arch.model_type) - set(arch.fields) - set(IRRELEVANT) - set(arch.ignored) - declared
    unchecked -= generic if arch.model_type == "gpt2" else {"_attn_implementation"}
    assert not unchecked, f"{name}: transformers reads {sorted(unchecked)}, which nbtrt neither maps nor checks"
    for field in arch.fields:
        assert field in declared or field == "head_dim", f"{name}: {field} is not a field of transformers' config"


# ---------------------------------------------------------------------------- 7: values that broke later
def test_a_kv_cache_larger_than_memory_is_refused_at_build_saying_what_fits(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"max_seq_len=100000000 needs a KV cache.*what fits: max_seq_len <= \d+"):
        nbtrt.build(tiny.ckpt, tmp_path / "engine", backend="torch", max_input_len=64, max_seq_len=100_000_000)
    assert not (tmp_path / "engine").exists()


def test_an_edited_checkpoint_config_with_a_bad_number_is_refused_at_build(tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["decoder"]["norm_eps"] = "abc"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="norm_eps='abc'"):
        nbtrt.build(ckpt, tmp_path / "engine", backend="torch")


@pytest.mark.parametrize("options, named", [
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=float("nan"), do_sample=True), "temperature"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(stop_token_ids="ab"), "stop_token_ids"),
    (dict(stop_token_ids=[1.5]), "stop_token_ids"),
    (dict(stop_token_ids=[10**9]), "stop_token_ids"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(top_k=2.5), "top_k"),
    (dict(seed="abc"), "seed"),
    (dict(seed=-1), "seed"),
    (dict(do_sample="yes"), "do_sample"),
    (dict(repetition_penalty="1.1"), "repetition_penalty"),
    (dict(stop_strings=["\ud800"]), "stop string"),
    (dict(stop_strings=5), "stop_strings"),
])
def test_bad_options_are_a_generation_error_naming_the_option(tiny, options, named):
    engine = tiny.engine
    with pytest.raises(GenerationError, match=re.escape(named)):
        engine.generate(["Hi"], max_new_tokens=options.pop("max_new_tokens", 4), **options)


def test_lone_surrogates_are_named(tiny):
    engine = tiny.engine
    for call in (lambda: engine.generate(["ok", "bad \ud800"]), lambda: engine.stream("\udfff"),
                 lambda: ChatSession(engine).send("x\ud800")):
        with pytest.raises(GenerationError, match="surrogate"):
            call()
    with pytest.raises(GenerationError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=2.5)


# ---------------------------------------------------------------------------- 8: abandoned streams
def in_thread(fn, timeout: float = 60):
    """Run ``fn`` in another thread; (result or exception, seconds taken)."""
    out = {}

    def run():
        start = time.perf_counter()
        try:
            out["value"] = fn()
        except Exception as e:  # handed back to the test
            out["value"] = e
        out["seconds"] = time.perf_counter() - start

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the other thread is still blocked"
    return out["value"], out["seconds"]


def test_an_unread_stream_loses_the_engine_to_another_thread_and_then_says_so(tiny, monkeypatch):
    engine = tiny.engine
    ids = engine.encode("Hello there")
    expected = engine.generate(input_ids=[ids], max_new_tokens=8)[0]
    monkeypatch.setattr(engine._turns, "idle_timeout_s", 0.5)
    g = engine.stream("The capital of France is", max_new_tokens=32)
    next(g)  # ... and never read again
    got, seconds = in_thread(lambda: engine.generate(input_ids=[ids], max_new_tokens=8))
    assert got == [expected]
    assert seconds < 30
    with pytest.raises(GenerationError, match="was not read for more than 0.5 s"):
        next(g)


def test_a_closed_or_collected_stream_releases_the_engine_at_once(tiny):
    engine = tiny.engine
    ids = engine.encode("Hello there")
    assert engine._turns.idle_timeout_s >= 5  # so only the release can explain a quick answer
    for drop in ("close", "collect"):
        g = engine.stream("The capital of France is", max_new_tokens=32)
        next(g)
        if drop == "close":
            g.close()
        else:
            del g
            gc.collect()
        got, seconds = in_thread(lambda: engine.generate(input_ids=[ids], max_new_tokens=4))
        assert isinstance(got, list) and len(got[0]) == 4
        assert seconds < 3, f"{drop}: waited {seconds:.1f} s"


def test_a_waiting_request_stops_on_cancel_and_the_widget_stop_always_stops(tiny):
    from nbtrt.widgets import Chat

    engine = tiny.engine
    g = engine.stream("The capital of France is", max_new_tokens=32)
    next(g)  # the engine is held (idle timeout 10 s)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    got, seconds = in_thread(lambda: engine.generate(["Hi"], max_new_tokens=4, cancel=cancel))
    assert got == [""] and seconds < 3
    chat = Chat(engine)
    chat.send("Hi!")
    time.sleep(0.3)
    assert chat.busy  # waiting for the engine
    chat.stop()
    assert chat.wait(5), "Stop did not stop"
    assert "[stopped]" in chat.transcript()
    g.close()
    chat.send("Hi again!")
    assert chat.wait(60) and chat.last_answer()


# ---------------------------------------------------------------------------- 9: chat order
def test_chat_send_refuses_while_the_previous_answer_streams(tiny):
    session = ChatSession(tiny.engine, max_new_tokens=6)
    first = session.send("Name a colour.")
    next(first, None)
    with pytest.raises(GenerationError, match="still streaming"):
        session.send("And another?")
    first.close()
    assert [m["content"] for m in session.history][0] == "Name a colour."
    unread = session.send("And another?")  # never read: sending again would reorder too
    with pytest.raises(GenerationError, match="still streaming"):
        session.send("A third?")
    del unread
    gc.collect()
    "".join(session.send("A third?"))
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["Name a colour.", "A third?"]


# ---------------------------------------------------------------------------- 28: one source of limits
def test_the_chat_session_and_the_engine_share_the_limits(tiny):
    engine, lim = tiny.engine, tiny.engine.limits
    with pytest.raises(GenerationError, match=f"max_input_len={lim.max_input_len}"):
        ChatSession(engine).send("word " * 200)
    ids = engine.encode("Hi")
    with pytest.raises(GenerationError, match=f"max_new_tokens <= {lim.room(len(ids))}"):
        engine.generate(input_ids=[ids], max_new_tokens=lim.room(len(ids)) + 1)
    assert len(engine.generate(input_ids=[ids], max_new_tokens=lim.room(len(ids)), stop_token_ids=[])[0]) \
        == lim.room(len(ids))
    engine.begin(1)  # the backend's own guard inside step() applies the same rule
    past = lim.max_input_len
    engine.step(torch.ones(1, past, dtype=torch.long), torch.ones(1, past, dtype=torch.long))
    with pytest.raises(GenerationError, match=f"max_seq_len={lim.max_seq_len}"):
        while past <= lim.max_seq_len:
            engine.step(torch.ones(1, 1, dtype=torch.long), torch.ones(1, past + 1, dtype=torch.long))
            past += 1
    assert past == lim.max_seq_len
