# make demo  — set up .venv (if needed) and run every notebook headless (build/summary.md)
# make test  — set up .venv (if needed), check the import contract (lint-imports), run the tests, then nbval over notebooks/
# Both work on a fresh machine with Python 3.11; scripts/setup.sh does all the setup.

SHELL := /bin/bash
PY    := .venv/bin/python
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: setup demo test zoo clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(OFFLINE) $(PY) scripts/run_notebooks.py

zoo: setup
	$(OFFLINE) $(PY) -m nbtrt.zoo

# pytest exits 5 when it collected nothing: that is a failure only if nothing ran at all
# (neither the tests nor the notebooks).
test:
	@bash scripts/setup.sh --browser
	.venv/bin/lint-imports  # the import contract in pyproject.toml ([tool.importlinter])
	@set -u; ran=0; \
	$(OFFLINE) $(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 0 ]; then ran=1; elif [ $$rc -ne 5 ]; then exit $$rc; fi; \
	if compgen -G "notebooks/*.ipynb" >/dev/null; then \
	  $(OFFLINE) $(PY) -m pytest -q --nbval-lax --nbval-current-env notebooks/; rc=$$?; \
	  if [ $$rc -eq 0 ]; then ran=1; elif [ $$rc -ne 5 ]; then exit $$rc; fi; \
	fi; \
	if [ $$ran -eq 0 ]; then echo "make test: no test was collected" >&2; exit 5; fi

clean:
	rm -rf build
