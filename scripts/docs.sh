#!/usr/bin/env bash
# Build the documentation site into site/ in strict mode: a warning, a broken link or a broken
# anchor fails the build (mkdocs.yml). Installs the pinned doc tools (requirements-docs.txt) into
# .venv first, creating .venv if there is none; torch is not needed and never re-resolved
# (requirements.txt is passed as a constraint). Extra arguments go to `mkdocs build`, e.g.
#   bash scripts/docs.sh --site-dir /tmp/site
# Browse the result: .venv/bin/python -m http.server -d site -b 127.0.0.1 8000
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-docs.txt \
  -c requirements.txt 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import mkdocs, mkdocstrings, material" \
  || { echo "docs set-up failed: see the pip messages above" >&2; exit 1; }
export NO_MKDOCS_2_WARNING=1
exec .venv/bin/python -m mkdocs build --strict "$@"
