"""Training throughput under a thread policy, on an idle machine and beside one busy process.

Runs the README's main job (configs/quickstart.json) for a few meta-iterations in fresh
processes, once per policy, first alone and then beside a one-core busy loop (what any other job
on a shared workstation or CI runner does), and reports the median seconds per meta-iteration
(metrics.csv, iterations after the first ``--skip``) and the throughput lost to the neighbour.

    IMAML_DATA=../shared/data python benchmarks/threads.py --out docs/benchmarks/threads

Writes threads.json and threads.md into --out. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = {
    "1 process x 2 threads": (["threads=2"], 1, {}),
    "1 process x 2 threads, OMP_WAIT_POLICY=PASSIVE": (["threads=2"], 1,
                                                       {"OMP_WAIT_POLICY": "PASSIVE"}),
    "1 process x 2 threads, PASSIVE, GOMP_SPINCOUNT=20000": (
        ["threads=2"], 1, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "20000"}),
    "1 process x 1 thread": (["threads=1"], 1, {}),
    "2 processes x 1 thread (torchrun)": (["threads=1"], 2, {}),
}


def run(policy: str, iters: int, busy: bool) -> list:
    overrides, procs, env_extra = POLICIES[policy]
    out = tempfile.mkdtemp(prefix="threads_")
    args = ["configs/quickstart.json", f"meta_iters={iters}", f"val_every={iters}", "val_tasks=1",
            "test_tasks=1", *overrides, "--out", out]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={procs}", "-m", "imaml.cli", "train", *args]
    else:
        cmd = [sys.executable, "-m", "imaml.cli", "train", *args]
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    neighbour = (subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None)
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if done.returncode:
            sys.exit(f"{policy}: training failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    with open(Path(out) / "metrics.csv") as f:
        return [float(r["seconds"]) for r in csv.DictReader(f) if r["split"] == "train"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skip", type=int, default=4, help="warm-up iterations left out")
    ap.add_argument("--policies", default="|".join(POLICIES), help="names, |-separated")
    a = ap.parse_args()
    rows = []
    for policy in a.policies.split("|"):
        row = {"policy": policy}
        for busy in (False, True):
            t0 = time.time()
            secs = run(policy, a.iters, busy)[a.skip:]
            row["busy" if busy else "idle"] = statistics.median(secs)
            print(f"{policy:48s} {'busy' if busy else 'idle'}: {row['busy' if busy else 'idle']:.3f}"
                  f" s/it ({time.time() - t0:.0f} s)", flush=True)
        row["lost"] = 1 - row["idle"] / row["busy"]
        rows.append(row)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "threads.json").write_text(json.dumps({"iters": a.iters, "skip": a.skip,
                                                           "rows": rows}, indent=1))
    lines = ["| policy | idle s/it | beside a busy process | throughput lost |", "|---|---|---|---|"]
    lines += [f"| {r['policy']} | {r['idle']:.3f} | {r['busy']:.3f} | {100 * r['lost']:.0f}% |"
              for r in rows]
    (Path(a.out) / "threads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
