"""Hessian-vector products: forward-over-reverse vs reverse-over-reverse (double back-prop).

Times what iMAML does per task: build the HVP at φ and apply it ``n`` times (5 = the paper's CG
steps), on the Omniglot Conv-4. Prints a table and writes JSON.

    python benchmarks/hvp.py --out results/hvp.json
"""
import argparse
import json
import statistics
import time

import torch

from imaml import FunctionalModel, make_hvp, omniglot_conv4, task_loss


def bench(mode, ways, shots, n, reps):
    torch.manual_seed(0)
    fm = FunctionalModel(omniglot_conv4(ways))
    theta = fm.theta()
    x, y = torch.randn(ways * shots, 1, 28, 28), torch.arange(ways).repeat(shots)
    f = task_loss(fm, x, y)
    v = torch.randn_like(theta)
    times = []
    for r in range(reps + 1):
        t = time.perf_counter()
        h = make_hvp(f, theta, mode)
        for _ in range(n):
            h(v)
        if r:  # the first run is a warm-up
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/hvp.json")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    rows = []
    print(f"{'workload':>16} {'products':>8} {'fwd-rev s':>10} {'rev-rev s':>10}")
    for ways, shots in [(5, 1), (20, 5)]:
        for n in (1, 5):
            row = {"ways": ways, "shots": shots, "products": n,
                   **{m: bench(m, ways, shots, n, args.reps) for m in ("fwd-rev", "rev-rev")}}
            rows.append(row)
            print(f"{f'{ways}-way {shots}-shot':>16} {n:>8} {row['fwd-rev']:>10.4f} {row['rev-rev']:>10.4f}")
    import os
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
