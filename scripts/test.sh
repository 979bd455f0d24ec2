#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export IMAML_DATA="${IMAML_DATA:-$(cd .. && pwd)/shared/data}"
exec .venv/bin/python -m pytest -q "$@"
