"""nbtrt: convert -> quantize -> build -> chat -> benchmark, with layer diffs against HF at every stage."""
__version__ = "0.1.0"

from . import debug, plots, zoo  # noqa: E402
from .convert import convert, mapping_table  # noqa: E402
from .engine import Engine, build, load  # noqa: E402
from . import quantize  # noqa: E402  (the module is callable: nbtrt.quantize(ckpt, out, fmt))
from .evaluate import eval  # noqa: E402, A004  (nbtrt.eval: engine vs HF on real documents; shadows only here)

__all__ = ["__version__", "zoo", "convert", "quantize", "mapping_table", "build", "load", "Engine", "debug", "plots", "eval"]
