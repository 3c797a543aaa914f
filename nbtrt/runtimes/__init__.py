"""Runtimes (engine backends): one engine file each (``onnxruntime``, ``tensorrt``, ``torch_engine``;
the torch runtime's quantized linears and attention beside it). Every module in this package that
defines an engine registers it with nbtrt.engine on import; a runtime whose library is missing
still registers and reports why through ``available()``."""
import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
