#!/usr/bin/env bash
# Set up (if needed), then the main job: brief iMAML meta-training on Omniglot 5-way 1-shot and
# its meta-test accuracy with a 95% confidence interval.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${IMAML_DATA:-}" ] && [ -d ../shared/data/omniglot ]; then
  export IMAML_DATA="$(cd ../shared/data && pwd)"
fi
out=runs/quickstart
if [ -f "$out/last.pt" ]; then
  out="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
fi
# A short job on a machine of one's own: torch's spinning OpenMP threads are 31% faster idle
# than the sleeping ones imaml defaults to (docs/benchmarks.md, "Threads"); set OMP_WAIT_POLICY=PASSIVE
# yourself on a shared machine.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-ACTIVE}"
exec .venv/bin/imaml train configs/quickstart.json --out "$out"
