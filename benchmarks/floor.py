"""The arithmetic floor of a task meta-gradient: its floating-point operations, counted by
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products, which are
nearly all of the Conv-4's arithmetic), divided by the rate this machine reaches on the same
network when the work comes in one large batch (forward and backward over 1000 images), so
what a small task costs beyond it is per-operation overhead, not arithmetic.

    python benchmarks/floor.py --out docs/benchmarks/floor [--threads 2]

Prints, per workload of ``imaml bench`` (iMAML-GD, 16 steps, 5 CG; MAML, 16 steps): GFLOP per
task, the large-batch GFLOP/s, the floor in ms, and writes floor.json. Compare the floor with
the `imaml bench` seconds per task (docs/benchmarks.md, "Threads, and small tasks against the
arithmetic floor").
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.func import functional_call, grad
from torch.utils.flop_counter import FlopCounterMode

from imaml.bench import WORKLOADS, make_method, workload


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def large_batch_rate(fm, dataset: str, ways: int, images: int = 1000, reps: int = 3) -> float:
    """FLOP/s of forward + backward of the network on ``images`` images at once."""
    shape = (1, 28, 28) if dataset == "omniglot" else (3, 84, 84)
    x = torch.randn(images, *shape)
    y = torch.arange(images) % ways
    params = dict(fm.module.named_parameters())

    def step():
        return grad(lambda p: torch.nn.functional.cross_entropy(
            functional_call(fm.module, p, (x,)), y))(params)

    step()
    work = flops(step)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return work / sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--workloads", default="omniglot-5w1s,omniglot-20w5s")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for name in a.workloads.split(","):
        dataset, ways, shots, query = WORKLOADS[name]
        fm, theta, batch = workload(dataset, ways, shots, query, 1)
        task = batch.tasks()[0]
        rate = large_batch_rate(fm, dataset, ways)
        for method_name in ("imaml-gd", "maml"):
            method = make_method(method_name, a.steps)
            work = flops(lambda: method.meta_gradient(fm, theta, task))
            rows.append({"workload": name, "method": method_name, "steps": a.steps,
                         "gflop_per_task": work / 1e9, "large_batch_gflops": rate / 1e9,
                         "floor_ms": 1000 * work / rate, "threads": torch.get_num_threads()})
            r = rows[-1]
            print(f"{name:16s} {method_name:9s} K={a.steps}: {r['gflop_per_task']:.2f} GFLOP per "
                  f"task; large batch {r['large_batch_gflops']:.1f} GFLOP/s; floor "
                  f"{r['floor_ms']:.1f} ms ({r['threads']} threads)", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "floor.json").write_text(json.dumps({"torch": torch.__version__,
                                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
