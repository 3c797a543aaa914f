"""Jupyter widgets (ipywidgets). Imported lazily so the core library never needs a notebook stack."""
import importlib

_WIDGETS = {"DiffExplorer": "diff", "Chat": "chat", "BuildOptions": "build", "QuantizeOptions": "quantize"}


def __getattr__(name: str):
    if name in _WIDGETS:
        return getattr(importlib.import_module(f"{__name__}.{_WIDGETS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
