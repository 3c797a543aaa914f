"""nbtrt: convert -> quantize -> build -> chat -> benchmark, with layer diffs against HF at every stage."""
import os
import sys

from ._version import __version__


def _run_as_the_command() -> bool:
    """True when this import is the `nbtrt` command starting (the console script or `python -m nbtrt...`)."""
    argv = getattr(sys, "orig_argv", [])
    return os.path.basename(sys.argv[0]) == "nbtrt" or any(a == "-m" and b.startswith("nbtrt")
                                                         for a, b in zip(argv, argv[1:]))


try:  # torch loads here, for seconds: Ctrl-C meanwhile must not end the `nbtrt` command in a traceback
    from . import debug, plots, zoo  # noqa: E402
    from .convert import convert, mapping_table  # noqa: E402
    from .engine import Engine, build, load  # noqa: E402
    from . import quantize  # noqa: E402  (the module is callable: nbtrt.quantize(ckpt, out, fmt))
    from .generate import SamplingParams  # noqa: E402
    from .evaluate import eval  # noqa: E402, A004  (nbtrt.eval: engine vs HF on real documents; shadows only here)
except KeyboardInterrupt:
    if not _run_as_the_command() or os.environ.get("NBTRT_DEBUG") == "1":
        raise
    print("nbtrt: interrupted while loading", file=sys.stderr)
    raise SystemExit(130) from None


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
