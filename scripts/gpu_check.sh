#!/usr/bin/env bash
# The prepared checks for a lent GPU machine (see docs/distributed.md, "Devices"): its python3 has a CUDA
# torch and nothing can be installed, so the project runs from src/ on PYTHONPATH. Before the
# call, here: mkdir -p .data/omniglot && cp ../shared/data/omniglot/*.zip .data/omniglot/
# (.data/ is git-ignored) and name .data in the device tool's `carry`; run it as
#   bash scripts/gpu_check.sh        (writes into $OUT when set, else results/gpu)
# In under 8 minutes: the test suite on CUDA (4 min at most), CUDA-synchronised timings of one
# task and a meta-batch of 16 (iMAML-GD and MAML, Omniglot 5w1s and 20w5s, K = 5, 25, 100; 90 s
# at most), and 2 minutes of Omniglot 5-way 1-shot training with the exact-Hessian 2-hour
# config on the GPU; the last lines are a short table.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src IMAML_DATA=.data IMAML_CACHE=/tmp/imaml-cache PYTHONUNBUFFERED=1
out=${OUT:-results/gpu}
mkdir -p "$out"
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0))" \
  | tee "$out/device.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -n 25 > "$out/tests.txt"
timeout 90 python3 benchmarks/gpu_timing.py --out "$out/timing.json" > "$out/timing.log" 2>&1
timeout 200 python3 -m imaml.cli train configs/omniglot_5w1s_imaml_gd_exact_cpu2h.json \
  device=cuda threads=4 max_minutes=2 val_every=100 val_tasks=100 checkpoint_every=100 \
  --no-test --progress-every 20 --out "$out/train" > "$out/train.log" 2>&1
echo "== summary =="
cat "$out/device.txt"
echo "tests: $(grep -E 'passed|failed' "$out/tests.txt" | tail -n 1)"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
try:
    rows = json.load(open(f"{out}/timing.json"))["rows"]
except Exception as e:  # the timing step failed or ran out of time
    rows = []
    print("timing: none", e)
for r in rows:
    s = "-" if r["seconds_per_task"] is None else f"{r['seconds_per_task']:.4f} s/task"
    m = "" if r["peak_mib"] is None else f", {r['peak_mib']:.0f} MiB"
    print(f"{r['workload']:15s} {r['method']:8s} K={r['steps']:<3d} {r['mode']:4s} x{r['tasks']:<2d} {s}{m}")
try:
    rows = [l for l in open(f"{out}/train/metrics.csv") if ",val," in l]
    summ = json.load(open(f"{out}/train/train_summary.json"))
    print(f"training: {summ['iterations']} iterations in {summ['train_minutes']:.1f} min; "
          "meta-val " + ", ".join(f"{l.split(',')[0]}: {100 * float(l.split(',')[3]):.1f}%" for l in rows))
except Exception as e:
    print("training: none", e)
PY
