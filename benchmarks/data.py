"""Dataset load times (first decode, then from the cache), the loading process's peak memory,
the cache's size on disk, and task-sampler throughput.

    IMAML_DATA=../shared/data python benchmarks/data.py --out docs/benchmarks/data.json

Each load is timed in a fresh process (imports excluded), which also reports its peak resident
memory (``ru_maxrss``, imports included). The first load uses an empty cache folder; the second
reads the cache the first wrote. Sampling runs on one thread.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

LOAD = """
import resource, sys, time, torch
from imaml.data import load_miniimagenet, load_omniglot
t = time.perf_counter()
if sys.argv[1] == "omniglot":
    load_omniglot(progress=lambda m: None)
else:
    for s in ("meta_train", "meta_val", "meta_test"):
        load_miniimagenet(s, progress=lambda m: None)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def timed_load(name, cache):
    env = dict(os.environ, IMAML_CACHE=cache)
    out = subprocess.run([sys.executable, "-c", LOAD, name], env=env, capture_output=True,
                         text=True, check=True)
    seconds, peak_mib = out.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(peak_mib)


def folder_mib(folder, prefix):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.startswith(prefix)) / 2 ** 20


def sampler_rate(ways, shots, queries, n, batch):
    import torch
    from imaml.data import TaskSampler
    from imaml.data.omniglot import omniglot_split
    torch.set_num_threads(1)
    s = TaskSampler(omniglot_split("meta_train", progress=lambda m: None), ways, shots, queries)
    s.batch(range(batch))
    t = time.perf_counter()
    for start in range(0, n, batch):
        s.batch(range(start, start + batch))
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/data.json")
    args = ap.parse_args()
    if not os.environ.get("IMAML_DATA"):
        sys.exit("set IMAML_DATA to the folder holding omniglot/ and miniimagenet/")
    res = {"loads": {}, "sampler": []}
    with tempfile.TemporaryDirectory() as cache:
        for name in ("omniglot", "miniimagenet"):
            (first, peak1), (second, peak2) = timed_load(name, cache), timed_load(name, cache)
            size = folder_mib(cache, name)
            res["loads"][name] = {"first_s": first, "cached_s": second, "first_peak_mib": peak1,
                                  "cached_peak_mib": peak2, "cache_mib": size}
            print(f"{name:>13}: first load {first:6.2f} s (peak {peak1:5.0f} MiB), from cache "
                  f"{second:5.2f} s (peak {peak2:5.0f} MiB), cache {size:5.0f} MiB on disk")
    for ways, shots, queries in ((5, 1, 1), (20, 5, 5), (20, 5, 15)):
        for batch in (1, 32):
            rate = sampler_rate(ways, shots, queries, 4000, batch)
            res["sampler"].append({"ways": ways, "shots": shots, "queries": queries,
                                   "batch": batch, "tasks_per_s": rate})
            print(f"Omniglot {ways}-way {shots}-shot, {queries} queries, batches of {batch:>2}: "
                  f"{rate:8.0f} tasks/s (1 thread)")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
