"""The ``nbtrt`` command. Each stage's module contributes its verb through ``add_cli(subparsers)``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# modules that define add_cli(subparsers); each adds verbs whose handler is set with set_defaults(run=...)
VERB_MODULES = ("nbtrt.convert", "nbtrt.quantize", "nbtrt.engine", "nbtrt.chat", "nbtrt.bench",
                "nbtrt.bench.serving",  # nbtrt bench-serving: static vs in-flight batching
                "nbtrt.evaluate", "nbtrt.server.cli")


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
    """Run one verb; every failure is one line on stderr (a traceback only with NBTRT_DEBUG=1).

    Exit status: 0 done, 1 a file system error (read-only, full disk, missing path), 2 bad input
    or a refused artifact, 130 interrupted (Ctrl-C).
    """
    verb = "nbtrt"
    try:
        args = parser().parse_args(argv)
        verb = f"nbtrt {args.verb}"
        args.run(args)
    except KeyboardInterrupt:
        if os.environ.get("NBTRT_DEBUG") == "1":
            raise
        print(f"{verb}: interrupted; nothing half-written was left in place", file=sys.stderr)
        return 130
    except (ValueError, FileExistsError, RuntimeError, KeyError, OSError) as e:
        if os.environ.get("NBTRT_DEBUG") == "1":
            raise
        print(f"{verb}: error: {_one_line(e)}", file=sys.stderr)
        return 1 if isinstance(e, OSError) and not isinstance(e, FileExistsError) else 2
    return 0


def _one_line(e: BaseException) -> str:
    """The message, with the path an OSError names (``[Errno 30] Read-only file system: 'work/x'``)."""
    if isinstance(e, OSError) and e.strerror:
        paths = " -> ".join(repr(str(f)) for f in (e.filename, e.filename2) if f is not None)
        text = f"{e.strerror}: {paths}" if paths else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
