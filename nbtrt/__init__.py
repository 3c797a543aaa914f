"""nbtrt: convert -> quantize -> build -> chat -> benchmark, with layer diffs against HF at every stage."""
from ._version import __version__

from . import debug, plots, zoo  # noqa: E402
from .convert import convert, mapping_table  # noqa: E402
from .engine import Engine, build, load  # noqa: E402
from . import quantize  # noqa: E402  (the module is callable: nbtrt.quantize(ckpt, out, fmt))
from .generate import SamplingParams  # noqa: E402
from .evaluate import eval  # noqa: E402, A004  (nbtrt.eval: engine vs HF on real documents; shadows only here)


def __getattr__(name: str):
    # the serving runtime (threads, the paged KV cache) and the server load on first use, not at `import nbtrt`
    if name in ("LLM", "RequestOutput"):
        from .serving import llm

        return getattr(llm, name)
    if name == "serve":
        from .server import serve

        return serve
    raise AttributeError(f"module 'nbtrt' has no attribute {name!r}")


__all__ = ["__version__", "zoo", "convert", "quantize", "mapping_table", "build", "load", "Engine", "debug", "plots",
           "eval", "LLM", "RequestOutput", "SamplingParams", "serve"]
