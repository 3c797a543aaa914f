"""nbtrt: convert -> quantize -> build -> chat -> benchmark, with layer diffs against HF at every stage."""
__version__ = "0.1.0"

from . import zoo  # noqa: E402
from .convert import convert, mapping_table  # noqa: E402
from .engine import Engine, build, load  # noqa: E402
from . import debug, plots  # noqa: E402

__all__ = ["__version__", "zoo", "convert", "mapping_table", "build", "load", "Engine", "debug", "plots"]
