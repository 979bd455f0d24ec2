#!/usr/bin/env bash
# Create .venv (if needed) and install the project into it: torch pinned first (requirements.txt),
# so that pip never resolves a newer, CUDA, build; then the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pipq() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored" || true; }
pipq -r requirements.txt
pipq -e ".[test]"
.venv/bin/python -c "import torch, imaml; print(f'imaml {imaml.__version__}, torch {torch.__version__}')" \
  || { echo "set-up failed: see the pip messages above" >&2; exit 1; }
