"""llama.cpp as the CPU peer of a benchmark: its own runner (llama-cpp-python) on the zoo's own GGUF.

llama-cpp-python is an optional benchmark dependency (``pip install nbtrt[bench]``), imported only
when a runner is made, never by nbtrt itself. Build it with ``CMAKE_ARGS="-DGGML_NATIVE=OFF"``: its
default native build can crash on CPUs with AMX.

>>> from nbtrt.bench.llamacpp import llama_cpp_runner, zoo_gguf  # doctest: +SKIP
>>> runner = llama_cpp_runner(zoo_gguf("smollm2-135m-instruct", "work/bench"), threads=2)  # doctest: +SKIP
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import zoo
from .._io import file_sha256
from .runners import Runner, skipped

NAME = "llama.cpp"


def llama_cpp_unavailable() -> str | None:
    """Why llama-cpp-python cannot run here, or None when it imports."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return (f"llama-cpp-python is not installed ({e}); it is an optional benchmark dependency: "
                'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python (or nbtrt[bench])')
    except OSError as e:  # the package is there but its shared library does not load
        return f"llama-cpp-python is installed but its library does not load: {e}"
    return None


def zoo_gguf(name: str, work_dir: str | Path) -> Path:
    """The GGUF file zoo model ``name`` was made from: the installed file itself for a one-part
    model, else its parts assembled once into ``work_dir`` (checked against the sha256 the zoo
    recorded when it materialized the model, reassembled when it differs).

    >>> zoo_gguf("smollm2-135m-instruct", "work/bench").name  # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    parts = zoo.locate_parts(name)
    if len(parts) == 1:
        return parts[0]
    out = Path(work_dir) / zoo.ZOO[name].gguf_name
    marker = zoo.get(name) / zoo.MARKER

    want = json.loads(marker.read_text()).get("gguf_sha256")
    if out.is_file() and want and file_sha256(out) == want:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    got = zoo.assemble_gguf(parts, out, packages=zoo.ZOO[name].packages)
    if want and got != want:
        raise zoo.ZooError(f"the GGUF assembled from {name}'s installed parts (sha256 {got[:12]}…) is not the one "
                           f"{marker.parent} was made from ({want[:12]}…): the packages changed since; "
                           f"re-materialize with nbtrt.zoo.get({name!r}, force=True)")
    return out


def gguf_precision(path: str | Path) -> str:
    """The GGUF's file type as llama.cpp names it (e.g. "Q4_1"), read from its metadata."""
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(str(path)).fields.get("general.file_type")
    if field is None:
        return "gguf"
    value = int(field.parts[field.data[0]][0])
    try:
        return LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"ftype{value}"


def llama_cpp_runner(gguf: str | Path, *, threads: int, n_ctx: int = 1024, name: str = NAME) -> Runner:
    """llama.cpp generating greedily for one prompt at a time (llama-cpp-python's ``Llama`` holds one
    sequence), ``threads`` threads for the prompt and for decoding. Skipped, with the reason, when
    llama-cpp-python does not import. Each run starts from an empty KV cache (``reset``), so the
    prompt is computed every time, as for every other runner."""
    reason = llama_cpp_unavailable()
    precision = gguf_precision(gguf)
    if reason:
        return skipped(name, precision, reason)
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    vocab = llm.n_vocab()

    def run(prompts, lengths, tick):
        (prompt,), (n,) = prompts, lengths  # max_batch_size 1: measure() hands one request at a time
        if max(prompt) >= vocab:
            raise ValueError(f"token id {max(prompt)} is outside {gguf}'s vocabulary of {vocab}; "
                             "draw the prompts from the smaller vocabulary")
        llm.reset()
        llm.eval(prompt)
        for i in range(n):
            # greedy from the last position's logits (Llama.eval keeps them only with logits_all);
            # EOS ignored, as for every runner
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
            token = int(np.argmax(logits))
            tick()
            if i + 1 < n:
                llm.eval([token])
        return [n]

    return Runner(name, precision, "cpu", 1, run, info={"gguf": str(gguf), "threads": threads, "n_vocab": vocab,
                                                         "llama_cpp_python": llama_cpp.__version__})
