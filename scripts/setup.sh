#!/usr/bin/env bash
# Create .venv (if needed) and install the project into it: torch pinned first, then the package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch" || { echo "torch did not install" >&2; exit 1; }
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import imaml" || { echo "imaml did not install" >&2; exit 1; }
