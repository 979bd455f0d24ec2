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
# torchrun with 2 processes of 1 thread each (IMAML_PROCS to change): as fast as 2 threads on an
# idle machine, and it keeps its pace beside another busy process where 2 spinning OpenMP threads
# slow 3x (docs/distributed.md, "Threads"). OMP_NUM_THREADS=1 is what the config asks.
export OMP_NUM_THREADS=1
exec .venv/bin/torchrun --standalone --nproc_per_node="${IMAML_PROCS:-2}" -m imaml.cli \
  train configs/quickstart.json --out "$out"
