"""Test-wide settings: never reach a model hub; share one model cache across the session."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# The default cache, made explicit so that subprocesses (CLI, notebooks) share it and the
# zoo models are materialized once per machine, not once per test run.
os.environ.setdefault("NBTRT_CACHE", str(Path.home() / ".cache" / "nbtrt"))
