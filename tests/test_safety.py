"""Issue 27, security and integrity: remote code, paths out of the source, --overwrite, hashes and
non-finite weights, stale temporary directories, and the CLI's one-line errors. Real tiny models,
the real SmolLM2 tokenizer, real engine directories, the real CLI in a subprocess."""
import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nbtrt
import nbtrt.quantize as nq
from nbtrt.cli import main as cli_main
from nbtrt._io import ArtifactError, atomic_dir, copy_tokenizer_files, file_sha256, load_tokenizer, read_safetensors
from nbtrt.checkpoint import load_checkpoint, save_checkpoint
from nbtrt.quantize import QuantizationError
from nbtrt.testing import tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]
LIMITS = dict(max_batch_size=1, max_input_len=16, max_seq_len=32)
EVIL = "import pathlib; pathlib.Path({sentinel!r}).write_text('remote code ran')\n"


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer files."""
    src = tiny_hf_model("LlamaForCausalLM", tmp_path_factory.mktemp("hf") / "llama", vocab_size=49152,
                        num_hidden_layers=1, tie_word_embeddings=True)
    copy_tokenizer_files(nbtrt.zoo.get("smollm2-135m-instruct"), src)
    return src


@pytest.fixture(scope="module")
def ckpt(hf, tmp_path_factory):
    return nbtrt.convert(hf, tmp_path_factory.mktemp("ckpt") / "ckpt")


@pytest.fixture(scope="module")
def engine_dir(ckpt, tmp_path_factory):
    return nbtrt.build(ckpt, tmp_path_factory.mktemp("engine") / "engine", backend="torch", **LIMITS)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**data, **changes}))


def plant_remote_code(d: Path, config: str, sentinel: Path) -> None:
    """What a hostile model ships: an auto_map in a config pointing at a module of its own."""
    (d / "tokenization_evil.py").write_text(EVIL.format(sentinel=str(sentinel)))
    edit_json(d / config, auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None],
                                    "AutoModelForCausalLM": "tokenization_evil.EvilModel"})


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def run_cli(*args, env=None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "nbtrt.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, **kw)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The CLI's one error line (progress bars, which redraw with \\r, aside); no traceback."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln.strip() for ln in r.stderr.replace("\r", "\n").splitlines()]
    lines = [ln for ln in lines if ln and "%|" not in ln and "it/s]" not in ln and "B/s]" not in ln]
    assert len(lines) == 1 and lines[0].startswith("nbtrt "), r.stderr
    return lines[0]


# ----------------------------------------------------------------------------- 1. remote code
@pytest.mark.parametrize("config", ["config.json", "tokenizer_config.json", "processor_config.json"])
def test_convert_refuses_auto_map_in_any_config(hf, tmp_path, config):
    src, sentinel = copy(hf, tmp_path / "src"), tmp_path / "ran"
    plant_remote_code(src, config, sentinel)
    with pytest.raises(ArtifactError, match=rf"{config}.*'auto_map'"):
        nbtrt.convert(src, tmp_path / "out")
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def test_convert_refuses_python_files(hf, tmp_path):
    src = copy(hf, tmp_path / "src")
    (src / "modeling_custom.py").write_text("x = 1\n")
    with pytest.raises(ArtifactError, match="modeling_custom.py"):
        nbtrt.convert(src, tmp_path / "out")


def test_build_refuses_auto_map_in_checkpoint(ckpt, tmp_path):
    bad, sentinel = copy(ckpt, tmp_path / "ckpt"), tmp_path / "ran"
    plant_remote_code(bad, "tokenizer_config.json", sentinel)
    with pytest.raises(ArtifactError, match=r"tokenizer_config.json.*'auto_map'"):
        nbtrt.build(bad, tmp_path / "engine", backend="torch", **LIMITS)
    assert not (tmp_path / "engine").exists() and not sentinel.exists()


@pytest.mark.parametrize("verify", [True, False])
def test_load_refuses_remote_code_dropped_into_engine(engine_dir, tmp_path, verify):
    """The issue's example: tokenization_*.py plus auto_map in tokenizer_config.json."""
    bad, sentinel = copy(engine_dir, tmp_path / "engine"), tmp_path / "ran"
    plant_remote_code(bad, "tokenizer_config.json", sentinel)
    with pytest.raises(ArtifactError, match=r"tokenizer_config.json.*'auto_map'"):
        nbtrt.load(bad, verify=verify, device="cpu")
    assert not sentinel.exists()


