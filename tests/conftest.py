"""Test-wide settings: never reach a model hub; share one model cache across the session."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# The default cache, made explicit so that subprocesses (CLI, notebooks) share it and the
# zoo models are materialized once per machine, not once per test run.
os.environ.setdefault("NBTRT_CACHE", str(Path.home() / ".cache" / "nbtrt"))

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--browser", action="store_true",
                     help="run the real-browser notebook tests (always on when CI is set)")


def pytest_collection_modifyitems(config, items):
    # The browser tests execute notebooks in JupyterLab + Chromium: minutes each. CI runs them;
    # locally they are opt-in so that the edit-test loop stays quick.
    if config.getoption("--browser") or os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason="browser test: pass --browser (CI runs it)")
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)
