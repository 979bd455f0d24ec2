#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${IMAML_DATA:-}" ] && [ -d ../shared/data ]; then export IMAML_DATA="$(cd ../shared/data && pwd)"; fi
exec .venv/bin/python -m pytest -q --durations=25 "$@"