def test_every_hf_loader_goes_through_the_guard(hf, tmp_path):
    """Class-wide: the guard refuses before transformers runs, and no from_pretrained in nbtrt/ can
    omit trust_remote_code=False (the source is parsed, not grepped)."""
    from nbtrt.chat import HFReference
    from nbtrt.quantize.calib import tokenizer_for

    bad, sentinel = copy(hf, tmp_path / "src"), tmp_path / "ran"
    plant_remote_code(bad, "tokenizer_config.json", sentinel)
    for load in (load_tokenizer, tokenizer_for, HFReference):
        with pytest.raises(ArtifactError, match="auto_map"):
            load(bad)
    assert not sentinel.exists()
    offenders = []
    for path in (ROOT / "nbtrt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("trust_remote_code"), ast.Constant) and kw["trust_remote_code"].value is False):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_load_refuses_files_the_manifest_does_not_list(engine_dir, tmp_path):
    bad = copy(engine_dir, tmp_path / "engine")
    (bad / "added_tokens.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"added_tokens.json.*not listed"):
        nbtrt.load(bad, device="cpu")
    (bad / "added_tokens.json").unlink()
    (bad / "sub").mkdir()
    with pytest.raises(ArtifactError, match=r"'sub'.*not listed"):
        nbtrt.load(bad, device="cpu")
    (bad / "sub").rmdir()
    assert nbtrt.load(bad, device="cpu").generate(["Hi"], max_new_tokens=2)


def test_build_records_tokenizer_files(engine_dir):
    files = json.loads((engine_dir / "engine.json").read_text())["files"]
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert set(files) | {"engine.json"} == {p.name for p in engine_dir.iterdir()}


# ----------------------------------------------------------------------------- 2. paths
def test_symlinked_tokenizer_file_out_of_source_is_refused(hf, tmp_path):
    src = copy(hf, tmp_path / "src")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the artifact")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to(secret)
    with pytest.raises(ArtifactError, match=r"tokenizer.json resolves to .*secret.txt, outside"):
        nbtrt.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_symlink_inside_source_is_copied_not_linked(hf, tmp_path):
    src = copy(hf, tmp_path / "src")
    (src / "real").mkdir()
    shutil.move(src / "tokenizer.json", src / "real" / "tokenizer.json")
    (src / "tokenizer.json").symlink_to(src / "real" / "tokenizer.json")
    out = nbtrt.convert(src, tmp_path / "out")
    assert not (out / "tokenizer.json").is_symlink()
    assert file_sha256(out / "tokenizer.json") == file_sha256(hf / "tokenizer.json")


def test_weights_symlinked_out_of_source_are_refused(hf, tmp_path):
    src = copy(hf, tmp_path / "src")
    shutil.move(src / "model.safetensors", tmp_path / "elsewhere.safetensors")
    (src / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ArtifactError, match=r"model.safetensors resolves to .*elsewhere.safetensors, outside"):
        nbtrt.convert(src, tmp_path / "out")


def test_index_shard_path_out_of_source_is_refused(hf, tmp_path):
    src = copy(hf, tmp_path / "src")
    shutil.move(src / "model.safetensors", tmp_path / "outside.safetensors")
    names = load_file(tmp_path / "outside.safetensors").keys()
    edit_json(src / "model.safetensors.index.json", metadata={},
              weight_map={n: "../outside.safetensors" for n in names})
    with pytest.raises(ArtifactError, match=r"\.\./outside.safetensors resolves to .*, outside"):
        nbtrt.convert(src, tmp_path / "out")


def test_load_refuses_engine_file_replaced_by_symlink(engine_dir, tmp_path):
    bad = copy(engine_dir, tmp_path / "engine")
    shutil.move(bad / "tokenizer.json", tmp_path / "tokenizer.json")
    (bad / "tokenizer.json").symlink_to(tmp_path / "tokenizer.json")
    with pytest.raises(ArtifactError, match="tokenizer.json.*not a plain file"):
        nbtrt.load(bad, device="cpu")


# ----------------------------------------------------------------------------- 3. --overwrite
def test_cli_convert_onto_its_source_keeps_the_source(hf, tmp_path):
    src = copy(hf, tmp_path / "src")
    before = {p.name: file_sha256(p) for p in src.iterdir()}
    r = run_cli("convert", src, src, "--overwrite")
    assert r.returncode == 2 and "overlaps the input" in one_line_error(r)
    assert {p.name: file_sha256(p) for p in src.iterdir()} == before


def test_outputs_overlapping_inputs_are_refused(hf, ckpt, tmp_path):
    src = copy(hf, tmp_path / "models" / "src")
    for out in (src / "ckpt", tmp_path / "models", src):  # inside, containing, the same
        with pytest.raises(ArtifactError, match="overlaps the input"):
            nbtrt.convert(src, out, overwrite=True)
    with pytest.raises(ArtifactError, match="overlaps the input"):
        nq.quantize(ckpt, ckpt, "int8_wo", overwrite=True)
    with pytest.raises(ArtifactError, match="overlaps the input"):
        nbtrt.build(ckpt, ckpt / "engine", backend="torch", **LIMITS)
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in hf.iterdir())


def test_overwrite_replaces_only_what_nbtrt_wrote(hf, ckpt, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(ArtifactError, match="not an nbtrt checkpoint or engine"):
        nbtrt.convert(hf, mine, overwrite=True)
    with pytest.raises(ArtifactError, match="not an nbtrt checkpoint or engine"):
        nbtrt.build(ckpt, mine, backend="torch", overwrite=True, **LIMITS)
    assert (mine / "thesis.tex").read_text() == "years of work"
    out = nbtrt.convert(hf, tmp_path / "ckpt")
    nbtrt.convert(hf, out, overwrite=True, dtype="bfloat16")  # an nbtrt checkpoint: replaced
    assert json.loads((out / "config.json").read_text())["decoder"]["dtype"] == "bfloat16"
    edir = nbtrt.build(ckpt, tmp_path / "engine", backend="torch", **LIMITS)
    nbtrt.build(ckpt, edir, backend="torch", overwrite=True, **LIMITS)  # an nbtrt engine: replaced
    assert leftovers(out) == [] and leftovers(edir) == []


def test_output_dot_is_refused_and_leaves_nothing(hf, tmp_path, monkeypatch):
    work = nbtrt.convert(hf, tmp_path / "work")
    monkeypatch.chdir(work)
    with pytest.raises(ArtifactError, match="current directory"):
        nbtrt.convert(hf, ".", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no ..old-* or .tmp-* beside it
    assert (work / "rank0.safetensors").is_file()


# ----------------------------------------------------------------------------- 6. integrity
def test_changed_checkpoint_weights_are_refused_at_quantize_and_build(ckpt, tmp_path):
    bad = copy(ckpt, tmp_path / "ckpt")
    tensors = load_file(bad / "rank0.safetensors")
    tensors["final_norm.weight"] = tensors["final_norm.weight"] * 2
    save_file(tensors, bad / "rank0.safetensors", metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="does not match the hash recorded"):
        nbtrt.build(bad, tmp_path / "engine", backend="torch", **LIMITS)
    with pytest.raises(ArtifactError, match="does not match the hash recorded"):
        nq.quantize(bad, tmp_path / "q", "int8_wo")
    assert not (tmp_path / "engine").exists() and not (tmp_path / "q").exists()


def test_non_finite_weights_are_refused_naming_the_tensor(hf, ckpt, tmp_path):
    src = copy(hf, tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match=r"model.layers.0.mlp.down_proj.weight holds NaN/Inf"):
        nbtrt.convert(src, tmp_path / "out")
    # a checkpoint written (with a valid hash) around a NaN, as a buggy tool would
    cfg, good = load_checkpoint(ckpt)
    good["final_norm.weight"][0] = float("inf")
    bad = tmp_path / "bad-ckpt"
    with atomic_dir(bad) as tmp:
        save_checkpoint(tmp, cfg, good, stage="convert", source=ckpt, options={}, tokenizer_dir=ckpt)
    with pytest.raises(ArtifactError, match="final_norm.weight holds NaN/Inf"):
        nbtrt.build(bad, tmp_path / "engine", backend="torch", **LIMITS)
    with pytest.raises(QuantizationError, match="final_norm.weight holds NaN/Inf"):
        nq.quantize(bad, tmp_path / "q", "int8_wo")
    assert not (tmp_path / "out").exists() and not (tmp_path / "engine").exists()


@pytest.mark.parametrize("edit", ["files emptied", "limits raised", "decoder edited", "hash removed"])
def test_edited_engine_json_is_refused(engine_dir, tmp_path, edit):
    bad = copy(engine_dir, tmp_path / "engine")
    manifest = json.loads((bad / "engine.json").read_text())
    if edit == "files emptied":
        manifest["files"] = {}
    elif edit == "limits raised":
        manifest["limits"]["max_seq_len"] = 100_000
    elif edit == "decoder edited":
        manifest["decoder"]["rms_norm_eps"] = 0.5
    else:
        del manifest["manifest_sha256"]
    (bad / "engine.json").write_text(json.dumps(manifest))
    for verify in (True, False):
        with pytest.raises(ArtifactError, match="edited after the build"):
            nbtrt.load(bad, verify=verify, device="cpu")


def test_files_table_must_cover_the_directory_even_with_a_recomputed_hash(engine_dir, tmp_path):
    """An emptied files table with its manifest hash recomputed still leaves files nobody listed."""
    from nbtrt.engine import write_manifest

    bad = copy(engine_dir, tmp_path / "engine")
    manifest = json.loads((bad / "engine.json").read_text())
    manifest.pop("manifest_sha256")
    write_manifest(bad / "engine.json", {**manifest, "files": {}})
    with pytest.raises(ArtifactError, match="lists no files"):
        nbtrt.load(bad, device="cpu")
    write_manifest(bad / "engine.json", {**manifest, "files": {"tokenizer.json": manifest["files"]["tokenizer.json"]}})
    with pytest.raises(ArtifactError, match="not listed"):
        nbtrt.load(bad, device="cpu")


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_changed_engine_file_is_refused(ckpt, tmp_path, backend):
    edir = nbtrt.build(ckpt, tmp_path / "engine", backend=backend, **LIMITS)
    weights = max((p for p in edir.iterdir() if p.name != "engine.json"), key=lambda p: p.stat().st_size)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.unlink()  # the torch engine hard-links the checkpoint's weights: never write through that link
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{weights.name} does not match engine.json"):
        nbtrt.load(edir)


# ----------------------------------------------------------------------------- 10. stale temporaries
def test_killed_stage_leaves_a_tmp_dir_that_the_next_write_removes(hf, tmp_path):
    parent = tmp_path / "out"
    parent.mkdir()
    code = ("import sys, time; from nbtrt._io import atomic_dir\n"
            "with atomic_dir(sys.argv[1]) as tmp:\n"
            "    (tmp / 'rank0.safetensors').write_bytes(b'half')\n"
            "    print(tmp, flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(parent / "ckpt")], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    stale = Path(proc.stdout.readline().strip())
    proc.kill()  # as the OOM killer or a closed terminal would: no cleanup runs
    proc.wait()
    assert stale.is_dir() and stale.name.startswith(".ckpt.tmp-")
    alive = subprocess.Popen([sys.executable, "-c", code, str(parent / "other")], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    running = Path(alive.stdout.readline().strip())
    foreign = parent / ".someone.tmp-keep"  # a hidden tmp-like directory nbtrt did not make
    foreign.mkdir()
    try:
        nbtrt.convert(hf, parent / "ckpt")
        assert not stale.exists()
        assert running.is_dir() and foreign.is_dir()  # a running stage's and someone else's are kept
    finally:
        alive.kill()
        alive.wait()
    assert (parent / "ckpt" / "rank0.safetensors").is_file()
    assert not (parent / "ckpt" / ".nbtrt-tmp").exists()  # the marker never reaches the artifact


# ----------------------------------------------------------------------------- 11. CLI
def test_cli_os_error_is_one_line_naming_the_path(hf, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = run_cli("convert", hf, blocker / "sub" / "ckpt")  # NotADirectoryError, as a read-only disk gives EROFS
    assert r.returncode == 1
    assert str(blocker) in one_line_error(r)
    r = run_cli("convert", hf, blocker / "sub" / "ckpt", env={"NBTRT_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_cli_nbtrt_errors_are_one_line(hf, tmp_path):
    r = run_cli("build", hf, tmp_path / "engine", "--backend", "torch")  # a HF dir, not a checkpoint
    assert r.returncode == 2 and "run nbtrt.convert() on it first" in one_line_error(r)
    r = run_cli("build", tmp_path / "missing", tmp_path / "engine", "--backend", "torch")
    assert r.returncode == 2 and "missing" in one_line_error(r)


@pytest.mark.parametrize("args, words", [
    (["serve", "{engine}", "--port", "99999"], "port=99999 is not a TCP port"),
    (["serve", "{engine}", "--max-batch-size", "0"], "max_batch_size=0 must be an integer >= 1"),
    (["serve", "{engine}", "--max-queue", "-1"], "max_queue=-1"),
    (["eval", "{engine}", "{hf}", "--threshold", "200"], "threshold=200.0: a ROUGE-L floor in percent"),
    (["bench-serving", "{engine}", "--requests", "0"], "num_prompts=0"),
    (["bench-serving", "{engine}", "--rates", "1,x"], "--rates '1,x'"),
    (["bench-serving", "{engine}", "--rates", "-1"], "rates [-1.0] are not arrival rates"),
    (["bench-serving", "{engine}", "--static-batch-size", "0"], "static_batch_size=0"),
    (["bench", "{hf}", "--batch", "x"], "--batch 'x'"),
    (["bench", "{hf}", "--repeats", "0"], "repeats=0"),
    (["convert", "{engine}", "{tmp}/ckpt"], "is an nbtrt engine, not a HuggingFace model directory"),
    (["bench", "{ckpt}"], "is an nbtrt checkpoint, not a HuggingFace model directory"),
])
def test_cli_bad_sizes_and_mixed_up_directories_are_named_before_loading(hf, ckpt, engine_dir, tmp_path, capsys,
                                                                         args, words):
    """In the CLI's own process: these used to end in an OverflowError traceback, numpy's "scale < 0",
    "max() arg is an empty sequence", HF's "Unrecognized model" for an nbtrt directory, a server that
    started with a negative queue, or a whole eval run against a ROUGE-L floor of 200%."""
    paths = dict(engine=engine_dir, hf=hf, ckpt=ckpt, tmp=tmp_path)
    assert cli_main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    if "nbtrt" in words:  # the HF directory the artifact was made from, where to go instead
        assert str(hf) in err, err
    assert not (tmp_path / "ckpt").exists()


def test_cli_ctrl_c_while_loading_exits_130(tmp_path):
    """A real SIGINT (Python's own handler raises KeyboardInterrupt) a moment into converting the
    135M zoo model, while its weights load."""
    out = tmp_path / "ckpt"
    code = ("import signal, sys; from nbtrt.cli import main, parser; parser()\n"
            "signal.signal(signal.SIGALRM, lambda *a: signal.raise_signal(signal.SIGINT))\n"
            "signal.setitimer(signal.ITIMER_REAL, 0.3)\n"
            f"sys.exit(main(['convert', 'smollm2-135m-instruct', {str(out)!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 130, r.stderr
    assert "interrupted" in one_line_error(r)
    assert not out.exists() and leftovers(out) == [], (out.exists(), leftovers(out))


def test_ctrl_c_while_reading_safetensors_is_a_keyboard_interrupt(tmp_path):
    """A SIGINT that lands inside safetensors' Rust reader used to come out as a ValueError ("could not
    determine the shape of object type ...UntypedStorage"): `nbtrt chat` then exited 2 with that
    message instead of 130. A kernel timer (no thread of ours, which would need the GIL that the reader
    holds) interrupts at 60 moments across the read: each is a KeyboardInterrupt or lands after it."""
    path = tmp_path / "many.safetensors"
    save_file({f"t{i}": torch.full((64, 64), float(i)) for i in range(3000)}, path)
    start = time.perf_counter()
    assert len(read_safetensors(path)) == 3000
    read_s = time.perf_counter() - start
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under nohup
    previous_alarm = signal.signal(signal.SIGALRM, lambda *_: signal.raise_signal(signal.SIGINT))
    outcomes = []
    try:
        for k in range(60):
            signal.setitimer(signal.ITIMER_REAL, read_s * (k + 1) / 50)
            try:
                tensors = read_safetensors(path)
                time.sleep(read_s)  # an interrupt after the read lands here
                outcomes.append("read")
            except KeyboardInterrupt:
                outcomes.append("interrupted")
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_alarm)
        signal.signal(signal.SIGINT, previous)
    assert outcomes.count("interrupted") >= 30, outcomes
    assert torch.equal(read_safetensors(path, ["t2999"])["t2999"], torch.full((64, 64), 2999.0))
