"""Engine backends. Every module in this package registers itself with nbtrt.engine on import;
a backend whose runtime is missing still registers and reports why through ``available()``."""
import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
