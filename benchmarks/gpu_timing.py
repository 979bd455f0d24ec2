"""Seconds per task meta-gradient on the device at hand (CUDA-synchronised on a GPU), for one
task and a vmapped meta-batch, iMAML-GD and MAML, Omniglot 5-way 1-shot and 20-way 5-shot
(random inputs), K inner steps; peak GPU memory from torch.cuda.max_memory_allocated.

    PYTHONPATH=src python3 benchmarks/gpu_timing.py --out results/gpu/timing.json

Part of scripts/gpu_check.sh, the prepared script for a lent GPU machine. On a CPU it runs too
(memory then blank), which is how it was checked before any GPU was lent.
"""
import argparse
import json
import statistics
import time

import torch

from imaml.batched import batch_meta_gradient
from imaml.bench import make_method, workload
from imaml.distributed import resolve_device

WORKLOADS = {"omniglot-5w1s": ("omniglot", 5, 1, 1, 16), "omniglot-20w5s": ("omniglot", 20, 5, 5, 16)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, reps):
    fn()  # warm-up: kernels, allocator
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", default="5,25,100")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    rows = []
    for name, (dataset, ways, shots, query, batch) in WORKLOADS.items():
        for method_name in ("imaml-gd", "maml"):
            for k in [int(s) for s in args.steps.split(",")]:
                for mode, tasks in (("task", 1), ("vmap", batch)):
                    fm, theta, tb = workload(dataset, ways, shots, query, tasks)
                    fm.module.to(device)
                    fm.buffers = {n: b.to(device) for n, b in fm.buffers.items()}
                    theta, tb = theta.to(device), tb.to(device)
                    method = make_method(method_name, k)
                    if mode == "task":
                        task = tb[0]
                        fn = lambda: method.meta_gradient(fm, theta, task)  # noqa: E731
                    else:
                        fn = lambda: batch_meta_gradient(method, fm, theta, tb)  # noqa: E731
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    try:
                        sec = time_call(fn, device, args.reps)
                    except torch.cuda.OutOfMemoryError:
                        sec = None
                    mib = (torch.cuda.max_memory_allocated(device) / 2**20
                           if device.type == "cuda" else None)
                    row = dict(workload=name, method=method_name, steps=k, mode=mode,
                               tasks=tasks, seconds=sec,
                               seconds_per_task=None if sec is None else sec / tasks, peak_mib=mib)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    with open(args.out, "w") as fh:
        json.dump({"device": str(device), "torch": torch.__version__,
                   "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
