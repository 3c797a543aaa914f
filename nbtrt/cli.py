"""The ``nbtrt`` command. Each stage's module contributes its verb through ``add_cli(subparsers)``."""
from __future__ import annotations

import argparse
import importlib
import sys

# modules that define add_cli(subparsers); each adds verbs whose handler is set with set_defaults(run=...)
VERB_MODULES = ("nbtrt.convert", "nbtrt.quantize", "nbtrt.engine", "nbtrt.chat", "nbtrt.bench", "nbtrt.evaluate")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nbtrt", description="convert -> quantize -> build -> chat -> benchmark")
    sub = p.add_subparsers(dest="verb", required=True)
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        if hasattr(module, "add_cli"):
            module.add_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileExistsError, RuntimeError, KeyError) as e:
        print(f"nbtrt {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
