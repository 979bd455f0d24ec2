#!/usr/bin/env bash
# Copy the records of a finished run into docs/runs/<name>/ (what RESULTS.md rows point at):
# config, metrics.csv (gzipped), curves, summaries, the log, and best.pt, so that a row can be
# re-evaluated with `imaml eval docs/runs/<name>/best.pt --tasks 600`.
#   bash scripts/record_run.sh runs/o5w1s_x [LOG] [NAME]
set -euo pipefail
run=${1:?usage: record_run.sh RUN_FOLDER [LOG_FILE] [NAME]}
log=${2:-}
name=${3:-$(basename "$run")}
dest="docs/runs/$name"
[ -f "$run/train_summary.json" ] || { echo "$run has no train_summary.json: not a finished run" >&2; exit 2; }
mkdir -p "$dest"
for f in config.json curves.png train_summary.json final.json best.pt; do
  [ -f "$run/$f" ] && cp "$run/$f" "$dest/"
done
gzip -c "$run/metrics.csv" > "$dest/metrics.csv.gz"
if [ -n "$log" ]; then
  grep -v "torch/distributed/run.py\|^\*\*\*\*" "$log" > "$dest/train.log" || true
fi
du -sh "$dest"
